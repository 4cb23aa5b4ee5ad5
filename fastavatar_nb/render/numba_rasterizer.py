"""The compiled CPU backend: the tile rasterizer's hot loops as multi-threaded numba kernels.

Same maths and conventions as :mod:`~fastavatar_nb.render.torch_rasterizer`, the readable reference that
notebook 01 derives and that this backend is tested against (``tests/test_render_numba.py``: images and
the gradients of means, scales, quaternions, opacities and SH within 1e-5 relative in float64, and
finite differences). Four kernels (:mod:`~fastavatar_nb.render._numba_kernels`), each with its backward:

- **projection and colour** (:class:`NumbaProject`): per Gaussian and camera, world -> camera, EWA
  projection with gsplat's clipping, the 0.3 px low-pass and its conic, the opacity-aware extent and
  culling, and the SH colour, fused; the backward pass is written out (the chain rule through the conic's
  inverse, ``J Sigma J^T``, the camera transform, the SH bases and the direction's normalisation). The
  3D covariance ``R S S^T R^T`` stays in torch (per Gaussian, not per camera). Where the cameras need
  gradients (a photo's pose refined with the head), the reference's torch projection is used instead.
- **binning**: every (tile, Gaussian) overlap, each tile's list front to back, from the same tile
  rectangles as the reference's ``bin_tiles``.
- **blending** (:class:`NumbaBlend`): per pixel, front to back, ``alpha = min(0.999, o exp(-sigma))``,
  skipped below 1/255, stopping before the transmittance falls to 1e-4 (gsplat's rules, paper Eq. 1);
  each overlap reaches only the pixels inside its alpha >= 1/255 ellipse. The backward pass runs back to
  front (gsplat's order), recovering ``T_d = T_{d+1} / (1 - alpha_d)`` and giving the reference's
  ``BlendWeights`` gradient ``dL/dalpha_d = g_d T_d - (sum_{j>d} g_j w_j) / (1 - alpha_d)``.
- **sums**: each overlap's gradient has its own slot (no two threads write the same memory), summed per
  Gaussian image by image.

Why numba rather than a C++/OpenMP extension compiled on first use (PyTorch3D's way): numba ships
wheels for every platform this course runs on (Linux, macOS, Windows; x86 and ARM), so a user needs
no compiler; the kernels are plain Python loops a student can read; and measured side by side
(``benchmarks/numba_vs_c.py``, ``benchmarks/results/cpu-2core/numba_vs_c.json``) the blend kernel takes
1.07-1.18x the time of the same loop in C compiled with ``gcc -O3 -march=native`` on one thread, with
the same images to 1e-6. Kernels are compiled on first use (about 10-20 s) and cached on disk
(``cache=True``), so later processes load them in a fraction of a second.

Threads: plain Python threads running GIL-free kernels (:func:`_parallel`; tiles interleaved over the
threads, Gaussians in blocks), as many as torch's thread count, so the limits of
:mod:`fastavatar_nb.threads` hold here too (one thread where torch's OpenMP threads spin,
:func:`compiled_threads`).

Where numba is missing or its kernels fail to compile, :func:`numba_status` says why and
``backend="auto"`` uses the torch backend instead (one log line with the reason). Inputs it cannot take
(another device or dtype, an SH degree above 3) raise :class:`NumbaBackendError` naming the case and
``backend="torch"``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .._openmp import spin_limited
from ..gaussians import covariance
from .sh import sh_to_color
from .torch_rasterizer import (
    ALPHA_MAX,
    ALPHA_MIN,
    EXTENT_SIGMAS,
    GIB,
    MEMORY_CHECK_FLOOR,
    TRANSMITTANCE_MIN,
    RenderMemoryError,
    finish_blend,
    project,
)

__all__ = ["numba_status", "rasterize_numba", "tile_rects", "NumbaProject", "NumbaBlend", "NUMBA_TILE_SIZE",
           "SUPPORTED_DTYPES", "NumbaBackendError"]

NUMBA_TILE_SIZE = 16
"""Default tile edge of the compiled backend. Each overlap reaches only the pixels inside its ellipse, so
larger tiles cost little per pixel and save per-overlap work: forward+backward on 2 threads, 16 px against
8 and 32 px: 44 / 47 / 45 ms (2,500 Gaussians, 16 views at 69x100), 86 / 104 / 93 ms (138x200), 34 / 35 /
30 ms (10,000 Gaussians, one view at 275x401)."""
SUPPORTED_DTYPES = (torch.float32, torch.float64)

log = logging.getLogger("fastavatar_nb.render")
_STATUS: tuple[bool, str] | None = None
_K = None  # the compiled kernels, a namespace, once loaded


class NumbaBackendError(RuntimeError):
    """The compiled CPU backend cannot render this input (the message names the case and the fix)."""


def numba_status() -> tuple[bool, str]:
    """Whether the compiled CPU backend can run here, and why (or why not). Cached.

    Imports numba and compiles (or loads from the on-disk cache) the kernels once; a failure is
    reported, never raised, so ``backend="auto"`` falls back to the torch backend.
    """
    global _STATUS, _K
    if _STATUS is not None:
        return _STATUS
    try:
        import numba
    except Exception as e:  # ImportError, or a numba/numpy version clash raising at import
        _STATUS = (False, f"numba is not importable ({type(e).__name__}: {e}); pip install numba")
        return _STATUS
    try:
        from . import _numba_kernels as kernels

        kernels.warm_up()
    except Exception as e:  # a compiler failure: report it, fall back
        _STATUS = (False, f"numba {numba.__version__} could not compile the kernels ({type(e).__name__}: {e})")
        return _STATUS
    _K = kernels
    _STATUS = (True, f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads at most")
    return _STATUS


def _kernels():
    ok, why = numba_status()
    if not ok:
        raise NumbaBackendError(f"backend='numba' is unavailable: {why}. Use backend='torch' (runs anywhere).")
    return _K


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_ONE_THREAD_SAID = False


def compiled_threads() -> int:
    """Threads for the kernels: torch's thread count where torch's OpenMP threads stop spinning quickly
    (:mod:`fastavatar_nb._openmp`), else 1 (two would be slowed 2-20x by a spinning torch worker), said once."""
    global _ONE_THREAD_SAID
    n = torch.get_num_threads()
    if n > 1 and not spin_limited():
        if not _ONE_THREAD_SAID:
            _ONE_THREAD_SAID = True
            log.info("render: the numba backend runs on 1 thread of %d: torch was imported before fastavatar_nb, "
                     "so its OpenMP threads spin between operations and would stall the kernels' threads. "
                     "Import fastavatar_nb before torch, or start Python with GOMP_SPINCOUNT=1000, to use all %d.",
                     n, n)
        return 1
    return n


def _parallel(kernel, total: int, *args, interleave: bool = True) -> None:
    """Run ``kernel(*args, lo, hi, step)`` over ``range(total)`` on ``torch.get_num_threads()`` threads.

    The kernels release the GIL, so plain Python threads run them side by side. ``interleave``: thread
    ``t`` takes items ``t, t + n, ...`` (tiles: busy and empty ones spread evenly); else contiguous
    blocks (Gaussians: neighbours share cache lines). Why not numba's own ``prange``: its OpenMP
    threads and torch's spin-wait for work after each parallel region, and on a 2-core machine the two
    pools took turns stalling each other (forward passes 10x slower, at random); threads that wait on a
    lock cost nothing while torch runs.
    """
    global _POOL, _POOL_PID
    n = max(1, min(compiled_threads(), total))
    if n == 1:
        kernel(*args, 0, total, 1)
        return
    if _POOL is None or _POOL._max_workers < n - 1 or _POOL_PID != os.getpid():  # a forked child has no threads
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="fastavatar-numba"), os.getpid()
    if interleave:
        parts = [(t, total, n) for t in range(n)]
    else:
        size = -(-total // n)
        parts = [(t * size, min(total, (t + 1) * size), 1) for t in range(n)]
    futures = [_POOL.submit(kernel, *args, *part) for part in parts[1:]]
    kernel(*args, *parts[0])  # this thread takes a share too
    for future in futures:
        future.result()


@torch.no_grad()
def tile_rects(means2d: Tensor, radii: Tensor, width: int, height: int, tile_size: int) -> Tensor:
    """``[I, N, 4]`` int32 tile rectangle ``(x0, x1, y0, y1)`` (half-open) each Gaussian touches;
    empty (``x0 == x1``) where it is culled. The same arithmetic as the reference's ``bin_tiles``.

    Args: means2d ``[I, N, 2]``, radii ``[I, N, 2]`` (0 = culled).
    """
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    m = means2d / tile_size
    r = radii.to(means2d.dtype) / tile_size
    x0 = torch.floor(m[..., 0] - r[..., 0]).clamp(0, tiles_x)
    x1 = torch.ceil(m[..., 0] + r[..., 0]).clamp(0, tiles_x)
    y0 = torch.floor(m[..., 1] - r[..., 1]).clamp(0, tiles_y)
    y1 = torch.ceil(m[..., 1] + r[..., 1]).clamp(0, tiles_y)
    rects = torch.stack([x0, x1, y0, y1], -1).nan_to_num(0.0).to(torch.int32)
    rects[..., 1] = torch.where(radii[..., 0] > 0, rects[..., 1], rects[..., 0])
    return rects.contiguous()


class NumbaBlend(torch.autograd.Function):
    """Front-to-back blending of binned Gaussians with the compiled kernels.

    Inputs ``means2d [I, N, 2]``, ``conics [I, N, 3]``, ``opacities [I, N]``, ``features [I, N, F]``
    (differentiable) and the binning ``offsets [I * T + 1]``, ``ids [M]`` (int64, from the compiled
    ``bin`` kernel). Returns ``(features [I, H, W, F], alphas [I, H, W])``, premultiplied.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, offsets, ids, width, height, tile_size):
        K = _K
        n_images, N, F = features.shape
        if F != K.NUM_FEATURES:
            raise ValueError(f"NumbaBlend blends {K.NUM_FEATURES} features (RGB and depth), got {F}")
        params = _pack(means2d, conics, opacities, features)[ids]  # [M, PARAM_WIDTH], in the binned order
        out = torch.zeros(n_images, height, width, F, dtype=features.dtype)
        alpha = torch.zeros(n_images, height, width, dtype=features.dtype)
        t_final = torch.ones(n_images, height, width, dtype=features.dtype)
        last = torch.zeros(n_images, height, width, dtype=torch.int64)
        _parallel(K.blend_forward, offsets.numel() - 1, offsets.numpy(), params.numpy(),
                  _centres(width, height, params.dtype), width, height, tile_size, _constants(params.dtype),
                  out.numpy(), alpha.numpy(), t_final.numpy(), last.numpy())
        ctx.save_for_backward(params, offsets, ids, t_final, last)
        ctx.geometry = (n_images, N, width, height, tile_size)
        ctx.mark_non_differentiable(last)
        return out, alpha

    @staticmethod
    def backward(ctx, grad_out, grad_alpha):
        K = _K
        params, offsets, ids, t_final, last = ctx.saved_tensors
        n_images, N, width, height, tile_size = ctx.geometry
        dtype = params.dtype
        if grad_out is None:
            grad_out = torch.zeros(n_images, height, width, K.NUM_FEATURES, dtype=dtype)
        if grad_alpha is None:
            grad_alpha = torch.zeros(n_images, height, width, dtype=dtype)
        slots = torch.zeros(ids.numel(), K.SLOT_WIDTH, dtype=dtype)  # per overlap: its share of the gradients
        _parallel(K.blend_backward, offsets.numel() - 1, offsets.numpy(), params.numpy(),
                  _centres(width, height, dtype), width, height, tile_size, _constants(dtype),
                  grad_out.contiguous().numpy(), grad_alpha.contiguous().numpy(), t_final.numpy(), last.numpy(),
                  slots.numpy())
        grads = torch.zeros(n_images * N, K.SLOT_WIDTH, dtype=dtype)
        tiles_per_image = (offsets.numel() - 1) // max(n_images, 1)
        _parallel(K.sum_slots, n_images, offsets.numpy(), ids.numpy(), slots.numpy(), tiles_per_image, grads.numpy())
        grads = grads.reshape(n_images, N, K.SLOT_WIDTH)
        return (grads[..., 0:2], grads[..., 2:5], grads[..., 5], grads[..., 6:], None, None, None, None, None)


