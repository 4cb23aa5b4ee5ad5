"""The Gaussians container, activations, covariance and the standard 3DGS PLY layout.

Conventions (package-wide, as in gsplat):

- Parameters are stored *raw* and activated at render time: ``log_scales`` (scale =
  ``exp``), ``opacity_logits`` (opacity = ``sigmoid``), unnormalised ``quats`` in
  ``wxyz`` order (rotation = normalised quaternion).
- ``sh`` holds degree-3 spherical-harmonic coefficients ``[..., K, 16, 3]``; band 0
  (``sh[..., 0, :]``) is the DC term. Colour = ``SH(dir) + 0.5`` clamped at 0.
- Any number of leading batch dimensions: the Gaussians of S subjects are
  ``[S, K, ...]``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .ply import PlyElement, PlyError, read_ply, write_ply

__all__ = [
    "SH_C0", "Gaussians", "quat_to_rotmat", "covariance", "rgb_to_sh0", "sh0_to_rgb",
    "read_points_ply", "write_points_ply",
]

SH_C0 = 0.28209479177387814
"""Band-0 spherical-harmonic basis value: DC colour = ``SH_C0 * sh[..., 0, :] + 0.5``."""

NUM_SH = 16  # (degree 3 + 1) ** 2


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """Colour in [0, 1] -> DC coefficient such that the rendered colour equals ``rgb``."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """DC coefficient -> view-independent colour (before clamping)."""
    return sh0 * SH_C0 + 0.5


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from quaternions.

    Args:
        quats: ``[..., 4]`` in ``wxyz`` order, any non-zero norm (normalised here).

    Returns:
        ``[..., 3, 3]`` rotation matrices.
    """
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(quats.shape[:-1] + (3, 3))


