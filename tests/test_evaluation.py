"""The single-image protocol: each head is scored on every view except the one it came from."""

from __future__ import annotations

import pytest
import torch
from test_fitting import _scene

from fastavatar_nb.data.subject import MultiViewSubject
from fastavatar_nb.evaluation import novel_view_metrics
from fastavatar_nb.gaussians import Gaussians


def _stack(g: Gaussians, n: int) -> Gaussians:
    return Gaussians.stack([g] * n)


def test_the_true_head_scores_high_on_every_novel_view():
    subject, truth = _scene(3, K=150)
    m = novel_view_metrics(subject, _stack(truth, 3), [0, 8, 15], backend="torch", region="image")
    assert m["psnr"].shape == (3,) and (m["psnr"] > 40).all(), m
    blank = truth.clone()
    blank.opacity_logits.fill_(-20.0)
    worse = novel_view_metrics(subject, _stack(blank, 3), [0, 8, 15], backend="torch", region="image")
    assert (worse["psnr"] < m["psnr"] - 20).all()


def test_the_input_view_is_left_out():
    subject, truth = _scene(4, K=150)
    images = subject.images.clone()
    images[5] = 0.0  # a ruined view: only heads that do *not* come from view 5 are scored on it
    ruined = MultiViewSubject(subject.subject_id, images, subject.masks, subject.cameras, subject.points)
    near = truth.clone()
    near.sh[:, 0] += 0.03  # slightly off colours: finite PSNRs
    m = novel_view_metrics(ruined, _stack(near, 2), [5, 6], backend="torch", region="image")
    clean = novel_view_metrics(subject, _stack(near, 1), [5], backend="torch", region="image")
    torch.testing.assert_close(m["psnr"][0], clean["psnr"][0])  # the head from view 5 never sees view 5
    assert float(m["psnr"][1]) < float(m["psnr"][0]) - 1.0     # the head from view 6 is scored on the ruined view
    # region "support" only differs on foreground outside the points' support; the true head passes both
    assert (novel_view_metrics(subject, _stack(truth, 1), [5], backend="torch")["psnr"] > 40).all()


def test_inputs_are_checked():
    subject, truth = _scene(5, K=150)
    with pytest.raises(ValueError, match="V=2"):
        novel_view_metrics(subject, _stack(truth, 3), [0, 1])
    with pytest.raises(ValueError, match="do not exist"):
        novel_view_metrics(subject, _stack(truth, 1), [16])
    with pytest.raises(ValueError, match="region"):
        novel_view_metrics(subject, _stack(truth, 1), [0], region="face")
    assert torch.isfinite(novel_view_metrics(subject, _stack(truth, 1), [0], backend="torch")["ssim"]).all()