class NumbaProject(torch.autograd.Function):
    """Steps 1-5 of the reference fused per Gaussian and camera: world -> camera, EWA projection, conic,
    extent and culling, SH colour; differentiable w.r.t. ``means [B, N, 3]``, the world ``covars [B, N, 3, 3]``
    and ``sh [B, N, 16, 3]`` (the cameras are constants here: where they need gradients, as when a photo's
    pose is refined, :func:`rasterize_numba` projects with the reference's torch functions instead).

    Returns ``means2d [B, C, N, 2]``, ``conics [B, C, N, 3]``, ``depths [B, C, N]``, ``colors [B, C, N, 3]``
    and ``radii [B, C, N, 2]`` (int32, 0 = culled; not differentiable).
    """

    @staticmethod
    def forward(ctx, means, covars, sh, opacities, viewmats, Ks, width, height, sh_degree, near_plane, far_plane,
                eps2d):
        K = _K
        B, N = means.shape[:2]
        C = viewmats.shape[1]
        dtype = means.dtype
        campos = torch.linalg.inv(viewmats)[..., :3, 3].contiguous()
        arrays = [t.detach().contiguous() for t in (means, covars, sh, opacities, viewmats, Ks)]
        means2d = torch.empty(B, C, N, 2, dtype=dtype)
        conics = torch.empty(B, C, N, 3, dtype=dtype)
        depths = torch.empty(B, C, N, dtype=dtype)
        colors = torch.empty(B, C, N, 3, dtype=dtype)
        radii = torch.empty(B, C, N, 2, dtype=torch.int32)
        _parallel(K.project_forward, B * N, *(t.numpy() for t in arrays), campos.numpy(), width, height, sh_degree,
                  near_plane, far_plane, eps2d, ALPHA_MIN, EXTENT_SIGMAS, means2d.numpy(), conics.numpy(),
                  depths.numpy(), radii.numpy(), colors.numpy(), interleave=False)
        ctx.save_for_backward(*arrays[:3], arrays[4], arrays[5], campos, radii)
        ctx.settings = (width, height, sh_degree, eps2d)
        ctx.mark_non_differentiable(radii)
        return means2d, conics, depths, colors, radii

    @staticmethod
    def backward(ctx, g_means2d, g_conics, g_depths, g_colors, _g_radii):
        K = _K
        means, covars, sh, viewmats, Ks, campos, radii = ctx.saved_tensors
        width, height, sh_degree, eps2d = ctx.settings
        grads = [torch.zeros_like(means), torch.zeros_like(covars), torch.zeros_like(sh)]
        upstream = [torch.zeros(radii.shape[:3] + (d,), dtype=means.dtype) if g is None else g.contiguous()
                    for g, d in ((g_means2d, 2), (g_conics, 3), (g_depths, 0), (g_colors, 3))]
        if g_depths is None:
            upstream[2] = torch.zeros(radii.shape[:3], dtype=means.dtype)
        _parallel(K.project_backward, means.shape[0] * means.shape[1], means.numpy(), covars.numpy(), sh.numpy(),
                  viewmats.numpy(), Ks.numpy(), campos.numpy(), width, height, sh_degree, eps2d, radii.numpy(),
                  *(u.numpy() for u in upstream), *(g.numpy() for g in grads), interleave=False)
        return (*grads, None, None, None, None, None, None, None, None, None)


