"""Test-time refinement: on a decoder whose true code is known, refining on one view recovers the
head on the other views; the schedule moves exactly what it says; nothing shared is changed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scenes import small_decoder_result

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data.subject import MultiViewSubject
from fastavatar_nb.evaluation import novel_view_metrics
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.metrics import lpips_available
from fastavatar_nb.objective import NotOnWhiteError
from fastavatar_nb.refine import RefineConfig, input_view, refine, refine_loss, refine_views
from fastavatar_nb.render import render

L = 8


@pytest.fixture(scope="module")
def problem():
    """The decoder, a subject rendered from the head of a known code w*, and a wrong start code."""
    avatars = small_decoder_result()
    g = torch.Generator().manual_seed(7)
    w_true = torch.randn(L, generator=g)
    w_start = w_true + 0.8 * torch.randn(L, generator=g)
    cams = Cameras.nersemble_rig(16, 24)
    with torch.no_grad():
        out = render(avatars.decode(w_true), cams, background=1.0, backend="torch", tile_size=4)
    subject = MultiViewSubject("s", out.colors.clamp(0, 1), out.alphas.clamp(0, 1), cams, avatars.template.means)
    return avatars, subject, w_true, w_start


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_config_schedules_and_validation():
    cfg = RefineConfig(steps=10, schedule="code_then_decoder", code_fraction=0.3)
    assert cfg.code_steps == 3
    assert [cfg.optimises(s) for s in (0, 2, 3, 9)] == [(True, False)] * 2 + [(False, True)] * 2
    assert RefineConfig(schedule="joint").optimises(0) == (True, True)
    assert RefineConfig(schedule="code").optimises(49) == (True, False)
    assert RefineConfig(schedule="decoder").optimises(0) == (False, True)
    assert RefineConfig(steps=300).replace(steps=5) == RefineConfig(steps=5)
    for bad in (dict(steps=-1), dict(schedule="both"), dict(code_fraction=1.5), dict(code_lr=-1.0),
                dict(grad_clip=float("nan"))):
        with pytest.raises(ValueError, match="RefineConfig"):
            RefineConfig(**bad).validate()
    assert RefineConfig.from_dict({"steps": 7, "schedule": "code"}) == RefineConfig(steps=7, schedule="code")


def test_refining_the_code_on_one_view_recovers_the_other_views(problem):
    avatars, subject, w_true, w_start = problem
    before = _state(avatars.decoder)
    image, cam = input_view(subject, 8)
    r = refine(avatars, w_start, image, cam, None, RefineConfig(steps=40, schedule="code", code_lr=5e-2),
               backend="torch", progress=False)
    assert r.psnr_history.shape == (40,) and r.final_psnr > float(r.psnr_history[0]) + 5.0, r.psnr_history
    assert r.loss_history[-5:].mean() < r.loss_history[:5].mean()
    assert (r.code - w_true).norm() < 0.7 * (w_start - w_true).norm()      # closer to the true code
    torch.testing.assert_close(r.initial_code, w_start, rtol=0, atol=0)
    ff = novel_view_metrics(subject, avatars.decode(w_start[None]), [8], backend="torch")
    ref = novel_view_metrics(subject, Gaussians.stack([r.head]), [8], backend="torch")
    assert float(ref["psnr"][0]) > float(ff["psnr"][0]) + 3.0, (ff, ref)  # the 15 views it never saw improve
    # the code schedule leaves the (copied) MLP as it was, and the shared decoder is never touched
    for k, v in r.decoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    for k, v in avatars.decoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_decoder_schedule_keeps_the_code_and_joint_moves_both(problem):
    avatars, subject, _, w_start = problem
    before = _state(avatars.decoder)
    image, cam = input_view(subject, 3)
    dec = refine(avatars, w_start, image, cam, None, RefineConfig(steps=10, schedule="decoder", decoder_lr=1e-3,
                                                                 ), backend="torch", progress=False)
    torch.testing.assert_close(dec.code, w_start, rtol=0, atol=0)
    assert any((v - before[k]).abs().max() > 0 for k, v in dec.decoder.state_dict().items())
    assert dec.final_psnr > float(dec.psnr_history[0])
    torch.testing.assert_close(dec.embeddings, avatars.embeddings, rtol=0, atol=0)  # frozen by default
    # the authors' schedule: w moves in the first half only, exactly as a code-only run of that length
    ctd = refine(avatars, w_start, image, cam, None, RefineConfig(steps=4, schedule="code_then_decoder"),
                 backend="torch", progress=False)
    code2 = refine(avatars, w_start, image, cam, None, RefineConfig(steps=2, schedule="code"),
                   backend="torch", progress=False)
    torch.testing.assert_close(ctd.code, code2.code, rtol=0, atol=0)
    assert any((v - before[k]).abs().max() > 0 for k, v in ctd.decoder.state_dict().items())
    joint = refine(avatars, w_start, image, cam, None, RefineConfig(steps=3, schedule="joint", embeddings_lr=1e-2,
                                                                   ), backend="torch", progress=False)
    assert (joint.code - w_start).abs().max() > 0
    assert (joint.embeddings - avatars.embeddings).abs().max() > 0
    for k, v in avatars.decoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_zero_steps_is_the_feed_forward_head_and_callback_sees_each_step(problem):
    avatars, subject, _, w_start = problem
    image, cam = input_view(subject, 0)
    r = refine(avatars, w_start, image, cam, None, RefineConfig(steps=0), backend="torch",
               progress=False)
    ff = avatars.decode(w_start)
    torch.testing.assert_close(r.head.means, ff.means, rtol=0, atol=0)
    torch.testing.assert_close(r.head.sh, ff.sh, rtol=0, atol=0)
    seen = []
    r3 = refine(avatars, w_start, image, cam, None, RefineConfig(steps=3), backend="torch",
                progress=False, callback=lambda i: seen.append((i["step"], i["steps"], i["head"]())))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    torch.testing.assert_close(seen[-1][2].means, r3.head.means, rtol=0, atol=0)
    assert float(r3.psnr_history[0]) == pytest.approx(r.final_psnr, abs=1e-4)  # step 0 renders the start


def test_refine_views_equals_one_refinement_per_view(problem):
    avatars, subject, _, w_start = problem
    cfg = RefineConfig(steps=2)
    codes = torch.stack([w_start, w_start + 0.1])
    heads, seconds = refine_views(avatars, subject, codes, [2, 9], cfg, backend="torch", progress=False)
    assert heads.batch_shape == (2,) and seconds.shape == (2,) and (seconds > 0).all()
    image, cam = input_view(subject, 9)  # the photo and its camera: nothing else of the subject
    one = refine(avatars, codes[1], image, cam, None, cfg, backend="torch", progress=False)
    torch.testing.assert_close(heads[1].means, one.head.means)
    torch.testing.assert_close(heads[1].sh, one.head.sh)
    with pytest.raises(ValueError, match="V=2"):
        refine_views(avatars, subject, codes[:1], [2, 9], cfg, progress=False)


def test_refine_runs_from_a_photo_and_its_camera_alone(problem):
    """No subject behind the photo: a bare image tensor and a camera built by hand."""
    avatars, subject, _, w_start = problem
    photo = subject.images[8].clone()                   # e.g. loaded from a PNG: only the pixels
    vm, K = subject.cameras.viewmats[8].clone(), subject.cameras.Ks[8].clone()
    camera = Cameras(vm[None], K[None], 16, 24)
    del subject                                          # nothing else of the subject is around
    r = refine(avatars, w_start, photo, camera, config=RefineConfig(steps=6, schedule="code", code_lr=5e-2),
               backend="torch", progress=False)
    assert r.final_psnr > float(r.psnr_history[0])


def test_a_photo_not_on_white_needs_weights(problem):
    avatars, subject, _, w_start = problem
    image, cam = input_view(subject, 8)
    grey = image * subject.masks[8, ..., None] + 0.4 * (1 - subject.masks[8, ..., None])  # grey background
    with pytest.raises(NotOnWhiteError, match="not on a white background.*weights="):
        refine(avatars, w_start, grey, cam, None, RefineConfig(steps=1), progress=False)
    # the documented way out: weights saying which pixels the loss may see
    r = refine(avatars, w_start, grey, cam, subject.masks[8], RefineConfig(steps=1), backend="torch", progress=False)
    assert r.loss_history.shape == (1,) and torch.isfinite(r.loss_history).all()


def test_inputs_are_checked(problem):
    avatars, subject, _, w_start = problem
    image, cam = input_view(subject, 5)
    assert image.shape == (24, 16, 3) and cam.viewmats.shape == (1, 4, 4)
    torch.testing.assert_close(image, subject.images[5], rtol=0, atol=0)
    wts = subject.masks[5]
    cfg = RefineConfig(steps=1)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        refine(avatars, torch.zeros(2, L), image, cam, wts, cfg, progress=False)
    with pytest.raises(ValueError, match="no face"):
        refine(avatars, torch.full((L,), float("nan")), image, cam, wts, cfg, progress=False)
    with pytest.raises(ValueError, match="exactly one view"):
        refine(avatars, w_start, image, subject.cameras[[0, 1]], wts, cfg, progress=False)
    with pytest.raises(ValueError, match="match the camera"):
        refine(avatars, w_start, image[:20], cam, wts, cfg, progress=False)
    with pytest.raises(ValueError, match="weights must be"):
        refine(avatars, w_start, image, cam, wts[:5], cfg, progress=False)
    with pytest.raises(TypeError, match="divide uint8 images by 255"):
        refine(avatars, w_start, (image * 255).to(torch.uint8), cam, None, cfg, progress=False)
    with pytest.raises(ValueError, match="look like 0..255: divide by 255"):
        refine(avatars, w_start, image * 255, cam, None, cfg, progress=False)
    nan_image = image.clone()
    nan_image[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite pixel"):
        refine(avatars, w_start, nan_image, cam, None, cfg, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        input_view(subject, 16)
    with_lpips = dataclasses.replace(avatars, config=dataclasses.replace(avatars.config, lpips_weight=0.1))
    if not lpips_available():
        with pytest.raises(ValueError, match="LPIPS"):
            refine(with_lpips, w_start, image, cam, wts, cfg, progress=False)


def test_pose_refinement_moves_a_wrong_camera_back(problem):
    """With the true code and a camera turned by 4 degrees, refining only the pose (code_lr 0)
    brings the camera back towards the truth; without pose learning rates the camera is returned
    unchanged."""
    from fastavatar_nb.cameras import rotation_error_deg, rotvec_to_matrix

    avatars, subject, w_true, _ = problem
    image, cam = input_view(subject, 8)
    V = cam.viewmats.clone()
    V[0, :3, :3] = rotvec_to_matrix(torch.tensor([0.04, -0.05, 0.0])) @ V[0, :3, :3]
    wrong = Cameras(V, cam.Ks, cam.width, cam.height)
    before = float(rotation_error_deg(wrong, cam))
    assert 3.5 < before < 4.0
    cfg = RefineConfig(steps=60, schedule="code", code_lr=0.0, pose_rotation_lr=5e-3, pose_translation_lr=1e-3)
    assert cfg.refines_pose and not RefineConfig().refines_pose
    r = refine(avatars, w_true, image, wrong, None, cfg, backend="torch", progress=False)
    assert float(rotation_error_deg(r.camera, cam)) < 0.5 * before
    assert r.final_psnr > float(r.psnr_history[0]) + 2.0
    torch.testing.assert_close(r.code, w_true)                               # code_lr 0: the code stays
    fixed = refine(avatars, w_true, image, wrong, None, RefineConfig(steps=3, schedule="code"), backend="torch",
                   progress=False)
    torch.testing.assert_close(fixed.camera.viewmats, wrong.viewmats, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pose_rotation_lr"):
        RefineConfig(pose_rotation_lr=-1.0).validate()


def test_code_drift_and_the_code_prior(problem):
    """code_drift is ||w - w0||^2 / ||w0||^2 with its gradient; the prior adds exactly that times its weight to the
    first step's loss, and a heavier prior keeps the code nearer its start."""
    from fastavatar_nb.refine import code_drift

    w0 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    w = torch.tensor([3.0, 6.0], dtype=torch.float64, requires_grad=True)
    d = code_drift(w, w0)
    torch.testing.assert_close(d, torch.tensor(4.0 / 25.0, dtype=torch.float64))
    d.backward()
    torch.testing.assert_close(w.grad, 2 * (w.detach() - w0) / 25.0)          # d/dw of ||w - w0||^2 / 25
    assert float(code_drift(torch.ones(3), torch.zeros(3))) == 3.0            # a zero start counts as length 1
    avatars, subject, _, w_start = problem
    image, cam = input_view(subject, 8)
    runs = {}
    for weight in (0.0, 1.0, 100.0):
        cfg = RefineConfig(steps=15, schedule="code", code_lr=5e-2, code_prior_weight=weight)
        runs[weight] = refine(avatars, w_start, image, cam, None, cfg, backend="torch", progress=False)
    # step 0 starts at w0 (no drift yet): the same loss with or without the prior
    assert runs[0.0].loss_history[0] == runs[100.0].loss_history[0]
    drift = {k: float(code_drift(r.code, w_start)) for k, r in runs.items()}
    assert drift[0.0] > drift[1.0] > drift[100.0] > 0, drift
    assert drift[100.0] < 0.1 * drift[0.0], drift
    with pytest.raises(ValueError, match="code_prior_weight"):
        RefineConfig(code_prior_weight=-1.0).validate()