def covariance(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariance ``Sigma = R S S^T R^T`` (paper section 3.1).

    Args:
        quats: ``[..., 4]`` wxyz (normalised here).
        scales: ``[..., 3]`` activated (positive) scales.

    Returns:
        ``[..., 3, 3]`` symmetric positive semi-definite covariances.
    """
    M = quat_to_rotmat(quats) * scales[..., None, :]  # R @ diag(s)
    return M @ M.transpose(-1, -2)


@dataclass
class Gaussians:
    """A set of K 3D Gaussians, optionally batched over leading dimensions.

    Attributes:
        means: ``[..., K, 3]`` centres in world units (metres).
        log_scales: ``[..., K, 3]`` log of the per-axis standard deviations.
        quats: ``[..., K, 4]`` rotations, ``wxyz``, not necessarily normalised.
        opacity_logits: ``[..., K]`` opacity before the sigmoid.
        sh: ``[..., K, 16, 3]`` SH coefficients, degree 3, DC first.
    """

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def __post_init__(self) -> None:
        self.validate(check_values=False)

    # ------------------------------------------------------------------ shape
    @property
    def batch_shape(self) -> torch.Size:
        """Leading batch dimensions (``()`` for a single set)."""
        return self.means.shape[:-2]

    @property
    def num_gaussians(self) -> int:
        """K, the number of Gaussians per set."""
        return self.means.shape[-2]

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("len() of an unbatched Gaussians; use .num_gaussians")
        return self.batch_shape[0]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def validate(self, check_values: bool = True) -> Gaussians:
        """Check shapes agree (always) and, with ``check_values``, that values are finite and
        quaternions normalisable. Raises ``ValueError`` naming the field; returns ``self``."""
        m = self.means
        if not isinstance(m, Tensor):
            raise TypeError(f"Gaussians.means must be a torch.Tensor, got {type(m).__name__} (use torch.as_tensor)")
        if not m.is_floating_point():
            raise TypeError(f"Gaussians.means must be a floating-point tensor (float32 for rendering), got {m.dtype}")
        if m.ndim < 2 or m.shape[-1] != 3:
            raise ValueError(f"Gaussians.means must be [..., K, 3], got {tuple(m.shape)}")
        lead = m.shape[:-1]
        want = {
            "log_scales": lead + (3,), "quats": lead + (4,), "opacity_logits": lead,
            "sh": lead + (NUM_SH, 3),
        }
        for name, shape in want.items():
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"Gaussians.{name} must be a torch.Tensor, got {type(t).__name__} (use torch.as_tensor)")
            if not t.is_floating_point():
                raise TypeError(f"Gaussians.{name} must be a floating-point tensor like means ({m.dtype}), got {t.dtype}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"Gaussians.{name} must have shape {tuple(shape)} to match means {tuple(m.shape)}, "
                    f"got {tuple(t.shape)}"
                )
            if t.device != m.device:
                raise ValueError(f"Gaussians.{name} is on {t.device} but means is on {m.device}; move them with .to(device)")
        if check_values:
            for t in (self.log_scales, self.quats, self.opacity_logits, self.sh):
                if t.dtype != m.dtype:
                    raise TypeError(
                        f"Gaussians fields have different dtypes ({', '.join(f'{f.name}={getattr(self, f.name).dtype}' for f in fields(self))}); "
                        "the renderer needs one: convert with gaussians.to(torch.float32)"
                    )
            all_finite = torch.stack([torch.isfinite(getattr(self, f.name)).all() for f in fields(self)]).all()
            for f in () if bool(all_finite) else fields(self):  # one sync; details only on failure
                t = getattr(self, f.name)
                bad = ~torch.isfinite(t)
                if bad.any():
                    raise ValueError(
                        f"Gaussians.{f.name} has {int(bad.sum())} non-finite values (NaN or inf); "
                        "a diverged optimisation or a corrupt file is the usual cause"
                    )
            qn = self.quats.detach().norm(dim=-1)
            if (qn < 1e-12).any():
                raise ValueError(
                    f"Gaussians.quats has {int((qn < 1e-12).sum())} quaternions of zero norm, "
                    "which cannot be normalised into rotations"
                )
        return self

    # ------------------------------------------------------------ activations
    @property
    def scales(self) -> Tensor:
        """``[..., K, 3]`` standard deviations, ``exp(log_scales)``."""
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        """``[..., K]`` opacities in (0, 1), ``sigmoid(opacity_logits)``."""
        return torch.sigmoid(self.opacity_logits)

    @property
    def rotations(self) -> Tensor:
        """``[..., K, 4]`` unit quaternions (wxyz)."""
        return self.quats / self.quats.norm(dim=-1, keepdim=True)

    @property
    def covariances(self) -> Tensor:
        """``[..., K, 3, 3]`` world-space covariances."""
        return covariance(self.quats, self.scales)

    @property
    def dc_colors(self) -> Tensor:
        """``[..., K, 3]`` view-independent colour from the DC band, clamped to [0, 1]."""
        return sh0_to_rgb(self.sh[..., 0, :]).clamp(0.0, 1.0)

    # ------------------------------------------------------------- containers
    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> Gaussians:
        """Like ``Tensor.to`` (device and/or dtype) for every field."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(lambda t: t.detach())

    def clone(self) -> Gaussians:
        return self._map(lambda t: t.clone())

    def requires_grad_(self, flag: bool = True) -> Gaussians:
        """Turn every field into a leaf that requires grad (in place); returns ``self``."""
        for f in fields(self):
            getattr(self, f.name).requires_grad_(flag)
        return self

    def parameters(self) -> dict[str, Tensor]:
        """The raw fields by name (for optimiser groups and safetensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, index) -> Gaussians:
        """Index the batch dimensions (``g[0]``, ``g[1:3]``), never the Gaussian dimension."""
        if not self.batch_shape:
            raise IndexError("cannot index an unbatched Gaussians; select Gaussians with .select(mask)")
        return self._map(lambda t: t[index])

    def select(self, index: Tensor) -> Gaussians:
        """Select Gaussians (the K dimension) by boolean mask or integer index ``[K']``."""
        n = len(self.batch_shape)
        return self._map(lambda t: t[(slice(None),) * n + (index,)])

    @staticmethod
    def stack(items: list[Gaussians], dim: int = 0) -> Gaussians:
        """Stack sets with equal K into a new leading batch dimension."""
        if not items:
            raise ValueError("Gaussians.stack needs at least one Gaussians")
        ks = {g.num_gaussians for g in items}
        if len(ks) != 1:
            raise ValueError(f"Gaussians.stack needs equal K in every set, got {sorted(ks)}")
        return Gaussians(**{f.name: torch.stack([getattr(g, f.name) for g in items], dim=dim)
                            for f in fields(Gaussians)})

    def __repr__(self) -> str:
        return (f"Gaussians(batch_shape={tuple(self.batch_shape)}, K={self.num_gaussians}, "
                f"dtype={self.dtype}, device={self.device})")

    # ------------------------------------------------------------ construction
    @staticmethod
    def from_points(points: Tensor, colors: Tensor | None = None, scale: float | Tensor | None = None,
                    opacity: float = 0.5, normals: Tensor | None = None) -> Gaussians:
        """Initialise Gaussians at points (the usual 3DGS initialisation).

        Args:
            points: ``[..., K, 3]`` centres.
            colors: ``[..., K, 3]`` RGB in [0, 1] (default mid grey).
            scale: isotropic scale: a float, a ``[..., K]`` tensor, or ``None`` for the mean
                distance to the 3 nearest neighbours (per point).
            opacity: initial opacity in (0, 1).
            normals: optional ``[..., K, 3]``; when given, each Gaussian is flattened to a disc
                (third axis ``0.1 * scale``) whose short axis follows the normal.
        """
        if points.ndim < 2 or points.shape[-1] != 3:
            raise ValueError(f"points must be [..., K, 3], got {tuple(points.shape)}")
        lead = points.shape[:-1]
        if not points.is_floating_point():
            raise TypeError(f"Gaussians.from_points: points must be a floating-point tensor, got {points.dtype}")
        if scale is not None:
            scale_t = torch.as_tensor(scale, dtype=points.dtype, device=points.device)
            bad = ~(torch.isfinite(scale_t) & (scale_t > 0))
            if bad.any():
                found = scale if isinstance(scale, (int, float)) else \
                    f"a tensor with {int(bad.sum())} such values, e.g. {scale_t[bad].flatten()[0].item()}"
                raise ValueError(
                    f"Gaussians.from_points: scale must be positive and finite (a standard deviation in world "
                    f"units, e.g. 0.005 for 5 mm; None: from the nearest neighbours), got {found}"
                )
        else:  # coincident points give 0 here; clamped to 1e-8 below (tiny, still valid)
            scale = knn_spacing(points, k=3)
        scale_t = torch.as_tensor(scale, dtype=points.dtype, device=points.device)
        if not (0.0 < opacity < 1.0):
            raise ValueError(f"Gaussians.from_points: opacity must be in (0, 1), got {opacity}")
        log_s = torch.log(scale_t.clamp_min(1e-8)).expand(lead).unsqueeze(-1).repeat_interleave(3, -1).clone()
        quats = torch.zeros(lead + (4,), dtype=points.dtype, device=points.device)
        quats[..., 0] = 1.0
        if normals is not None:
            quats = quat_from_z_to(normals)
            log_s[..., 2] = log_s[..., 2] + math.log(0.1)
        if colors is None:
            colors = torch.full(lead + (3,), 0.5, dtype=points.dtype, device=points.device)
        sh = torch.zeros(lead + (NUM_SH, 3), dtype=points.dtype, device=points.device)
        sh[..., 0, :] = rgb_to_sh0(colors)
        logit = math.log(opacity / (1.0 - opacity))
        return Gaussians(points.clone(), log_s, quats,
                         torch.full(lead, logit, dtype=points.dtype, device=points.device), sh)

    # --------------------------------------------------------------------- PLY
    def save_ply(self, path: str | os.PathLike) -> Path:
        """Write an unbatched set in the standard 3DGS PLY layout (see :func:`write_gaussians_ply`)."""
        return write_gaussians_ply(path, self)

    @staticmethod
    def load_ply(path: str | os.PathLike) -> Gaussians:
        """Read a 3DGS PLY (see :func:`read_gaussians_ply`)."""
        return read_gaussians_ply(path)


def knn(points: Tensor, k: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest other points of every point (chunked ``cdist``, so memory stays
    ``chunk x K``): ``[K, 3] -> (distances [K, k], indices [K, k])``, nearest first."""
    dists, idx = [], []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], points).topk(k + 1, largest=False)
        dists.append(d.values[:, 1:])  # column 0 is the point itself
        idx.append(d.indices[:, 1:])
    return torch.cat(dists), torch.cat(idx)


def knn_spacing(points: Tensor, k: int = 3) -> Tensor:
    """Mean distance from each point to its ``k`` nearest neighbours: ``[..., K, 3] -> [..., K]``."""
    flat = points.reshape(-1, *points.shape[-2:])
    return torch.stack([knn(p, k)[0].mean(-1) for p in flat]).reshape(points.shape[:-1])


def quat_from_z_to(normals: Tensor) -> Tensor:
    """Unit quaternions (wxyz) rotating the +z axis onto each (normalised) normal ``[..., 3] -> [..., 4]``."""
    n = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = torch.zeros_like(n)
    z[..., 2] = 1.0
    w = 1.0 + (z * n).sum(-1, keepdim=True)          # 1 + cos(theta)
    xyz = torch.linalg.cross(z, n)
    q = torch.cat([w, xyz], dim=-1)
    # n == -z: any axis perpendicular to z works; use x.
    opposite = w[..., 0] < 1e-8
    if opposite.any():
        q[opposite] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=q.dtype, device=q.device)
    return q / q.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------- PLY
_DC = [f"f_dc_{i}" for i in range(3)]
_REST = [f"f_rest_{i}" for i in range(45)]
_SCALE = [f"scale_{i}" for i in range(3)]
_ROT = [f"rot_{i}" for i in range(4)]
GAUSSIAN_PLY_PROPERTIES = ["x", "y", "z", "nx", "ny", "nz", *_DC, *_REST, "opacity", *_SCALE, *_ROT]
"""Property order of the reference 3DGS implementation (and SuperSplat, gsplat's exporter)."""


def write_gaussians_ply(path: str | os.PathLike, gaussians: Gaussians) -> Path:
    """Write one set of Gaussians as a binary little-endian 3DGS PLY.

    Layout: ``x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3``, all
    float32; normals are zero; ``f_rest`` is channel-major (all 15 red coefficients, then
    green, then blue), ``opacity`` is the logit, ``scale_*`` are log-scales, ``rot_*`` is the
    wxyz quaternion. Any 3DGS viewer (SuperSplat, antimatter15/splat, ...) opens it.
    """
    path = Path(path)
    if gaussians.batch_shape:
        raise ValueError(
            f"write_gaussians_ply writes one set; got batch_shape {tuple(gaussians.batch_shape)}. "
            "Index it first (g[i]) and write one file per subject."
        )
    g = gaussians.detach().to("cpu", torch.float32).validate()
    K = g.num_gaussians
    cols = {
        "x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
        "nx": torch.zeros(K), "ny": torch.zeros(K), "nz": torch.zeros(K),
    }
    for i in range(3):
        cols[_DC[i]] = g.sh[:, 0, i]
    rest = g.sh[:, 1:, :].transpose(1, 2).reshape(K, 45)  # channel-major
    for i in range(45):
        cols[_REST[i]] = rest[:, i]
    cols["opacity"] = g.opacity_logits
    for i in range(3):
        cols[_SCALE[i]] = g.log_scales[:, i]
    for i in range(4):
        cols[_ROT[i]] = g.quats[:, i]
    arr = np.empty(K, dtype=[(p, "<f4") for p in GAUSSIAN_PLY_PROPERTIES])
    for p in GAUSSIAN_PLY_PROPERTIES:
        arr[p] = cols[p].numpy()
    write_ply(path, [PlyElement("vertex", arr)], comments=("fastavatar-nb 3DGS Gaussians",))
    return path


def _vertex(path: str | os.PathLike) -> np.ndarray:
    elements = read_ply(path)
    if "vertex" not in elements:
        raise PlyError(f"{path}: no 'vertex' element (found {list(elements)})")
    return elements["vertex"].data


def read_gaussians_ply(path: str | os.PathLike) -> Gaussians:
    """Read a 3DGS PLY written by us, the reference 3DGS code, gsplat's exporter or SuperSplat.

    Properties are matched by name, so their order does not matter. SH bands beyond those
    present are zero (files of degree < 3 load). Raises :class:`~fastavatar_nb.ply.PlyError`
    naming the missing properties when the file is not a Gaussian splat (for a plain point
    cloud use :func:`read_points_ply`).
    """
    v = _vertex(path)
    names = set(v.dtype.names)
    required = ["x", "y", "z", *_DC, "opacity", *_SCALE, *_ROT]
    missing = [p for p in required if p not in names]
    if missing:
        raise PlyError(
            f"{path}: not a 3DGS Gaussian PLY: missing properties {missing}. "
            "If it is a point cloud (x y z [rgb]), use read_points_ply or Gaussians.from_points."
        )

    def col(p: str) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(v[p], dtype=np.float32))

    K = len(v)
    rest_names = sorted((p for p in names if p.startswith("f_rest_")), key=lambda s: int(s.split("_")[-1]))
    n_rest = len(rest_names)
    if n_rest % 3:
        raise PlyError(f"{path}: {n_rest} f_rest properties is not a multiple of 3")
    bands = n_rest // 3
    if bands + 1 > NUM_SH:
        raise PlyError(f"{path}: SH degree above 3 ({bands + 1} coefficients per channel) is not supported")
    sh = torch.zeros(K, NUM_SH, 3)
    sh[:, 0, :] = torch.stack([col(p) for p in _DC], -1)
    if bands:
        rest = torch.stack([col(p) for p in rest_names], -1).reshape(K, 3, bands).transpose(1, 2)
        sh[:, 1:1 + bands, :] = rest
    g = Gaussians(
        means=torch.stack([col("x"), col("y"), col("z")], -1),
        log_scales=torch.stack([col(p) for p in _SCALE], -1),
        quats=torch.stack([col(p) for p in _ROT], -1),
        opacity_logits=col("opacity"),
        sh=sh,
    )
    try:
        return g.validate()
    except ValueError as e:
        raise PlyError(f"{path}: {e}") from e


def read_points_ply(path: str | os.PathLike) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Read a point cloud PLY (ASCII or binary), e.g. NeRSemble's ``points3d.ply``.

    Returns:
        ``(points [K, 3], colors [K, 3] in [0, 1] or None, normals [K, 3] or None)``; colours
        and normals are ``None`` when absent or all zero.
    """
    v = _vertex(path)
    names = set(v.dtype.names)
    if not {"x", "y", "z"} <= names:
        raise PlyError(f"{path}: vertex element has no x, y, z properties (has {sorted(names)})")
    pts = torch.from_numpy(np.stack([v["x"], v["y"], v["z"]], -1).astype(np.float32))
    if not torch.isfinite(pts).all():
        raise PlyError(f"{path}: {int((~torch.isfinite(pts)).any(-1).sum())} points have non-finite coordinates")
    colors = normals = None
    if {"red", "green", "blue"} <= names:
        c = np.stack([v["red"], v["green"], v["blue"]], -1).astype(np.float32)
        if v.dtype["red"].kind in "iu":
            c = c / 255.0
        if c.any():
            colors = torch.from_numpy(c)
    if {"nx", "ny", "nz"} <= names:
        n = np.stack([v["nx"], v["ny"], v["nz"]], -1).astype(np.float32)
        if n.any():
            normals = torch.from_numpy(n)
    return pts, colors, normals


def write_points_ply(path: str | os.PathLike, points: Tensor, colors: Tensor | None = None,
                     normals: Tensor | None = None, ascii: bool = True) -> Path:
    """Write a point cloud in NeRSemble's ``points3d.ply`` layout (x y z nx ny nz red green blue).

    ``colors`` in [0, 1] are stored as uchar; missing normals/colours are written as zeros.
    """
    path = Path(path)
    p = points.detach().cpu().float().numpy()
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must be [K, 3], got {p.shape}")
    K = len(p)
    arr = np.zeros(K, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"),
                             ("nz", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    arr["x"], arr["y"], arr["z"] = p[:, 0], p[:, 1], p[:, 2]
    if normals is not None:
        n = normals.detach().cpu().float().numpy()
        arr["nx"], arr["ny"], arr["nz"] = n[:, 0], n[:, 1], n[:, 2]
    if colors is not None:
        c = (colors.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        arr["red"], arr["green"], arr["blue"] = c[:, 0], c[:, 1], c[:, 2]
    write_ply(path, [PlyElement("vertex", arr)], ascii=ascii)
    return path