def _pack(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor) -> Tensor:
    """``[I * N, PARAM_WIDTH]`` contiguous rows of each Gaussian's blending inputs and its skip ellipse
    (``_numba_kernels.PARAM_WIDTH``), detached; the ellipse in float64, then rounded to the dtype."""
    K = _K
    with torch.no_grad():
        op = opacities.detach()
        thr = torch.log(ALPHA_MIN / op.double().clamp_min(1e-30)) - K.SKIP_MARGIN
        a, b, c = conics.detach().double().unbind(-1)
        a = torch.where(a > 0, a, torch.ones_like(a))  # culled Gaussians (never binned) only
        slope = -b / a
        span_a = ((b * b - a * c) / (a * a)).clamp_max(-1e-30)  # < 0 for a positive-definite conic
        span_b = (-2.0 * thr / a).clamp_min(0.0)
        y_ext = torch.sqrt(span_b / -span_a).clamp_max(1e6)
        ellipse = torch.stack([thr, slope, span_a, span_b, y_ext, torch.zeros_like(thr)], -1).to(op.dtype)
        params = torch.cat([means2d.detach(), conics.detach(), op[..., None], features.detach(), ellipse], -1)
    return params.reshape(-1, K.PARAM_WIDTH).contiguous()


def _centres(width: int, height: int, dtype: torch.dtype):
    return _K.pixel_centres(max(width, height), torch.empty((), dtype=dtype).numpy().dtype)


