"""``render(gaussians, cameras)``: one entry point, two interchangeable backends.

- ``"torch"``: :mod:`~fastavatar_nb.render.torch_rasterizer`, pure PyTorch, CPU or GPU.
- ``"gsplat"``: ``gsplat.rasterization``, CUDA only, much faster.
- ``"auto"``: gsplat when CUDA and working gsplat kernels are present, else torch; the
  choice and its reason are logged once.

Both follow gsplat's conventions: SH colour ``+0.5`` clamped at 0, premultiplied alpha
composited as ``colors + (1 - alpha) * background``, EWA projection with a 0.3 px
low-pass, near-plane culling at 0.01.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..cameras import Cameras
from ..gaussians import Gaussians
from .gsplat_backend import gsplat_status, rasterize_gsplat
from .torch_rasterizer import rasterize as rasterize_torch

__all__ = ["Backend", "DEFAULT_TILE_SIZE", "RenderOutput", "render", "resolve_backend", "composite"]

Backend = Literal["auto", "torch", "gsplat"]
_BACKENDS = ("auto", "torch", "gsplat")
log = logging.getLogger("fastavatar_nb.render")
_announced: set[tuple[str, str]] = set()
DEFAULT_TILE_SIZE: dict[str, int | None] = {"torch": None, "gsplat": 16}
"""Tile edge in pixels per backend when ``render(tile_size=None)``; ``None``: the torch
rasterizer picks 4, 8 or 16 from the Gaussians' screen size (``torch_rasterizer.auto_tile_size``)."""


@dataclass
class RenderOutput:
    """What :func:`render` returns.

    Attributes:
        colors: ``[..., C, H, W, 3]`` composited on the background.
        alphas: ``[..., C, H, W]`` accumulated opacity.
        depths: ``[..., C, H, W]`` expected camera-space depth (0 where alpha is 0).
        backend: the backend that rendered (``"torch"`` or ``"gsplat"``).
    """

    colors: Tensor
    alphas: Tensor
    depths: Tensor
    backend: str


