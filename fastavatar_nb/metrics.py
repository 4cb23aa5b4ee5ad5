"""Image metrics and the photometric loss: PSNR, SSIM, MAE, (optional) LPIPS, ``image_loss``.

Convention (package-wide): images are float tensors ``[..., H, W, 3]`` with values in
``[0, 1]`` (data range 1), composited on the background (white for NeRSemble). Every
metric reduces over the image dimensions ``H, W, 3`` and keeps the leading dimensions, so
a batch of renders ``[S, C, H, W, 3]`` gives ``[S, C]`` values. Everything is pure PyTorch
and differentiable.

LPIPS needs ImageNet backbone weights (AlexNet or VGG) that every LPIPS package downloads
at run time. Where they are not on disk (this project's machines and CI have no internet)
LPIPS is reported as *unavailable* (:func:`lpips_available` is ``False`` and :func:`lpips`
raises :class:`LpipsUnavailableError`); it is never replaced by a stand-in.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LpipsUnavailableError", "psnr", "mse", "ssim", "ssim_map", "mae", "lpips_available", "lpips",
    "image_loss", "gaussian_window",
]

Padding = Literal["valid", "same"]
LpipsNet = Literal["alex", "vgg"]

SSIM_C1 = 0.01 ** 2
"""Luminance stabiliser ``(K1 * L)^2`` with ``K1 = 0.01`` and data range ``L = 1`` (Wang et al. 2004)."""
SSIM_C2 = 0.03 ** 2
"""Contrast/structure stabiliser ``(K2 * L)^2`` with ``K2 = 0.03`` and ``L = 1``."""


def _check_pair(a: Tensor, b: Tensor, name: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{name}: images must be torch.Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"{name}: images must be [..., H, W, 3], got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def _check_mask(mask: Tensor, a: Tensor, name: str) -> Tensor:
    """Mask ``[..., H, W]`` (or ``[..., H, W, 1]``) -> ``[..., H, W, 1]`` float, broadcast to ``a``'s lead."""
    if mask.ndim == a.ndim and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape[-2:] != a.shape[-3:-1]:
        raise ValueError(f"{name}: mask must be [..., H, W] with H, W = {tuple(a.shape[-3:-1])}, got {tuple(mask.shape)}")
    return mask.to(a.dtype)[..., None]


