"""Template construction: per-parameter averages, quaternion averaging, files round-tripped."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from fastavatar_nb.gaussians import SH_C0, Gaussians, knn_spacing, quat_to_rotmat
from fastavatar_nb.ply import read_ply
from fastavatar_nb.template import (
    RANDOM_LOG_SCALE_SPREAD,
    average_quaternions,
    build_template,
    load_template,
    random_template,
    save_template,
    template_metadata,
)


def _random_gaussians(K: int, seed: int, batch: tuple[int, ...] = ()) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(batch + (K, 3), generator=g) * 0.1,
        log_scales=torch.randn(batch + (K, 3), generator=g) - 4,
        quats=torch.randn(batch + (K, 4), generator=g),
        opacity_logits=torch.randn(batch + (K,), generator=g),
        sh=torch.randn(batch + (K, 16, 3), generator=g) * 0.3,
    )


def _same_rotation(q1: torch.Tensor, q2: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(quat_to_rotmat(q1), quat_to_rotmat(q2), atol=atol, rtol=0)


def test_template_of_identical_fits_is_the_fit():
    one = _random_gaussians(50, 0)
    fits = Gaussians.stack([one, one.clone(), one.clone()])
    # flip the sign of every other subject's quaternions and rescale them: same rotations
    fits.quats[1] = -3.0 * fits.quats[1]
    t = build_template(fits)
    assert t.batch_shape == ()
    for name in ("means", "log_scales", "opacity_logits", "sh"):
        torch.testing.assert_close(getattr(t, name), getattr(one, name))
    _same_rotation(t.quats, one.quats)
    # output sign agrees with the majority (subjects 0 and 2 are +q)
    assert ((t.quats * one.rotations).sum(-1) > 0.999).all()


def test_template_is_arithmetic_mean_in_raw_space():
    fits = _random_gaussians(20, 1, batch=(4,))
    t = build_template(fits)
    torch.testing.assert_close(t.means, fits.means.mean(0))
    torch.testing.assert_close(t.log_scales, fits.log_scales.mean(0))  # geometric mean of scales
    torch.testing.assert_close(t.opacity_logits, fits.opacity_logits.mean(0))
    torch.testing.assert_close(t.sh, fits.sh.mean(0))
    torch.testing.assert_close(t.quats.norm(dim=-1), torch.ones(20))


def test_average_of_q_and_minus_q_is_q():
    q = torch.nn.functional.normalize(torch.randn(30, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    avg = average_quaternions(torch.stack([q, -q, q]), dim=0)
    torch.testing.assert_close(avg, q, atol=1e-5, rtol=0)
    # a naive arithmetic mean of q and -q is zero: the eigenvector method still returns q (up to sign)
    avg2 = average_quaternions(torch.stack([q, -q]), dim=0)
    torch.testing.assert_close((avg2 * q).sum(-1).abs(), torch.ones(30), atol=1e-5, rtol=0)


def test_average_of_symmetric_rotations_about_an_axis():
    # rotations by +a and -a about z average to the identity; +a, +a, -a (weights) to the weighted angle
    a = 0.4
    qp = torch.tensor([math.cos(a / 2), 0.0, 0.0, math.sin(a / 2)])
    qm = torch.tensor([math.cos(a / 2), 0.0, 0.0, -math.sin(a / 2)])
    avg = average_quaternions(torch.stack([qp, -qm]), dim=0)  # sign flip on one input
    torch.testing.assert_close(avg, torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # dim other than 0 and weights
    qs = torch.stack([qp, qm], dim=0)[None]  # [1, 2, 4]
    avg_w = average_quaternions(qs, dim=1, weights=torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(avg_w[0], qp, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="dim"):
        average_quaternions(qs, dim=2)


def test_build_template_rejects_unbatched():
    with pytest.raises(ValueError, match="subject dimension"):
        build_template(_random_gaussians(5, 3))


def test_save_and_load_template(tmp_path):
    t = build_template(_random_gaussians(40, 4, batch=(3,)))
    ply, st = save_template(t, tmp_path / "run", metadata={"subjects": '["a", "b", "c"]'})
    assert ply.name == "template.ply" and st.name == "template.safetensors"
    # exact round trip through safetensors
    back = load_template(tmp_path / "run")
    for name, v in t.parameters().items():
        torch.testing.assert_close(getattr(back, name), v, atol=0, rtol=0)
    assert template_metadata(tmp_path / "run")["subjects"] == '["a", "b", "c"]'
    # the PLY opens in our reader, is the 3DGS layout, and holds the same Gaussians
    elements = read_ply(ply)
    assert len(elements["vertex"].data) == 40 and "f_rest_44" in elements["vertex"].properties
    from_ply = Gaussians.load_ply(ply)
    for name, v in t.parameters().items():
        torch.testing.assert_close(getattr(from_ply, name), v)
    # never overwrite without asking
    with pytest.raises(FileExistsError, match="overwrite"):
        save_template(t, tmp_path / "run")
    save_template(t, tmp_path / "run", overwrite=True)
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        load_template(tmp_path / "nowhere")
    # a damaged file and a file of another kind give a clear error, not a safetensors traceback
    (tmp_path / "run" / "template.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_template(tmp_path / "run")
    save_file({"means": torch.zeros(2, 3)}, str(tmp_path / "run" / "template.safetensors"), {"format": "other"})
    with pytest.raises(ValueError, match="not a fastavatar-nb template file"):
        template_metadata(tmp_path / "run")


def test_damaged_template_files_name_the_file(tmp_path):
    from fastavatar_nb._io import ArtifactError

    t = build_template(_random_gaussians(40, 5, batch=(2,)))
    _, st = save_template(t, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["template.ply", "template.safetensors"]  # no .tmp left
    good = st.read_bytes()
    st.write_bytes(good[:-64])  # truncated: an interrupted copy
    with pytest.raises(ArtifactError, match=f"{st}: not a readable safetensors file.*notebook 02"):
        load_template(tmp_path)
    save_file({"means": torch.zeros(40, 3)}, str(st), {"format": "fastavatar-nb template"})
    with pytest.raises(ArtifactError, match=f"{st}: a fastavatar-nb template file without the tensors "
                                           r"\['log_scales', 'quats', 'opacity_logits', 'sh'\]"):
        load_template(tmp_path)
    params = {k: v.contiguous() for k, v in t.parameters().items()}
    params["sh"] = params["sh"][:, :4].contiguous()  # the wrong shape
    save_file(params, str(st), {"format": "fastavatar-nb template"})
    with pytest.raises(ArtifactError, match=f"{st}: its tensors are not a valid template .*sh"):
        load_template(tmp_path)


def test_random_template_draws_around_the_points():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2000, 3, generator=g) * 0.1
    t = random_template(pts, seed=5)
    assert t.batch_shape == () and t.num_gaussians == 2000
    torch.testing.assert_close(t.means, pts, rtol=0, atol=0)
    torch.testing.assert_close(t.quats.norm(dim=-1), torch.ones(2000))
    # log-scales within RANDOM_LOG_SCALE_SPREAD of the log-spacing, spread over the whole interval
    off = t.log_scales - knn_spacing(pts, k=3).log()[:, None]
    assert off.abs().max() <= RANDOM_LOG_SCALE_SPREAD + 1e-5 and off.abs().max() > 0.9 * RANDOM_LOG_SCALE_SPREAD
    assert abs(float(off.mean())) < 0.05
    colours = t.sh[:, 0] * SH_C0 + 0.5
    assert colours.min() >= 0 and colours.max() <= 1 and abs(float(colours.mean()) - 0.5) < 0.02
    assert (t.sh[:, 1:] == 0).all()
    assert abs(float(torch.sigmoid(t.opacity_logits).mean()) - 0.5) < 0.02
    # uniform rotations: the rotated z axes have no preferred direction
    assert quat_to_rotmat(t.quats)[:, :, 2].mean(0).norm() < 0.1
    # the seed decides: same seed, same template; another seed, another one
    torch.testing.assert_close(random_template(pts, seed=5).sh, t.sh, rtol=0, atol=0)
    assert (random_template(pts, seed=6).sh != t.sh).any()


@pytest.mark.parametrize("bad, match", [(torch.zeros(10, 2), r"\[K, 3\]"), (torch.zeros(10, 3, dtype=torch.long), "float"),
                                        (torch.zeros(2, 3), "at least 4"),
                                        (torch.tensor([[float("nan"), 0, 0]] * 5), "K = 5 with 5 non-finite")])
def test_random_template_rejects_bad_points(bad, match):
    with pytest.raises(ValueError, match=match):
        random_template(bad)
