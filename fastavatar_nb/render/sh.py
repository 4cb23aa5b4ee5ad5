"""Real spherical harmonics up to degree 3 in the ordering of the reference 3DGS code and gsplat."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["eval_sh_bases", "sh_to_color"]

_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
       -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def eval_sh_bases(dirs: Tensor, degree: int = 3) -> Tensor:
    """SH basis functions at unit directions.

    Args:
        dirs: ``[..., 3]`` unit vectors (x, y, z).
        degree: 0..3; bands above it are zero.

    Returns:
        ``[..., 16]`` basis values (coefficient index ``l*l + l + m``).
    """
    if degree not in (0, 1, 2, 3):
        raise ValueError(f"sh degree must be 0, 1, 2 or 3, got {degree}")
    x, y, z = dirs.unbind(-1)
    zero = torch.zeros_like(x)
    out = [torch.full_like(x, _C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2 * zz - xx - yy), _C2[3] * xz, _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3 * yy),
        ]
    out += [zero] * (16 - len(out))
    return torch.stack(out, dim=-1)


def sh_to_color(sh: Tensor, dirs: Tensor, degree: int = 3) -> Tensor:
    """View-dependent colour, gsplat's convention: ``max(SH(dir) . coeffs + 0.5, 0)``.

    Args:
        sh: ``[..., 16, 3]`` coefficients.
        dirs: ``[..., 3]`` viewing directions (camera centre -> Gaussian), any length
            (normalised here).
        degree: bands used.

    Returns:
        ``[..., 3]`` colours, non-negative (not clamped above).
    """
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bases = eval_sh_bases(d, degree)  # [..., 16]
    return ((bases[..., :, None] * sh).sum(-2) + 0.5).clamp_min(0.0)
