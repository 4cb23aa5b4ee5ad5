"""Latent interpolation, linear-SVM attribute directions, edits and their JSON files."""

from __future__ import annotations

import pytest
import torch

from fastavatar_nb.editing import (
    AttributeDirection,
    attribute_direction,
    edit,
    interpolate,
    load_directions,
    save_directions,
)


def test_interpolation_endpoints_and_midpoint():
    a, b = torch.randn(8), torch.randn(8)
    path = interpolate(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 8)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path[2], (a + b) / 2)
    torch.testing.assert_close(interpolate(a, b, 0.25), 0.75 * a + 0.25 * b)


def _planted(n: int = 40, dim: int = 16, seed: int = 0):
    """Codes whose label is the sign of their first coordinate (margin 0.5): the answer is e_0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    labels = torch.arange(n) % 2 == 0
    x[:, 0] = torch.where(labels, 1.0, -1.0) * (0.5 + torch.rand(n, generator=g))
    return x, labels


def test_svm_recovers_a_planted_direction():
    x, labels = _planted()
    d = attribute_direction(x, labels, "planted")
    assert d.train_accuracy == 1.0 and (d.num_positive, d.num_negative) == (20, 20)
    assert float(d.direction.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(d.direction[0]) > 0.9  # close to e_0, pointing at the positives
    assert ((d.score(x) > 0) == labels).all()
    assert d.spread == pytest.approx(float((x @ d.direction).std(unbiased=False)), rel=1e-5)


def test_edit_moves_along_the_direction():
    x, labels = _planted()
    d = attribute_direction(x, labels)
    neg = x[~labels][:3]
    moved = edit(neg, d, 3 * d.spread)
    torch.testing.assert_close(moved - neg, (3 * d.spread * d.direction).expand_as(neg))
    assert (d.score(moved) > d.score(neg)).all()
    strip = edit(neg[0], d, torch.tensor([-1.0, 0.0, 1.0]))
    assert strip.shape == (3, 16)
    torch.testing.assert_close(strip[1], neg[0])


def test_attribute_direction_needs_both_classes():
    x, _ = _planted()
    with pytest.raises(ValueError, match="with and without"):
        attribute_direction(x, torch.ones(len(x), dtype=torch.bool), "smiling")
    with pytest.raises(ValueError, match="N labels"):
        attribute_direction(x, torch.ones(3, dtype=torch.bool))


def test_directions_json_roundtrip(tmp_path):
    x, labels = _planted()
    dirs = [attribute_direction(x, labels, "a"), attribute_direction(x, ~labels, "b")]
    path = save_directions(dirs, tmp_path / "directions.json")
    back = load_directions(path)
    assert [d.name for d in back] == ["a", "b"]
    torch.testing.assert_close(back[0].direction, dirs[0].direction)
    assert isinstance(back[1], AttributeDirection) and back[1].bias == pytest.approx(dirs[1].bias)
    with pytest.raises(FileExistsError):
        save_directions(dirs, path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_directions(path)
    with pytest.raises(FileNotFoundError, match="notebook 05"):
        load_directions(tmp_path / "missing.json")


def test_cross_validated_accuracy_tells_structure_from_noise():
    from fastavatar_nb.editing import cross_validated_accuracy

    g = torch.Generator().manual_seed(1)
    codes = torch.randn(60, 8, generator=g)
    signal = codes[:, 2] > 0
    codes[:, 2] += torch.where(signal, 0.5, -0.5)  # a margin between the classes
    noise = torch.rand(60, generator=g) > 0.5
    assert cross_validated_accuracy(codes, signal) > 0.9
    assert 0.25 < cross_validated_accuracy(codes, noise) < 0.75
    # folds >= N is leave-one-out: each prediction by a direction fitted on the other N - 1 codes
    small, lab = codes[:6], torch.tensor([True, False, True, False, True, False])
    hits = []
    for i in range(6):
        keep = torch.arange(6) != i
        d = attribute_direction(small[keep], lab[keep])
        hits.append(bool(d.score(small[i]) > 0) == bool(lab[i]))
    assert cross_validated_accuracy(small, lab, folds=6) == pytest.approx(sum(hits) / 6)
    assert cross_validated_accuracy(small, lab, folds=100) == pytest.approx(sum(hits) / 6)
    with pytest.raises(ValueError, match="folds"):
        cross_validated_accuracy(small, lab, folds=1)


def test_heldout_accuracy_counts_views_with_a_face():
    from fastavatar_nb.editing import heldout_accuracy

    d = AttributeDirection("smiling", torch.tensor([1.0, 0.0]), bias=-0.5, spread=1.0, train_accuracy=1.0,
                           num_positive=1, num_negative=1)
    nan = float("nan")
    smiling = torch.tensor([[2.0, 0.0], [0.0, 9.0], [nan, nan]])   # scores 1.5 (right), -0.5 (wrong), no face
    neutral = torch.tensor([[-1.0, 3.0]])                          # score -1.5 (right)
    assert heldout_accuracy(d, [smiling, neutral], [True, False]) == pytest.approx(2 / 3)
    assert heldout_accuracy(d, [smiling, neutral], [False, True]) == pytest.approx(1 / 3)
    assert heldout_accuracy(d, [torch.full((2, 2), nan)], [True]) != heldout_accuracy(d, [neutral], [False])  # NaN
    with pytest.raises(ValueError, match="2 subjects' codes but 1 labels"):
        heldout_accuracy(d, [smiling, neutral], [True])