def _constants(dtype: torch.dtype):
    return _K.constants(torch.empty((), dtype=dtype).numpy().dtype, ALPHA_MIN, ALPHA_MAX, TRANSMITTANCE_MIN)


@torch.no_grad()
def _bin(K, rects: Tensor, order: Tensor, width: int, height: int, tile_size: int) -> tuple[Tensor, Tensor]:
    """Every tile's overlaps front to back: ``offsets [I * T + 1]`` and the flat Gaussian ``ids [M]``."""
    n_images = rects.shape[0]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    counts = torch.zeros(n_images * tiles_x * tiles_y, dtype=torch.int64)
    _parallel(K.bin_count, n_images, rects.numpy(), order.numpy(), tiles_x, counts.numpy())
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    ids = torch.empty(int(offsets[-1]), dtype=torch.int64)
    _parallel(K.bin_fill, n_images, rects.numpy(), order.numpy(), tiles_x, offsets.numpy(), ids.numpy())
    return offsets, ids


def _check(tensors: dict[str, Tensor], sh_degree: int) -> torch.dtype:
    dtype = tensors["means"].dtype
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise NumbaBackendError(
                f"backend='numba' renders on the CPU, but {name} is on {t.device}; use backend='gsplat' or "
                "backend='torch' on a GPU, or move the Gaussians with .to('cpu')")
        if t.dtype != dtype:
            raise NumbaBackendError(f"backend='numba': {name} is {t.dtype} but means are {dtype}; convert them to one "
                                    "dtype, or use backend='torch'")
    if dtype not in SUPPORTED_DTYPES:
        raise NumbaBackendError(f"backend='numba' computes in float32 or float64, got {dtype}; convert with "
                                ".to(torch.float32), or use backend='torch'")
    if sh_degree not in (0, 1, 2, 3):
        raise NumbaBackendError(f"backend='numba' supports SH degrees 0-3, got {sh_degree}; use backend='torch'")
    return dtype


