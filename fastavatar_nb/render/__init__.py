"""``render(gaussians, cameras)``: one entry point, three interchangeable backends.

- ``"torch"``: :mod:`~fastavatar_nb.render.torch_rasterizer`, pure PyTorch, CPU or GPU: the
  readable reference (notebook 01 derives it) that the others are tested against.
- ``"numba"``: :mod:`~fastavatar_nb.render.numba_rasterizer`, the same maths with its binning and
  blending compiled by numba, multi-threaded, CPU only (10x or more faster than torch on a CPU).
- ``"gsplat"``: ``gsplat.rasterization``, CUDA only, much faster.
- ``"auto"``: on CUDA gsplat when its kernels work, else torch; on the CPU numba when it
  compiles, else torch. The choice and its reason are logged once.

Both follow gsplat's conventions: SH colour ``+0.5`` clamped at 0, premultiplied alpha
composited as ``colors + (1 - alpha) * background``, EWA projection with a 0.3 px
low-pass, near-plane culling at 0.01.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..cameras import Cameras
from ..gaussians import Gaussians
from .gsplat_backend import gsplat_status, rasterize_gsplat
from .numba_rasterizer import NUMBA_TILE_SIZE, NumbaBackendError, numba_status, rasterize_numba
from .torch_rasterizer import RenderMemoryError, auto_tile_size, estimate_memory, overlaps_per_image
from .torch_rasterizer import rasterize as rasterize_torch

__all__ = ["Backend", "DEFAULT_TILE_SIZE", "RenderOutput", "render", "resolve_backend", "composite",
           "RenderMemoryError", "RenderDtypeError", "MEMORY_ENV", "MEMORY_FRACTION", "memory_budget",
           "estimate_render_memory", "NumbaBackendError", "flat_inputs"]

Backend = Literal["auto", "torch", "numba", "gsplat"]
_BACKENDS = ("auto", "torch", "numba", "gsplat")
log = logging.getLogger("fastavatar_nb.render")
_announced: set[tuple[str, str]] = set()
DEFAULT_TILE_SIZE: dict[str, int | None] = {"torch": None, "numba": NUMBA_TILE_SIZE, "gsplat": 16}
"""Tile edge in pixels per backend when ``render(tile_size=None)``; ``None``: the torch
rasterizer picks 4, 8 or 16 from the Gaussians' screen size (``torch_rasterizer.auto_tile_size``)."""


MEMORY_ENV = "FASTAVATAR_RENDER_MEMORY_GB"
"""Environment variable: the torch and numba backends' memory budget in GiB (overrides the default)."""
MEMORY_FRACTION = 0.75
"""Default budget of the torch and numba backends: this fraction of the memory available now (on the CPU
the least of the host's free RAM, the container's cgroup limit and ``RLIMIT_AS``; free GPU memory on CUDA)."""


class RenderDtypeError(TypeError):
    """The Gaussians (or cameras) have a dtype the renderer cannot compute in."""


CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the control groups are mounted (a test points it at a fake tree)."""
PROC_SELF = Path("/proc/self")
"""This process's ``/proc`` folder (``cgroup``, ``status``)."""
_NO_LIMIT = 2 ** 60
"""cgroup v1 writes 'no limit' as a number near 2^63."""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _NO_LIMIT else value


def _cgroup_memory_left() -> int | None:
    """Bytes this process's control groups still allow (limit minus usage, the tightest over the group and
    its ancestors): cgroup v2 ``memory.max`` / ``memory.current``, cgroup v1 ``memory.limit_in_bytes`` /
    ``memory.usage_in_bytes``. ``None`` where no limit is set (or nothing can be read)."""
    try:
        lines = (PROC_SELF / "cgroup").read_text().splitlines()
    except OSError:
        return None
    left: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2: the unified hierarchy; every ancestor's limit applies
            names = ("memory.max", "memory.current")
            base = CGROUP_ROOT
        elif "memory" in controllers.split(","):  # v1: the memory controller's own tree
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            base = CGROUP_ROOT / "memory" if (CGROUP_ROOT / "memory").is_dir() else CGROUP_ROOT
        else:
            continue
        folder = base / rel if rel else base
        while True:
            limit = _read_int(folder / names[0])
            if limit is not None:
                left.append(max(0, limit - (_read_int(folder / names[1]) or 0)))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(left) if left else None