def test_refine_minimises_refine_loss(problem):
    """refine's recorded first loss is refine_loss at the start code: the photometric term against a hand
    computation plus the residual penalty; the prior is its weight times code_drift, and needs the start code.
    One clipped Adam step on w with refine's rate (its one step, schedule 'code') gives the code refine returns."""
    from fastavatar_nb.decoder import apply_residuals, residual_penalty
    from fastavatar_nb.metrics import ssim
    from fastavatar_nb.refine import code_drift

    avatars, subject, _, w_start = problem
    image, cam = input_view(subject, 8)
    dcfg = avatars.config
    cfg = RefineConfig(steps=1, schedule="code", code_lr=5e-2)
    run = refine(avatars, w_start, image, cam, None, cfg, backend="torch", progress=False)
    w = w_start.clone().requires_grad_(True)
    lib = refine_loss(avatars.decoder, avatars.template, w, avatars.embeddings, image, cam, dcfg, backend="torch")
    assert float(lib.loss.detach()) == pytest.approx(float(run.loss_history[0]), rel=1e-6)
    res = avatars.decoder(w_start, avatars.embeddings)
    colors = render(apply_residuals(avatars.template, res), cam, background=1.0, backend="torch",
                    sh_degree=dcfg.sh_degree, tile_size=dcfg.tile_size).colors[0]
    by_hand = dcfg.l1_weight * (colors - image).abs().mean() + dcfg.ssim_weight * (1 - ssim(colors, image, padding="same"))
    torch.testing.assert_close(lib.image, by_hand)
    torch.testing.assert_close(lib.loss, by_hand + residual_penalty(res, dcfg))
    assert float(lib.prior) == 0.0
    lib.loss.backward()
    torch.nn.utils.clip_grad_norm_([w], cfg.grad_clip)
    opt = torch.optim.Adam([w], lr=cfg.code_lr)
    opt.step()
    torch.testing.assert_close(w.detach(), run.code)
    moved = w_start + 0.3
    prior = refine_loss(avatars.decoder, avatars.template, moved, avatars.embeddings, image, cam, dcfg,
                        code_prior_weight=2.0, initial_code=w_start, backend="torch")
    torch.testing.assert_close(prior.prior, 2.0 * code_drift(moved, w_start))
    with pytest.raises(ValueError, match="initial_code"):
        refine_loss(avatars.decoder, avatars.template, moved, avatars.embeddings, image, cam, dcfg,
                    code_prior_weight=2.0, backend="torch")
