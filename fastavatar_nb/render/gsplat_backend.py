"""The gsplat backend: ``gsplat.rasterization`` (CUDA) behind the same inputs and outputs."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gsplat_status", "rasterize_gsplat"]

_STATUS: tuple[bool, str] | None = None


def gsplat_status() -> tuple[bool, str]:
    """Whether gsplat can rasterize here, and why (or why not). Cached.

    Needs CUDA and gsplat's compiled kernels; gsplat 1.5 JIT-compiles them on first use
    (nvcc and ninja required, a few minutes the first time; ``TORCH_CUDA_ARCH_LIST`` narrows
    the build). A failed build is reported, never raised, so callers fall back to torch.
    """
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    if not torch.cuda.is_available():
        _STATUS = (False, "no CUDA device")
        return _STATUS
    try:
        import gsplat  # noqa: F401
    except ImportError as e:
        _STATUS = (False, f"gsplat is not installed ({e})")
        return _STATUS
    try:
        from gsplat.cuda._backend import _C
    except Exception as e:  # a JIT build can fail in many ways; report it, fall back
        _STATUS = (False, f"gsplat's CUDA kernels failed to load or build: {type(e).__name__}: {e}")
        return _STATUS
    if _C is None:
        _STATUS = (False, "gsplat's CUDA kernels could not be built (see gsplat's log above; needs nvcc + ninja)")
        return _STATUS
    _STATUS = (True, f"gsplat {gsplat.__version__} CUDA kernels loaded")
    return _STATUS


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh: Tensor,
                     viewmats: Tensor, Ks: Tensor, width: int, height: int, sh_degree: int = 3,
                     near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
                     tile_size: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`fastavatar_nb.render.torch_rasterizer.rasterize` (shapes ``[B, ...]``),
    through ``gsplat.rasterization`` with ``render_mode="RGB+ED"`` and no background."""
    from gsplat import rasterization

    colors, alphas, _ = rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=sh,
        viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=sh_degree,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size,
        packed=False, render_mode="RGB+ED",
    )
    rgb, depth = colors[..., :3], colors[..., 3]
    a = alphas[..., 0]
    depth = torch.where(a > 1e-10, depth, torch.zeros_like(depth))
    return rgb, a, depth
