"""The shared objective: whole-image loss and scores, the head region, the photo-on-white rule."""

from __future__ import annotations

import pytest
import torch

from fastavatar_nb.cameras import Cameras, intrinsics, look_at_viewmat
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.metrics import image_loss, mae, psnr
from fastavatar_nb.objective import (
    COLLAR_Y,
    HOLDOUT_VIEW,
    NotOnWhiteError,
    check_on_white,
    evaluate_views,
    head_region,
    photometric_loss,
    subject_ids,
    train_views,
)

W, H = 20, 30


def _frontal(distance: float = 1.0, height: float = 0.0) -> Cameras:
    """A camera at ``(0, height, distance)`` looking horizontally at ``(0, height, 0)``."""
    vm = look_at_viewmat(torch.tensor([[0.0, height, distance]]), torch.tensor([[0.0, height, 0.0]]))
    K = intrinsics(40.0, 40.0, W / 2, H / 2)[None]
    return Cameras(vm, K, W, H)


def test_head_region_is_the_mask_above_the_collar_line():
    cam = _frontal(distance=1.0)
    masks = torch.ones(1, H, W)
    region = head_region(masks, cam)
    # the horizontal ray through row v meets the plane z = 0 at y = -(v + 0.5 - cy) / fy (image rows run down)
    y = -(torch.arange(H) + 0.5 - H / 2) / 40.0
    expected = (y > COLLAR_Y).float()[:, None].expand(H, W)
    torch.testing.assert_close(region[0], expected)
    assert 0 < float(expected.mean()) < 1                       # the line crosses this image
    # the mask multiplies: background stays 0, a soft edge stays soft
    soft = torch.full((1, H, W), 0.25)
    torch.testing.assert_close(head_region(soft, cam), 0.25 * expected[None])
    # a camera higher up sees the same world line at the same depth (it only moves in the image)
    up = head_region(masks, _frontal(distance=1.0, height=0.05))
    y_up = 0.05 - (torch.arange(H) + 0.5 - H / 2) / 40.0
    torch.testing.assert_close(up[0], (y_up > COLLAR_Y).float()[:, None].expand(H, W))
    with pytest.raises(ValueError, match="masks are"):
        head_region(torch.ones(1, H + 1, W), cam)


def test_head_region_on_the_rig_keeps_the_face_and_drops_the_shirt():
    rig = Cameras.nersemble_rig(69, 101)
    region = head_region(torch.ones(16, 101, 69), rig)
    assert region.shape == (16, 101, 69)
    for c in range(16):
        rows = region[c].mean(1)
        assert rows[:40].min() == 1.0 and rows[-5:].max() == 0.0   # top of the frame: head; bottom: below the collar


def test_check_on_white():
    img = torch.ones(H, W, 3)
    img[5:25, 5:15] = 0.3                                        # a subject in the middle
    assert check_on_white(img) == 1.0
    shirt = img.clone()
    shirt[-1] = 0.2                                              # a shirt on the bottom edge is fine
    assert check_on_white(shirt) == pytest.approx(1 - W / (2 * W + 2 * (H - 2)))
    grey = torch.full((H, W, 3), 0.5)
    with pytest.raises(NotOnWhiteError, match="photo is not on a white background: 0% of its border"):
        check_on_white(grey, "the photo")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        check_on_white(torch.ones(H, W))


def test_photometric_loss_whole_image_and_weights():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(2, H, W, 3, generator=g), torch.rand(2, H, W, 3, generator=g)
    whole = photometric_loss(pred, gt, None, 0.6, 0.3)
    ref = image_loss(pred, gt, 0.6, 0.3)
    for k in ("l1", "ssim", "total"):
        torch.testing.assert_close(whole[k], ref[k])
    # zero weights: the prediction shows the ground truth, no loss and no gradient
    p = pred.clone().requires_grad_(True)
    none = photometric_loss(p, gt, torch.zeros(2, H, W), 0.6, 0.3)
    torch.testing.assert_close(none["total"], torch.zeros(2), atol=1e-6, rtol=0)
    none["total"].sum().backward()
    assert float(p.grad.abs().max()) == 0.0
    # weights on the left half: only those pixels get gradient
    p.grad = None
    w = torch.zeros(2, H, W)
    w[..., : W // 2] = 1.0
    photometric_loss(p, gt, w, 0.6, 0.3)["total"].sum().backward()
    assert float(p.grad[..., W // 2 + 6:, :].abs().max()) == 0.0 and float(p.grad[..., : W // 2, :].abs().max()) > 0


def test_evaluate_views_whole_image_and_head():
    cams = Cameras.nersemble_rig(W, H)[[0, 8]]
    cams = Cameras(cams.viewmats[None], cams.Ks[None], W, H)     # [S=1, C=2]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 2, H, W, 3, generator=g)
    empty = Gaussians.from_points(torch.zeros(1, 1, 3) + 10.0, scale=1e-4, opacity=0.01)  # renders white
    head = torch.zeros(1, 2, H, W)
    head[..., :10, :] = 1.0
    m = evaluate_views(empty, images, cams, [1, 0], head, backend="torch", tile_size=4)
    assert set(m) == {"psnr", "ssim", "mae", "psnr_head", "ssim_head", "mae_head"}
    white = torch.ones_like(images)
    # whole image first, in the order asked for
    torch.testing.assert_close(m["mae"][0], mae(white, images)[0, [1, 0]])
    torch.testing.assert_close(m["psnr"][0], psnr(white, images)[0, [1, 0]])
    # the head score averages the head rows only
    torch.testing.assert_close(m["mae_head"][0], (1 - images[0, [1, 0], :10]).mean((-3, -2, -1)))
    assert set(evaluate_views(empty, images, cams, [0], backend="torch", tile_size=4)) == {"psnr", "ssim", "mae"}


def test_views_and_ids():
    assert HOLDOUT_VIEW == 8
    assert train_views(16) == [c for c in range(16) if c != 8]
    assert train_views(4, None) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="holdout_view 8 does not exist"):
        train_views(4)

    class S:
        def __init__(self, sid):
            self.subject_id = sid

    assert subject_ids([S("a"), S("b")], "x") == ["a", "b"]
    with pytest.raises(ValueError, match="fit_subjects: subject ids must be unique, repeated: \\['a'\\]"):
        subject_ids([S("a"), S("a")], "fit_subjects")


def test_config_field_checks_name_the_field_and_what_it_must_be():
    from fastavatar_nb.decoder import DecoderConfig
    from fastavatar_nb.encoder import EncoderConfig
    from fastavatar_nb.fitting import FitConfig
    from fastavatar_nb.refine import RefineConfig

    cases = [
        (FitConfig(tile_size=0), r"FitConfig.tile_size must be None or a positive int, got 0"),
        (FitConfig(scales_lr=float("nan")), r"FitConfig.scales_lr must be None or a non-negative number, got nan"),
        (FitConfig(init_scale=0.0), r"FitConfig.init_scale must be a positive number, got 0.0"),
        (DecoderConfig(views_per_step=True), r"DecoderConfig.views_per_step must be a positive int, got True"),
        (DecoderConfig(lr_final=-1.0), r"DecoderConfig.lr_final must be a positive number, got -1.0"),
        (EncoderConfig(batch_size=2.5), r"EncoderConfig.batch_size must be a positive int, got 2.5"),
        (RefineConfig(grad_clip=float("inf")), r"RefineConfig.grad_clip must be a non-negative number, got inf"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            config.validate()
    FitConfig(tile_size=None, scales_lr=None).validate()     # None is allowed where documented
    DecoderConfig(tile_size=8).validate()