# Bytes of the compiled backend's tensors (s: the dtype's size), read off the code and checked against a
# tensor-allocation tracker (tests/test_render_numba.py::test_memory_estimate_bounds_the_measured_peak).
NUMBA_MEM_PIXEL = ((14, 9), (28, 9))
"""Per pixel of the images drawn together, ``(x s, + bytes)`` without and with gradients: the blend's
buffers (features, alpha, transmittance, the int64 stop index), the finished images and the compositing;
with gradients also what autograd keeps and the backward pass's gradient images."""
NUMBA_MEM_OVERLAP = ((16, 8), (28, 8))
"""Per (tile, Gaussian) overlap: its packed row and id; with gradients also its gradient slot."""
NUMBA_MEM_GAUSSIAN = ((34, 56), (60, 56))
"""Per Gaussian per image: projection outputs, packing, sort keys and tile rectangles."""
NUMBA_MEM_OUTPUT_PIXEL = 5
"""Elements (x s) per pixel of the finished colours, alphas and depths, kept while later groups are drawn."""
NUMBA_MEM_BASE = 64 * 1024
"""Bytes of small fixed buffers (constants, per-call scratch)."""


def estimate_numba_memory(n_images: int, num_gaussians: int, width: int, height: int, overlaps: int,
                          itemsize: int = 4, grad: bool = False) -> int:
    """Estimated peak bytes of :func:`rasterize_numba` (and the compositing in ``render``) for ``n_images``
    images drawn together with ``overlaps`` (tile, Gaussian) overlaps in all; see the ``NUMBA_MEM_*`` constants."""
    s = itemsize
    (ps, pb), (os_, ob), (gs, gb) = (NUMBA_MEM_PIXEL[grad], NUMBA_MEM_OVERLAP[grad], NUMBA_MEM_GAUSSIAN[grad])
    return int(NUMBA_MEM_BASE + n_images * width * height * (ps * s + pb) + overlaps * (os_ * s + ob)
               + n_images * num_gaussians * (gs * s + gb))