def resolve_backend(backend: Backend = "auto", device: torch.device | str = "cpu") -> str:
    """Turn ``"auto"`` into a concrete backend for ``device`` and check an explicit choice.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"gsplat"`` asked for where it cannot run (the message says why).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; choose one of {_BACKENDS}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        if backend == "gsplat":
            raise RuntimeError(
                f"backend='gsplat' needs a CUDA device, but the Gaussians are on {device}. "
                "Move them with .to('cuda') or use backend='torch' (runs anywhere)."
            )
        choice, why = "torch", f"data on {device}; gsplat needs CUDA"
    else:
        ok, why = gsplat_status()
        if backend == "gsplat" and not ok:
            raise RuntimeError(f"backend='gsplat' is unavailable: {why}. Use backend='torch'.")
        choice = "gsplat" if ok else "torch"
    key = (choice, why)
    if backend == "auto" and key not in _announced:
        _announced.add(key)
        log.info("render: using the %s backend (%s)", choice, why)
    return choice


def composite(colors: Tensor, alphas: Tensor, background: Tensor) -> Tensor:
    """Premultiplied colours over a background: ``colors + (1 - alphas) * background``."""
    return colors + (1.0 - alphas)[..., None] * background


def _background(background, batch_shape: torch.Size, dtype, device) -> Tensor:
    if background is None:
        return torch.zeros(3, dtype=dtype, device=device)
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.ndim == 0:
        bg = bg.expand(3)
    if bg.shape[-1] != 3:
        raise ValueError(f"background must be a scalar, [3] or [..., C, 3], got shape {tuple(bg.shape)}")
    try:
        torch.broadcast_shapes(bg.shape[:-1], batch_shape)
    except RuntimeError as e:
        raise ValueError(f"background of shape {tuple(bg.shape)} does not broadcast to cameras {tuple(batch_shape)}") from e
    return bg[..., None, None, :]  # [..., C, 1, 1, 3]


def render(gaussians: Gaussians, cameras: Cameras, background: float | Tensor | tuple | None = 1.0,
           backend: Backend = "auto", sh_degree: int = 3, tile_size: int | None = None) -> RenderOutput:
    """Render Gaussians from cameras.

    Batching: the Gaussians' batch shape broadcasts with the cameras' leading shape (all but
    the camera dimension). ``Gaussians [S, K]`` with ``Cameras [C]`` renders every subject
    from the same C cameras; with ``Cameras [S, C]`` each subject from its own.

    Args:
        gaussians: raw parameters, any batch shape ``[...]``.
        cameras: ``[..., C]`` cameras on the same device.
        background: RGB composited behind (premultiplied): scalar, ``[3]`` or ``[..., C, 3]``;
            default white (NeRSemble's); ``None`` for black.
        backend: ``"auto"``, ``"torch"`` or ``"gsplat"``.
        sh_degree: highest SH band used (0-3).
        tile_size: tile edge in pixels; default :data:`DEFAULT_TILE_SIZE` of the backend (gsplat
            16; torch: chosen from the Gaussians' screen size, because its cost grows with tile
            area times overlaps, see ``benchmarks/render.py``).

    Returns:
        :class:`RenderOutput` with ``colors [..., C, H, W, 3]``, ``alphas`` and ``depths``
        ``[..., C, H, W]``.
    """
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"render expects a Gaussians, got {type(gaussians).__name__}")
    if not isinstance(cameras, Cameras):
        raise TypeError(f"render expects a Cameras, got {type(cameras).__name__}")
    if sh_degree not in (0, 1, 2, 3):
        raise ValueError(f"sh_degree must be 0..3, got {sh_degree}")
    if tile_size is not None and tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    gaussians.validate(check_values=True)
    if cameras.device != gaussians.device:
        raise ValueError(f"cameras are on {cameras.device} but the Gaussians on {gaussians.device}; move one of them")
    focal = torch.stack([cameras.Ks[..., 0, 0], cameras.Ks[..., 1, 1]], -1)
    if not (focal > 0).all():
        raise ValueError("camera intrinsics must have positive focal lengths (Ks[..., 0, 0] and Ks[..., 1, 1])")
    name = resolve_backend(backend, gaussians.device)
    tile_size = tile_size or DEFAULT_TILE_SIZE[name]
    if name == "gsplat" and tile_size is None:
        tile_size = 16

    gb = gaussians.batch_shape
    cb = cameras.viewmats.shape[:-3]
    try:
        batch = torch.broadcast_shapes(gb, cb)
    except RuntimeError as e:
        raise ValueError(
            f"Gaussians with batch shape {tuple(gb)} cannot be rendered with cameras of leading shape {tuple(cb)}: "
            "the shapes must broadcast (e.g. Gaussians [S, K] with Cameras [C] or [S, C])"
        ) from e
    K, C = gaussians.num_gaussians, len(cameras)
    B = int(torch.Size(batch).numel())
    dtype = gaussians.dtype

    def flat(t: Tensor, tail: tuple[int, ...]) -> Tensor:
        return t.expand(*batch, *tail).reshape(B, *tail)

    means = flat(gaussians.means, (K, 3))
    quats = flat(gaussians.quats, (K, 4))
    scales = flat(gaussians.scales, (K, 3))
    opac = flat(gaussians.opacities, (K,))
    sh = flat(gaussians.sh, (K, 16, 3))
    viewmats = flat(cameras.viewmats.to(dtype), (C, 4, 4))
    Ks = flat(cameras.Ks.to(dtype), (C, 3, 3))
    W, H = cameras.width, cameras.height
    if name == "gsplat":
        rgb, alpha, depth = rasterize_gsplat(means.contiguous(), quats.contiguous(), scales.contiguous(),
                                             opac.contiguous(), sh.contiguous(), viewmats.contiguous(),
                                             Ks.contiguous(), W, H, sh_degree=sh_degree, tile_size=tile_size)
    else:
        rgb, alpha, depth = rasterize_torch(means, quats, scales, opac, sh, viewmats, Ks, W, H,
                                            sh_degree=sh_degree, tile_size=tile_size)
    out_shape = (*batch, C, H, W)
    rgb, alpha, depth = rgb.reshape(*out_shape, 3), alpha.reshape(out_shape), depth.reshape(out_shape)
    bg = _background(background, torch.Size((*batch, C)), dtype, rgb.device)
    return RenderOutput(composite(rgb, alpha, bg), alpha, depth, name)
