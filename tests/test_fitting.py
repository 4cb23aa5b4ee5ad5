"""Fixed-K batched 3DGS fitting on tiny scenes with a known answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scenes import RIG_H, RIG_W, rig_scene, sphere_points

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data.subject import MultiViewSubject
from fastavatar_nb.fitting import (
    CHECKPOINT_FILE,
    LONG_RUN_LRS,
    SHORT_RUN_LRS,
    FitConfig,
    FitResult,
    checkpoint_state,
    estimate_normals,
    fit_subjects,
    init_gaussians,
    sample_point_colors,
    view_for_step,
)
from fastavatar_nb.gaussians import Gaussians, rgb_to_sh0
from fastavatar_nb.objective import train_views

W, H = RIG_W, RIG_H


def _small_config(**kw) -> FitConfig:
    base = dict(iterations=6, batch_size=1, checkpoint_every=2, tile_size=4, normal_neighbours=8)
    base.update(kw)
    return FitConfig(**base)


def test_estimate_normals_on_a_sphere_point_outwards():
    pts = sphere_points(300, 0.1, 0)
    n = estimate_normals(pts, k=10)
    radial = pts / pts.norm(dim=-1, keepdim=True)
    cos = (n * radial).sum(-1)
    assert float(cos.min()) > 0.98  # outward and along the radius
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(300))
    # batched equals per-set
    nb = estimate_normals(torch.stack([pts, pts * 2]), k=10)
    torch.testing.assert_close(nb[0], n)
    torch.testing.assert_close(nb[1], n, atol=1e-5, rtol=0)


def test_sample_point_colors_recovers_constant_colour():
    cams = Cameras.nersemble_rig(W, H)
    pts = sphere_points(150, 0.1, 1)
    images = torch.ones(16, H, W, 3)
    images[..., 0], images[..., 1], images[..., 2] = 0.2, 0.5, 0.7
    masks = torch.ones(16, H, W)
    n = pts / pts.norm(dim=-1, keepdim=True)
    col = sample_point_colors(pts, n, images, masks, cams)
    torch.testing.assert_close(col, torch.tensor([0.2, 0.5, 0.7]).expand(150, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no point"):
        sample_point_colors(pts + 5.0, n, images, masks, cams)


def test_init_gaussians_matches_truth_colours_and_orientation():
    subject, truth = rig_scene(2)
    cfg = _small_config()
    g = init_gaussians(subject, cfg)
    assert g.num_gaussians == 200
    torch.testing.assert_close(g.means, subject.points)
    # on the half of the sphere the rig sees (cameras at +z), the sampled colours follow the truth
    seen = subject.points[:, 2] > 0.02
    err = (g.dc_colors - truth.dc_colors).abs()[seen]
    assert float(err.median()) < 0.1
    a, b = g.dc_colors[seen].flatten(), truth.dc_colors[seen].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9
    # the short axis (third) of each disc is the outward normal
    R = g.covariances  # smallest eigenvector = normal
    _, vecs = torch.linalg.eigh(R.double())
    radial = subject.points / subject.points.norm(dim=-1, keepdim=True)
    assert float((vecs[..., 0].float() * radial).sum(-1).abs().median()) > 0.9


def test_view_schedule_is_a_permutation_per_epoch():
    views = [view_for_step(3, 1, s, 15) for s in range(30)]
    assert sorted(views[:15]) == list(range(15)) and sorted(views[15:]) == list(range(15))
    assert views[:15] != views[15:]
    assert [view_for_step(3, 2, s, 15) for s in range(15)] != views[:15]  # per subject
    assert train_views(16, 8) == [c for c in range(16) if c != 8]
    with pytest.raises(ValueError, match="holdout_view"):
        train_views(4, 8)


def test_fitting_a_known_scene_increases_psnr():
    subject, _ = rig_scene(3)
    cfg = FitConfig(iterations=60, batch_size=1, tile_size=4, normal_neighbours=8, means_lr=1.6e-3,
                    sh0_lr=1e-2, init_opacity=0.5)
    res = fit_subjects([subject], cfg, backend="torch", progress=False)
    init, final = float(res.init_train_psnr[0]), float(res.train_psnr[0])
    assert final > init + 4.0, (init, final)
    assert float(res.heldout_psnr[0]) > init + 3.0
    assert res.loss_history.shape == (1, 60) and torch.isfinite(res.loss_history).all()
    assert float(res.loss_history[0, -10:].mean()) < float(res.loss_history[0, :10].mean())
    # fixed K, Gaussians stay near their anchors
    assert res.gaussians.batch_shape == (1,) and res.gaussians.num_gaussians == 200
    assert float(res.drift.max()) < 0.02


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, one_thread):
    subjects = [rig_scene(4)[0], rig_scene(5)[0]]
    cfg = _small_config()
    ref = fit_subjects(subjects, cfg, backend="torch", progress=False)

    class Stop(Exception):
        pass

    def stop_in_second_subject(info):
        if info["batch_start"] == 1 and info["step"] == 3:
            raise Stop

    ck = tmp_path / "ck"
    with pytest.raises(Stop):
        fit_subjects(subjects, cfg, backend="torch", checkpoint=ck, progress=False, callback=stop_in_second_subject)
    state = checkpoint_state(ck)
    assert (state["num_done"], state["batch_start"], state["step"]) == (1, 1, 2)  # last checkpoint: step 2
    assert sorted(p.name for p in ck.iterdir()) == [CHECKPOINT_FILE]  # one file, no leftovers
    res = fit_subjects(subjects, cfg, backend="torch", checkpoint=ck, progress=False)
    for name, v in ref.gaussians.parameters().items():
        torch.testing.assert_close(getattr(res.gaussians, name), v, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(res.loss_history, ref.loss_history, atol=0, rtol=0)
    torch.testing.assert_close(res.train_psnr, ref.train_psnr, atol=0, rtol=0)
    torch.testing.assert_close(res.init_train_psnr, ref.init_train_psnr, atol=0, rtol=0)
    # a finished checkpoint returns the same result without fitting again
    again = fit_subjects(subjects, cfg, backend="torch", checkpoint=ck, progress=False,
                         callback=lambda info: pytest.fail("should not optimise again"))
    torch.testing.assert_close(again.gaussians.means, ref.gaussians.means, atol=0, rtol=0)
    # another config never silently reuses or overwrites the checkpoint
    with pytest.raises(ValueError, match=r"another fit \(config iterations: this call 4, the checkpoint 6\).*overwrite=True"):
        fit_subjects(subjects, _small_config(iterations=4), backend="torch", checkpoint=ck, progress=False)
    fresh = fit_subjects(subjects, _small_config(iterations=4), backend="torch", checkpoint=ck, overwrite=True,
                         progress=False)
    assert fresh.loss_history.shape == (2, 4)


def test_batched_fit_equals_one_subject_at_a_time():
    subjects = [rig_scene(6)[0], rig_scene(7)[0]]
    one = fit_subjects(subjects, _small_config(iterations=4, batch_size=1), backend="torch", progress=False)
    two = fit_subjects(subjects, _small_config(iterations=4, batch_size=2), backend="torch", progress=False)
    torch.testing.assert_close(two.gaussians.means, one.gaussians.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(two.gaussians.sh, one.gaussians.sh, atol=1e-5, rtol=0)
    torch.testing.assert_close(two.train_psnr, one.train_psnr, atol=1e-3, rtol=0)


def test_fit_result_save_load_roundtrip(tmp_path):
    res = fit_subjects([rig_scene(8)[0]], _small_config(iterations=2), backend="torch", progress=False)
    p = res.save(tmp_path / "fits.safetensors")
    back = FitResult.load(p)
    assert back.subject_ids == res.subject_ids and back.config == res.config
    for name, v in res.gaussians.parameters().items():
        torch.testing.assert_close(getattr(back.gaussians, name), v, atol=0, rtol=0)
    torch.testing.assert_close(back.drift, res.drift)
    assert set(back.table()[0]) >= {"train_psnr", "heldout_psnr", "drift_mean_mm"}
    with pytest.raises(FileExistsError, match="overwrite"):
        res.save(p)
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        FitResult.load(Path(tmp_path) / "missing.safetensors")
    good = p.read_bytes()
    p.write_bytes(good[:100])  # a truncated file (an interrupted copy)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FitResult.load(p)
    p.write_bytes(good[:-30])  # cut in the tensors, the header intact
    with pytest.raises(ValueError, match=f"{p}: not a readable safetensors file.*notebook 02"):
        FitResult.load(p)
    from safetensors.torch import save_file

    save_file({"anchors": torch.zeros(1, 3)}, str(p), {"format": "fastavatar-nb fits v2"})  # right tag, wrong content
    with pytest.raises(ValueError, match=f"{p}: a fastavatar-nb fits v2 file without its 'subject_ids', 'config'"):
        FitResult.load(p)
    save_file({"anchors": torch.zeros(1, 3)}, str(p), {"format": "fastavatar-nb fits v2", "subject_ids": "[]",
                                                       "config": "{}"})
    with pytest.raises(ValueError, match=r"a fastavatar-nb fits v2 file without the tensors \['gaussians.means'"):
        FitResult.load(p)


def test_fit_config_rejects_bad_values():
    with pytest.raises(ValueError, match="iterations"):
        FitConfig(iterations=0).validate()
    with pytest.raises(ValueError, match="ssim_lambda"):
        FitConfig(ssim_lambda=2.0).validate()
    with pytest.raises(ValueError, match="unknown fields"):
        FitConfig.from_dict({"iterations": 3, "learning_rate": 1.0})
    cfg = FitConfig(iterations=500, sh_degree=3)
    assert [cfg.degree_at(s) for s in (0, 99, 100, 300, 499)] == [0, 0, 1, 3, 3]
    assert cfg.means_lr_at(0) == pytest.approx(1e-2 * 0.1)      # a short run: SHORT_RUN_LRS
    assert cfg.means_lr_at(499) == pytest.approx(1e-4 * 0.1)
    long = FitConfig(iterations=5000)
    assert long.means_lr_at(0) == pytest.approx(1.6e-4 * 0.1)   # gsplat's rates, decaying by 100x
    assert long.means_lr_at(4999) == pytest.approx(1.6e-6 * 0.1)
    with pytest.raises(ValueError, match="scales_lr"):
        FitConfig(scales_lr=-1.0).validate()


def test_dc_init_helper_is_consistent():
    # rgb_to_sh0 is what init uses: a constant-colour scene initialises to that colour exactly
    subject, _ = rig_scene(9)
    img = torch.ones_like(subject.images) * torch.tensor([0.3, 0.6, 0.9])
    s2 = MultiViewSubject("c", img, subject.masks, subject.cameras, subject.points)
    g = init_gaussians(s2, _small_config())
    torch.testing.assert_close(g.sh[:, 0], rgb_to_sh0(torch.tensor([0.3, 0.6, 0.9])).expand(200, 3),
                               atol=1e-4, rtol=0)


def test_no_evaluation():
    subject, _ = rig_scene(11)
    res = fit_subjects([subject], _small_config(iterations=2, evaluate=False), backend="torch", progress=False)
    assert torch.isnan(res.train_psnr).all() and torch.isnan(res.init_train_psnr).all()
    assert torch.isnan(res.heldout_psnr_head).all()
    assert torch.isfinite(res.loss_history).all()


def test_the_presets_fit_config():
    from fastavatar_nb import presets

    p = presets.get("smoke")
    cfg = p.fit
    assert (cfg.iterations, cfg.batch_size, cfg.seed) == (200, 4, p.seed)
    assert p.replace(seed=5).fit.seed == 5  # one seed decides the run
    assert cfg.learning_rates() == SHORT_RUN_LRS
    # the rates follow the run's length, also when the preset's iterations are overridden
    assert p.fit.replace(iterations=5000).learning_rates() == LONG_RUN_LRS
    assert presets.base("full").replace(device="cpu", backend="torch").fit.replace(iterations=300).learning_rates() == SHORT_RUN_LRS
    assert FitConfig().learning_rates() == SHORT_RUN_LRS  # a plain config: 200 steps, short-run rates
    assert FitConfig(iterations=5000, means_lr=1e-3).learning_rates() == {**LONG_RUN_LRS, "means_lr": 1e-3}


def test_fit_loss_is_the_objective_the_loop_minimises():
    from fastavatar_nb.fitting import fit_loss
    from fastavatar_nb.metrics import ssim

    subject, _ = rig_scene(4, K=120)
    cfg = FitConfig(iterations=1, batch_size=1, tile_size=4, evaluate=False, position_reg_weight=2.0)
    result = fit_subjects([subject], cfg, backend="torch", progress=False)
    tv = train_views(subject.num_views, cfg.holdout_view)
    v = tv[view_for_step(cfg.seed, 0, 0, len(tv))]                           # the view of step 0
    cam = Cameras(subject.cameras.viewmats[[v]][None], subject.cameras.Ks[[v]][None], RIG_W, RIG_H)
    gt = subject.images[v][None, None]
    init = Gaussians.stack([init_gaussians(subject, cfg)])                   # [1, K]
    moved = init.clone()
    moved.means = moved.means + 0.01                                          # 1 cm from every anchor
    lib = fit_loss(moved, cam, gt, subject.points[None], cfg, step=0, backend="torch")
    pred = lib.colors[0, 0]
    by_hand = ((1 - cfg.ssim_lambda) * (pred - gt[0, 0]).abs().mean()
               + cfg.ssim_lambda * (1 - ssim(pred, gt[0, 0], padding="same"))
               + cfg.position_reg_weight * 3 * 0.01 ** 2 / cfg.scene_scale ** 2)
    torch.testing.assert_close(lib.loss[0], by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lib.position[0], torch.tensor(3 * 0.01 ** 2 / cfg.scene_scale ** 2), rtol=1e-4, atol=0)
    # the loop's first recorded loss is fit_loss of the initial Gaussians at that view
    first = fit_loss(init, cam, gt, subject.points[None], cfg, step=0, backend="torch").loss[0]
    torch.testing.assert_close(result.loss_history[0, 0], first.detach())