def _address_space_left() -> int | None:
    """Bytes of address space left under ``RLIMIT_AS`` (``ulimit -v``): the soft limit minus this process's
    ``VmSize``; ``None`` where there is no limit."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft in (resource.RLIM_INFINITY, -1) or soft <= 0:
        return None
    used = 0
    try:
        for line in (PROC_SELF / "status").read_text().splitlines():
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used)


def _host_memory_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open(PROC_SELF.parent / "meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _available_memory(device: torch.device) -> int | None:
    """Memory available now: free GPU memory on CUDA; on the CPU the least of the host's available RAM,
    what the control groups (a container, a Binder pod) still allow, and the address space left under
    ``RLIMIT_AS``. A pod of 2 GB on a host with 200 GB free is 2 GB here."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    known = [v for v in (_host_memory_available(), _cgroup_memory_left(), _address_space_left()) if v is not None]
    return min(known) if known else None


def memory_budget(device: torch.device | str = "cpu", budget_gb: float | None = None) -> int | None:
    """The torch backend's memory budget in bytes.

    ``budget_gb`` if given, else the environment variable :data:`MEMORY_ENV` (GiB), else
    :data:`MEMORY_FRACTION` of the memory available now; ``None`` when that cannot be found out.
    """
    source = "memory_budget_gb"
    if budget_gb is None and os.environ.get(MEMORY_ENV, "").strip():
        raw, source = os.environ[MEMORY_ENV], MEMORY_ENV
        try:
            budget_gb = float(raw)
        except ValueError:
            raise ValueError(f"{MEMORY_ENV}={raw!r} is not a number of GiB (e.g. {MEMORY_ENV}=8)") from None
    if budget_gb is not None:
        if not (budget_gb > 0):  # also refuses NaN
            raise ValueError(f"{source} must be a positive number of GiB, got {budget_gb!r}")
        return int(min(budget_gb * 1024 ** 3, 2 ** 62))
    avail = _available_memory(torch.device(device))
    return None if avail is None else int(MEMORY_FRACTION * avail)


def flat_inputs(gaussians: Gaussians, cameras: Cameras, batch: torch.Size) -> tuple[Tensor, ...]:
    """The rasterizers' inputs with the broadcast ``batch`` flattened to ``B``: ``means [B, K, 3]``,
    ``quats [B, K, 4]``, ``scales [B, K, 3]``, ``opacities [B, K]``, ``sh [B, K, 16, 3]``,
    ``viewmats [B, C, 4, 4]`` and ``Ks [B, C, 3, 3]`` (cameras in the Gaussians' dtype)."""
    K, C, dtype = gaussians.num_gaussians, len(cameras), gaussians.dtype
    B = int(torch.Size(batch).numel())

    def flat(t: Tensor, tail: tuple[int, ...]) -> Tensor:
        return t.expand(*batch, *tail).reshape(B, *tail)

    return (flat(gaussians.means, (K, 3)), flat(gaussians.quats, (K, 4)), flat(gaussians.scales, (K, 3)),
            flat(gaussians.opacities, (K,)), flat(gaussians.sh, (K, 16, 3)),
            flat(cameras.viewmats.to(dtype), (C, 4, 4)), flat(cameras.Ks.to(dtype), (C, 3, 3)))