def _plan_groups(overlaps: list[int], num_gaussians: int, width: int, height: int, itemsize: int, grad: bool,
                 budget: int | None) -> list[tuple[int, int]]:
    """Consecutive groups of images whose estimate (plus the finished images of all) fits ``budget``.

    Raises:
        RenderMemoryError: with gradients over the budget (every image's buffers stay alive until the backward
            pass, so groups would not help), or one image at a time does not fit.
    """
    n = len(overlaps)
    whole = estimate_numba_memory(n, num_gaussians, width, height, sum(overlaps), itemsize, grad)
    if budget is None or whole <= budget:
        return [(0, n)]
    kept = NUMBA_MEM_OUTPUT_PIXEL * itemsize * width * height * n  # the finished images of every group

    def group(a: int, b: int) -> int:
        return kept + estimate_numba_memory(b - a, num_gaussians, width, height, sum(overlaps[a:b]), itemsize, grad)

    one = max(group(i, i + 1) for i in range(n))
    if grad or one > budget:
        what = "rendering and the backward pass" if grad else "rendering"
        raise RenderMemoryError(
            f"render (numba backend): {what} of {n} image(s) of {width}x{height} pixels with {num_gaussians:,} "
            f"Gaussians would need about {whole / GIB:.2f} GiB"
            + ("" if grad else f" ({one / GIB:.2f} GiB even one image at a time, the outputs included)")
            + f", over the memory budget of {budget / GIB:.2f} GiB. Render fewer cameras per call (cameras[i:j]) or a "
            f"smaller image (cameras.resize(width, height)); or change the budget with the environment variable "
            f"FASTAVATAR_RENDER_MEMORY_GB or render(..., memory_budget_gb=...) if the memory is really there.",
            whole, budget, one)
    groups, a = [], 0
    while a < n:
        b = a + 1
        while b < n and group(a, b + 1) <= budget:
            b += 1
        groups.append((a, b))
        a = b
    return groups