def mse(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per image.

    Args:
        a, b: ``[..., H, W, 3]`` images.
        mask: optional ``[..., H, W]`` weights in [0, 1] (broadcastable over the leading dims);
            the error is averaged over masked pixels only (weighted mean).

    Returns:
        ``[...]`` mean squared error.
    """
    _check_pair(a, b, "mse")
    se = (a - b) ** 2
    if mask is None:
        return se.mean(dim=(-3, -2, -1))
    m = _check_mask(mask, a, "mse")
    num = (se * m).sum(dim=(-3, -2, -1))
    den = (m.expand_as(se)).sum(dim=(-3, -2, -1))
    if (den <= 0).any():
        raise ValueError("mse: the mask is empty (all zero) for at least one image")
    return num / den


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB for data range 1: ``-10 log10(MSE)``, per image.

    Args:
        a, b: ``[..., H, W, 3]`` images in [0, 1].
        mask: optional ``[..., H, W]`` weights; the MSE is the weighted mean over masked pixels.

    Returns:
        ``[...]`` PSNR in dB (``inf`` for identical images).
    """
    return -10.0 * torch.log10(mse(a, b, mask))


def mae(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error per image (the paper's MAE): ``[..., H, W, 3] -> [...]``.

    ``mask`` as in :func:`mse`.
    """
    _check_pair(a, b, "mae")
    ae = (a - b).abs()
    if mask is None:
        return ae.mean(dim=(-3, -2, -1))
    m = _check_mask(mask, a, "mae")
    den = m.expand_as(ae).sum(dim=(-3, -2, -1))
    if (den <= 0).any():
        raise ValueError("mae: the mask is empty (all zero) for at least one image")
    return (ae * m).sum(dim=(-3, -2, -1)) / den


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """Normalised 1D Gaussian window ``[size]`` (sums to 1), centred on the middle tap."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"gaussian_window: size must be a positive odd integer, got {size}")
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: Tensor, win: Tensor, padding: Padding) -> Tensor:
    """Separable Gaussian filter of ``x [N, C, H, W]`` with the 1D window ``win [k]``."""
    k = win.numel()
    C = x.shape[1]
    pad = k // 2 if padding == "same" else 0
    wx = win.view(1, 1, 1, k).expand(C, 1, 1, k)
    wy = win.view(1, 1, k, 1).expand(C, 1, k, 1)
    x = F.conv2d(x, wx, padding=(0, pad), groups=C)
    return F.conv2d(x, wy, padding=(pad, 0), groups=C)


def ssim_map(a: Tensor, b: Tensor, window_size: int = 11, sigma: float = 1.5,
             padding: Padding = "valid") -> Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window.

    ``SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``,
    local statistics weighted by an isotropic Gaussian window (``window_size`` taps, ``sigma``),
    ``C1 = 0.01^2``, ``C2 = 0.03^2`` (data range 1), per colour channel.

    Args:
        a, b: ``[..., H, W, 3]`` images in [0, 1].
        window_size: odd window width (11 as in the paper and scikit-image's ``gaussian_weights``).
        sigma: window standard deviation in pixels.
        padding: ``"valid"`` (standard: only windows fully inside the image, output
            ``H - window_size + 1`` by ``W - window_size + 1``) or ``"same"`` (zero padding,
            output ``H x W``, as in the 3DGS training loss).

    Returns:
        ``[..., H', W', 3]`` SSIM values.
    """
    _check_pair(a, b, "ssim")
    if padding not in ("valid", "same"):
        raise ValueError(f"ssim: padding must be 'valid' or 'same', got {padding!r}")
    H, W = a.shape[-3], a.shape[-2]
    if padding == "valid" and (H < window_size or W < window_size):
        raise ValueError(f"ssim: images of {H}x{W} pixels are smaller than the {window_size}-pixel window; "
                         "use padding='same' or a smaller window_size")
    lead = a.shape[:-3]
    x = a.reshape(-1, H, W, 3).permute(0, 3, 1, 2)
    y = b.reshape(-1, H, W, 3).permute(0, 3, 1, 2)
    win = gaussian_window(window_size, sigma, dtype=a.dtype, device=a.device)
    mu_x, mu_y = _blur(x, win, padding), _blur(y, win, padding)
    sxx = _blur(x * x, win, padding) - mu_x ** 2
    syy = _blur(y * y, win, padding) - mu_y ** 2
    sxy = _blur(x * y, win, padding) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * sxy + SSIM_C2)
    den = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (sxx + syy + SSIM_C2)
    s = (num / den).permute(0, 2, 3, 1)
    return s.reshape(lead + s.shape[1:])


def ssim(a: Tensor, b: Tensor, window_size: int = 11, sigma: float = 1.5, padding: Padding = "valid",
         mask: Tensor | None = None) -> Tensor:
    """Mean SSIM per image (see :func:`ssim_map` for the definition and arguments).

    Args:
        mask: optional ``[..., H, W]`` pixel weights; the SSIM map is averaged with these weights
            (for ``padding="valid"`` each window is weighted by the mask at its centre pixel).

    Returns:
        ``[...]`` SSIM in [-1, 1]; exactly 1 for identical images.
    """
    s = ssim_map(a, b, window_size, sigma, padding)
    if mask is None:
        return s.mean(dim=(-3, -2, -1))
    m = _check_mask(mask, a, "ssim")
    if padding == "valid":
        h = window_size // 2
        m = m[..., h:m.shape[-3] - h, h:m.shape[-2] - h, :]
    den = m.expand_as(s).sum(dim=(-3, -2, -1))
    if (den <= 0).any():
        raise ValueError("ssim: the mask is empty (all zero) for at least one image")
    return (s * m).sum(dim=(-3, -2, -1)) / den


# --------------------------------------------------------------------------- LPIPS
_LPIPS_WEIGHT_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class LpipsUnavailableError(RuntimeError):
    """LPIPS cannot be computed: its package or its ImageNet backbone weights are missing."""


def _lpips_missing(net: LpipsNet) -> str | None:
    """Why LPIPS with ``net`` cannot run here, or ``None`` when it can."""
    if net not in _LPIPS_WEIGHT_FILES:
        raise ValueError(f"lpips: net must be one of {sorted(_LPIPS_WEIGHT_FILES)}, got {net!r}")
    if importlib.util.find_spec("lpips") is None:
        return "the 'lpips' package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_WEIGHT_FILES[net]
    if not weights.is_file():
        return (f"the ImageNet {net} backbone weights ({weights}) are not on disk; LPIPS packages download "
                "them at run time, which is impossible without internet access")
    return None


def lpips_available(net: LpipsNet = "alex") -> bool:
    """Whether :func:`lpips` can run: the ``lpips`` package is installed and its ImageNet backbone
    weights are already in the torch hub cache (nothing is ever downloaded)."""
    return _lpips_missing(net) is None


@functools.lru_cache(maxsize=4)
def _lpips_model(net: str, device: str):
    import lpips as lpips_pkg  # optional dependency, checked by _lpips_missing

    model = lpips_pkg.LPIPS(net=net, verbose=False).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips(a: Tensor, b: Tensor, net: LpipsNet = "alex") -> Tensor:
    """LPIPS distance per image (Zhang et al. 2018), lower is better.

    Args:
        a, b: ``[..., H, W, 3]`` images in [0, 1] (rescaled to the network's [-1, 1] here).
        net: backbone, ``"alex"`` (the usual choice for evaluation) or ``"vgg"``.

    Returns:
        ``[...]`` LPIPS distances.

    Raises:
        LpipsUnavailableError: the ``lpips`` package or its backbone weights are not present.
            LPIPS is then reported as unavailable; no substitute metric is computed.
    """
    _check_pair(a, b, "lpips")
    why = _lpips_missing(net)
    if why is not None:
        raise LpipsUnavailableError(
            f"LPIPS is unavailable: {why}. Report LPIPS as not measured (it is an optional metric); "
            "to enable it, install 'lpips' and place the backbone weights in the torch hub cache."
        )
    model = _lpips_model(net, str(a.device))
    lead, (H, W) = a.shape[:-3], a.shape[-3:-1]
    x = a.reshape(-1, H, W, 3).permute(0, 3, 1, 2) * 2 - 1
    y = b.reshape(-1, H, W, 3).permute(0, 3, 1, 2) * 2 - 1
    return model(x, y).reshape(lead)


# ---------------------------------------------------------------------------- loss
def image_loss(pred: Tensor, gt: Tensor, l1_weight: float = 0.8, ssim_weight: float = 0.2,
               lpips_weight: float = 0.0, padding: Padding = "same") -> dict[str, Tensor]:
    """Photometric loss ``l1_weight * L1 + ssim_weight * (1 - SSIM) [+ lpips_weight * LPIPS]``.

    The 3DGS default is ``l1_weight = 0.8, ssim_weight = 0.2``; the FastAvatar decoder uses
    0.6 / 0.3 / 0.1 (LPIPS only when :func:`lpips_available`).

    Args:
        pred, gt: ``[..., H, W, 3]`` images in [0, 1] (both composited on the same background).
        padding: SSIM padding (``"same"`` so border pixels receive gradient, as in 3DGS).

    Returns:
        Dict of ``[...]`` per-image tensors (nerfstudio style, each term logged on its own):
        ``"l1"``, ``"ssim"`` (the SSIM value, not the loss), ``"lpips"`` (only when weighted)
        and ``"total"`` (the weighted sum to minimise).
    """
    for name, w in (("l1_weight", l1_weight), ("ssim_weight", ssim_weight), ("lpips_weight", lpips_weight)):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"image_loss: {name} must be a finite non-negative number, got {w}")
    out: dict[str, Tensor] = {"l1": mae(pred, gt)}
    out["ssim"] = ssim(pred, gt, padding=padding)
    total = l1_weight * out["l1"] + ssim_weight * (1 - out["ssim"])
    if lpips_weight > 0:
        out["lpips"] = lpips(pred, gt)
        total = total + lpips_weight * out["lpips"]
    out["total"] = total
    return out