def estimate_render_memory(gaussians: Gaussians, cameras: Cameras, tile_size: int | None = None,
                           grad: bool | None = None, chunks: list[tuple[int, int]] | None = None) -> int:
    """Estimated peak bytes of ``render(gaussians, cameras, backend="torch")`` (with ``grad``: and
    its backward pass; default: whether any Gaussian field requires grad).

    Projects the Gaussians (cheap: no pixels) to count the tile overlaps of every image exactly,
    then applies :func:`~fastavatar_nb.render.torch_rasterizer.estimate_memory`; ``chunks`` are
    groups of flattened images drawn together (default: all at once).
    """
    from .torch_rasterizer import project

    if grad is None:
        grad = any(t.requires_grad for t in gaussians.parameters().values())
    with torch.no_grad():
        batch = torch.broadcast_shapes(gaussians.batch_shape, cameras.viewmats.shape[:-3])
        g = gaussians.to(torch.float32) if gaussians.dtype not in (torch.float32, torch.float64) else gaussians
        dtype = g.dtype
        means, quats, scales, opac, _, viewmats, Ks = flat_inputs(g, cameras, batch)
        (B, K), C, W, H = means.shape[:2], len(cameras), cameras.width, cameras.height
        means2d, _, _, _, radii = project(means, quats, scales, opac, viewmats, Ks, W, H)
        ts = tile_size or auto_tile_size(means2d, radii)
        ov = overlaps_per_image(means2d.reshape(B * C, K, 2), radii.reshape(B * C, K, 2), W, H, ts)
    return estimate_memory(ov, K, W, H, ts, torch.empty((), dtype=dtype).element_size(), grad, chunks)


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
    if backend == "numba":
        if device.type != "cpu":
            raise RuntimeError(
                f"backend='numba' renders on the CPU, but the Gaussians are on {device}. Use backend='gsplat' "
                "or backend='torch' there, or move them with .to('cpu')."
            )
        ok, why = numba_status()
        if not ok:
            raise RuntimeError(f"backend='numba' is unavailable: {why}. Use backend='torch' (runs anywhere).")
        return "numba"
    if device.type != "cuda":
        if backend == "gsplat":
            raise RuntimeError(
                f"backend='gsplat' needs a CUDA device, but the Gaussians are on {device}. "
                "Move them with .to('cuda') or use backend='torch' (runs anywhere)."
            )
        if device.type == "cpu":
            ok, why = numba_status()
            choice, why = ("numba", f"compiled CPU kernels: {why}") if ok else ("torch", f"numba unavailable: {why}")
        else:
            choice, why = "torch", f"data on {device}; gsplat needs CUDA, numba the CPU"
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
           backend: Backend = "auto", sh_degree: int = 3, tile_size: int | None = None,
           memory_budget_gb: float | None = None, validate: bool = True) -> RenderOutput:
    """Render Gaussians from cameras.

    Batching: the Gaussians' batch shape broadcasts with the cameras' leading shape (all but
    the camera dimension). ``Gaussians [S, K]`` with ``Cameras [C]`` renders every subject
    from the same C cameras; with ``Cameras [S, C]`` each subject from its own.

    Args:
        gaussians: raw parameters, any batch shape ``[...]``.
        cameras: ``[..., C]`` cameras on the same device.
        background: RGB composited behind (premultiplied): scalar, ``[3]`` or ``[..., C, 3]``;
            default white (NeRSemble's); ``None`` for black.
        backend: ``"auto"``, ``"torch"``, ``"numba"`` (compiled, CPU) or ``"gsplat"`` (CUDA).
        sh_degree: highest SH band used (0-3).
        tile_size: tile edge in pixels; default :data:`DEFAULT_TILE_SIZE` of the backend (gsplat
            16, numba 8; torch: chosen from the Gaussians' screen size, because its cost grows with tile
            area times overlaps, see ``benchmarks/render.py``).
        memory_budget_gb: torch and numba backends: the most memory (GiB) one call may use; default the
            environment variable ``FASTAVATAR_RENDER_MEMORY_GB``, else 75% of the memory available
            now (:func:`memory_budget`: cgroup and ``RLIMIT_AS`` limits included). Over it, the cameras
            are drawn in groups that fit (the same pixels; the torch backend keeps gradients through
            groups, the numba backend groups only without gradients);
            if one camera at a time does not fit, :class:`RenderMemoryError` (a ``MemoryError``)
            says how much is needed and what to do.
        validate: check every Gaussian value is finite and every quaternion normalisable (one
            pass over the Gaussians; shapes, dtypes, devices and cameras are always checked).

    Raises:
        ValueError: bad shapes, values or cameras (the message names the argument).
        RenderDtypeError: a ``TypeError``: Gaussians that are not float32 or float64.
        RenderMemoryError: a ``MemoryError``: the torch backend would exceed the memory budget.

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
    gaussians.validate(check_values=validate)
    if gaussians.dtype not in (torch.float32, torch.float64):
        raise RenderDtypeError(
            f"render: the Gaussians are {gaussians.dtype}; the renderer computes in torch.float32 or "
            f"torch.float64 (covariances and their inverses lose too much in half precision). "
            f"Convert them first: gaussians.to(torch.float32)"
        )
    if cameras.device != gaussians.device:
        raise ValueError(
            f"render: the cameras are on {cameras.device} but the Gaussians on {gaussians.device}; "
            f"move one of them (cameras.to({str(gaussians.device)!r}) or gaussians.to({str(cameras.device)!r}))"
        )
    focal = torch.stack([cameras.Ks[..., 0, 0], cameras.Ks[..., 1, 1]], -1)
    bad_focal = ~(focal > 0).all(-1)
    if bad_focal.any():
        idx = [tuple(i) if len(i) > 1 else i[0] for i in torch.nonzero(bad_focal).tolist()]
        raise ValueError(
            f"render: camera intrinsics must have positive focal lengths (Ks[..., 0, 0] and Ks[..., 1, 1]); "
            f"camera(s) {idx[:8]} have fx, fy = {focal[bad_focal][:3].tolist()}"
        )
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
    C = len(cameras)
    means, quats, scales, opac, sh, viewmats, Ks = flat_inputs(gaussians, cameras, batch)
    W, H = cameras.width, cameras.height
    if name == "gsplat":
        rgb, alpha, depth = rasterize_gsplat(means.contiguous(), quats.contiguous(), scales.contiguous(),
                                             opac.contiguous(), sh.contiguous(), viewmats.contiguous(),
                                             Ks.contiguous(), W, H, sh_degree=sh_degree, tile_size=tile_size)
    else:
        if memory_budget_gb is not None or os.environ.get(MEMORY_ENV, "").strip():
            budget = memory_budget(gaussians.device, memory_budget_gb)
        else:  # looked up only when the estimate is over MEMORY_CHECK_FLOOR: training steps stay cheap
            budget = lambda: memory_budget(gaussians.device)  # noqa: E731
    if name == "numba":
        rgb, alpha, depth = rasterize_numba(means, quats, scales, opac, sh, viewmats, Ks, W, H, sh_degree=sh_degree,
                                            tile_size=tile_size, memory_budget=budget)
    elif name == "torch":
        rgb, alpha, depth = rasterize_torch(means, quats, scales, opac, sh, viewmats, Ks, W, H,
                                            sh_degree=sh_degree, tile_size=tile_size, memory_budget=budget)
    out_shape = (*batch, C, H, W)
    rgb, alpha, depth = rgb.reshape(*out_shape, 3), alpha.reshape(out_shape), depth.reshape(out_shape)
    bg = _background(background, torch.Size((*batch, C)), gaussians.dtype, rgb.device)
    if rgb.requires_grad or rgb.numel() * rgb.element_size() < 64 * 1024 ** 2:
        return RenderOutput(composite(rgb, alpha, bg), alpha, depth, name)
    # large and no graph: composite in place, one image at a time (the same arithmetic, no full-size temporaries)
    flat_rgb, flat_alpha = rgb.reshape(-1, H, W, 3), alpha.reshape(-1, H, W)
    flat_bg = bg.expand(*batch, C, 1, 1, 3).reshape(-1, 1, 1, 3)
    for i in range(flat_rgb.shape[0]):
        flat_rgb[i] = composite(flat_rgb[i], flat_alpha[i], flat_bg[i])
    return RenderOutput(rgb, alpha, depth, name)