def rasterize_numba(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh: Tensor, viewmats: Tensor,
                    Ks: Tensor, width: int, height: int, sh_degree: int = 3, tile_size: int | None = None,
                    near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
                    memory_budget: int | Callable[[], int | None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`fastavatar_nb.render.torch_rasterizer.rasterize` (shapes ``[B, ...]``,
    premultiplied, no background), on the CPU with the compiled kernels.

    ``tile_size=None``: :data:`NUMBA_TILE_SIZE`. ``memory_budget`` (bytes, or a function returning them,
    called only when the estimate is over ``MEMORY_CHECK_FLOOR``): without gradients, images over it are
    blended in groups that fit; with gradients, or when one image does not fit, :class:`RenderMemoryError`.

    Raises:
        RenderMemoryError: over the memory budget (the message says how much is needed and what to do).
    Raises:
        NumbaBackendError: a tensor not on the CPU, a dtype other than float32/float64, an SH degree
            outside 0-3, or numba unavailable (the message says which, and to use ``backend="torch"``).
    """
    _check({"means": means, "quats": quats, "scales": scales, "opacities": opacities, "sh": sh,
            "viewmats": viewmats, "Ks": Ks}, sh_degree)
    K = _kernels()
    B, N = means.shape[:2]
    C = viewmats.shape[1]
    ts = int(tile_size or NUMBA_TILE_SIZE)
    n_images = B * C
    if viewmats.requires_grad or Ks.requires_grad:  # camera gradients: the reference's projection (autograd)
        means2d, conics, depths, op, radii = project(means, quats, scales, opacities, viewmats, Ks, width, height,
                                                     near_plane, far_plane, eps2d)
        campos = torch.linalg.inv(viewmats)[..., :3, 3]  # [B, C, 3]
        dirs = means[:, None, :, :] - campos[:, :, None, :]  # [B, C, N, 3]
        colors = sh_to_color(sh[:, None].expand(B, C, N, 16, 3), dirs, sh_degree)  # [B, C, N, 3]
    else:
        means2d, conics, depths, colors, radii = NumbaProject.apply(
            means, covariance(quats, scales), sh, opacities, viewmats, Ks, width, height, sh_degree, near_plane,
            far_plane, eps2d)
        op = opacities[:, None, :].expand(B, C, N)
    m2, r2, d2 = means2d.reshape(n_images, N, 2), radii.reshape(n_images, N, 2), depths.reshape(n_images, N)
    feats = torch.cat([colors, depths[..., None]], -1).reshape(n_images, N, 4)
    con2, op2 = conics.reshape(n_images, N, 3), op.reshape(n_images, N)
    with torch.no_grad():
        rects = tile_rects(m2, r2, width, height, ts)
        order = torch.argsort(d2.masked_fill(r2[..., 0] <= 0, float("inf")), dim=-1, stable=True)
    groups = [(0, n_images)]
    if memory_budget is not None:
        grad = torch.is_grad_enabled() and feats.requires_grad
        overlaps = ((rects[..., 1] - rects[..., 0]) * (rects[..., 3] - rects[..., 2])).sum(-1).tolist()
        est = estimate_numba_memory(n_images, N, width, height, sum(overlaps), means.element_size(), grad)
        if callable(memory_budget):  # a default budget: looked up only for large renders
            memory_budget = memory_budget() if est > MEMORY_CHECK_FLOOR else None
        groups = _plan_groups(overlaps, N, width, height, means.element_size(), grad, memory_budget)

    def draw(a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
        offsets, ids = _bin(K, rects[a:b], order[a:b], width, height, ts)
        out, alphas = NumbaBlend.apply(m2[a:b], con2[a:b], op2[a:b], feats[a:b], offsets, ids, width, height, ts)
        return finish_blend(out, alphas)

    if len(groups) == 1:
        rgb, alphas, exp_depth = draw(0, n_images)
    else:  # no graph (see _plan_groups): each group written into the outputs, then freed
        rgb = means.new_empty(n_images, height, width, 3)
        alphas, exp_depth = means.new_empty(n_images, height, width), means.new_empty(n_images, height, width)
        for a, b in groups:
            for dst, src in zip((rgb, alphas, exp_depth), draw(a, b), strict=True):
                dst[a:b] = src
    return (rgb.reshape(B, C, height, width, 3), alphas.reshape(B, C, height, width),
            exp_depth.reshape(B, C, height, width))

