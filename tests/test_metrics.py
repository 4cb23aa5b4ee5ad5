"""Metrics against independent float64 computations and analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastavatar_nb import metrics
from fastavatar_nb.metrics import SSIM_C1, SSIM_C2, image_loss, mae, psnr, ssim, ssim_map


def _ssim_direct(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5, same: bool = False) -> float:
    """Textbook SSIM in float64: explicit 2D Gaussian window, a loop over every window position."""
    half = size // 2
    g1 = np.array([math.exp(-((i - half) ** 2) / (2 * sigma ** 2)) for i in range(size)])
    w = np.outer(g1, g1)
    w /= w.sum()
    if same:
        a = np.pad(a, ((half, half), (half, half), (0, 0)))
        b = np.pad(b, ((half, half), (half, half), (0, 0)))
    H, W, _ = a.shape
    vals = []
    for c in range(3):
        for i in range(H - size + 1):
            for j in range(W - size + 1):
                pa, pb = a[i:i + size, j:j + size, c], b[i:i + size, j:j + size, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = (w * (pa - ma) ** 2).sum()
                vb = (w * (pb - mb) ** 2).sum()
                cab = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + SSIM_C1) * (2 * cab + SSIM_C2))
                            / ((ma ** 2 + mb ** 2 + SSIM_C1) * (va + vb + SSIM_C2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("same", [False, True])
def test_ssim_matches_direct_float64(same):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(14, 17, 3, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(14, 17, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    want = _ssim_direct(a.numpy(), b.numpy(), same=same)
    got = ssim(a, b, padding="same" if same else "valid")
    assert abs(float(got) - want) < 1e-10
    # float32 agrees to float32 precision
    got32 = ssim(a.float(), b.float(), padding="same" if same else "valid")
    assert abs(float(got32) - want) < 1e-5


def test_ssim_identity_and_constant_images():
    x = torch.rand(2, 3, 20, 20, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(x, x), torch.ones(2, 3))
    # constant images: variances and covariance vanish, only the luminance term remains
    c1, c2 = 0.3, 0.7
    a = torch.full((16, 16, 3), c1, dtype=torch.float64)
    b = torch.full((16, 16, 3), c2, dtype=torch.float64)
    want = (2 * c1 * c2 + SSIM_C1) / (c1 ** 2 + c2 ** 2 + SSIM_C1)
    assert abs(float(ssim(a, b)) - want) < 1e-12
    # map shape for 'valid' windows
    assert ssim_map(a, b).shape == (6, 6, 3)


def test_ssim_batched_equals_single_and_is_differentiable():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 12, 13, 3, generator=g, dtype=torch.float64)
    b = torch.rand(2, 3, 12, 13, 3, generator=g, dtype=torch.float64)
    batched = ssim(a, b)
    assert batched.shape == (2, 3)
    assert abs(float(batched[1, 2]) - float(ssim(a[1, 2], b[1, 2]))) < 1e-14
    a1 = a[0, 0, :11, :11].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ssim(x, b[0, 0, :11, :11]), (a1,))
    a2 = a[0, 0, :6, :7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ssim(x, b[0, 0, :6, :7], window_size=3, padding="same"), (a2,))


def test_ssim_rejects_bad_inputs():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(8, 8, 3), torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.rand(16, 16, 3), torch.rand(16, 17, 3))
    with pytest.raises(ValueError, match="padding"):
        ssim(torch.rand(16, 16, 3), torch.rand(16, 16, 3), padding="reflect")


def test_psnr_and_mae_known_values():
    a = torch.zeros(2, 8, 10, 3)
    b = torch.full((2, 8, 10, 3), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))
    torch.testing.assert_close(mae(a, b), torch.full((2,), 0.1))
    assert torch.isinf(psnr(a, a)).all()
    # masked: error of 0.1 inside the mask, a large error outside it is ignored
    c = b.clone()
    c[:, :, 5:] = 1.0
    mask = torch.zeros(8, 10)
    mask[:, :5] = 1.0
    torch.testing.assert_close(psnr(a, c, mask), torch.full((2,), 20.0))
    torch.testing.assert_close(mae(a, c, mask), torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="empty"):
        psnr(a, c, torch.zeros(8, 10))
    with pytest.raises(ValueError, match="mask"):
        psnr(a, c, torch.ones(8, 9))


def test_psnr_gradient():
    a = torch.rand(6, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    b = torch.rand(6, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda x: psnr(x, b), (a,))


def test_image_loss_terms():
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(3, 16, 16, 3, generator=g), torch.rand(3, 16, 16, 3, generator=g)
    out = image_loss(a, b, l1_weight=0.6, ssim_weight=0.3)
    assert set(out) == {"l1", "ssim", "total"}
    torch.testing.assert_close(out["l1"], (a - b).abs().mean((-3, -2, -1)))
    torch.testing.assert_close(out["ssim"], ssim(a, b, padding="same"))
    torch.testing.assert_close(out["total"], 0.6 * out["l1"] + 0.3 * (1 - out["ssim"]))
    assert float(image_loss(a, a)["total"].abs().max()) < 1e-6
    with pytest.raises(ValueError, match="ssim_weight"):
        image_loss(a, b, ssim_weight=-1.0)


@pytest.mark.skipif(metrics.lpips_available(), reason="LPIPS weights are present on this machine")
def test_lpips_reports_unavailable():
    a = torch.rand(16, 16, 3)
    with pytest.raises(metrics.LpipsUnavailableError, match="unavailable"):
        metrics.lpips(a, a)
    with pytest.raises(metrics.LpipsUnavailableError):
        image_loss(a, a, lpips_weight=0.1)
    with pytest.raises(ValueError, match="net"):
        metrics.lpips_available("squeeze")


@pytest.mark.skipif(not metrics.lpips_available(), reason="LPIPS package or backbone weights not on disk")
def test_lpips_identity_is_zero():
    a = torch.rand(2, 32, 32, 3)
    assert float(metrics.lpips(a, a).abs().max()) < 1e-6
    assert float(metrics.lpips(a, 1 - a).min()) > 0.05


def test_ssim_mask_weights_the_map():
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(2, 20, 24, 3, generator=g), torch.rand(2, 20, 24, 3, generator=g)
    smap = ssim_map(a, b)  # [2, 10, 14, 3]
    mask = torch.zeros(20, 24)
    mask[5:10, 5:12] = 1.0  # window centres 5..9, 5..11 -> map rows 0..4, cols 0..6
    want = smap[:, 0:5, 0:7].mean((-3, -2, -1))
    torch.testing.assert_close(ssim(a, b, mask=mask), want)
    torch.testing.assert_close(ssim(a, b, mask=torch.ones(20, 24)), ssim(a, b))
    same = ssim(a, b, padding="same", mask=mask)
    torch.testing.assert_close(same, ssim_map(a, b, padding="same")[:, 5:10, 5:12].mean((-3, -2, -1)))
