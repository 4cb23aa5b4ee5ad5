"""The numba kernels of the compiled CPU backend (imported only through :func:`numba_rasterizer.numba_status`).

Conventions (as in :mod:`~fastavatar_nb.render.torch_rasterizer`): ``I`` images, ``N`` Gaussians per
image, ``T`` tiles per image (``tiles_x * tiles_y``, row-major), overlaps listed tile by tile, each
tile's list front to back; a Gaussian is named by its flat index ``image * N + n``. Pixel centres sit
at ``+0.5``. The features are RGB and camera depth (``F = 4``). Every float is computed in the dtype of
the inputs: the constants arrive in a small array of that dtype, so float32 stays float32 as in the
torch reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}
"""Every kernel releases the GIL: the caller runs one per thread, each on its share ``range(lo, hi, step)``."""
NUM_FEATURES = 4
SLOT_WIDTH = 6 + NUM_FEATURES
"""Per-overlap gradient slot: d means2d (x, y), d conic (a, b, c), d opacity, d features (4)."""
PARAM_WIDTH = 16
"""Packed overlap row (64 bytes in float32): 0-1 mean (x, y), 2-4 conic (a, b, c), 5 opacity, 6-9 features,
10 skip threshold ``t = log(alpha_min / opacity) - SKIP_MARGIN``, and the ellipse ``-sigma >= t`` in pixels:
11 ``centre_slope = -b / a``, 12 ``span_a = (b^2 - a c) / a^2``, 13 ``span_b = -2 t / a``, 14 ``y_extent =
sqrt(span_b / -span_a)``; 15 unused."""
SPAN_MARGIN_PX = 0.05
"""Pixels by which an ellipse's rows and spans are widened: far more than the rounding of its float32
coefficients (a pixel inside still gets the exact test, so a wider span only costs time)."""
SKIP_MARGIN = 1e-3
"""Margin (in ``-sigma``) of the skip threshold below ``log(alpha_min / opacity)``: far more than float
rounding, so a skipped contribution is certainly below alpha_min."""


@njit(**_OPTS)
def bin_count(rects, order, tiles_x, counts, lo, hi, step):  # pragma: no cover - compiled
    """Overlaps per tile, ``counts [I * T]``, for the images ``range(lo, hi, step)``.
    ``rects [I, N, 4]`` (x0, x1, y0, y1, half-open), ``order [I, N]`` front to back."""
    n = order.shape[1]
    n_tiles = counts.shape[0] // order.shape[0]
    for i in range(lo, hi, step):
        base = i * n_tiles
        for j in range(n):
            g = order[i, j]
            for ty in range(rects[i, g, 2], rects[i, g, 3]):
                for tx in range(rects[i, g, 0], rects[i, g, 1]):
                    counts[base + ty * tiles_x + tx] += 1


@njit(**_OPTS)
def bin_fill(rects, order, tiles_x, offsets, ids, lo, hi, step):  # pragma: no cover - compiled
    """Each tile's Gaussians front to back: ``ids[offsets[t]:offsets[t + 1]]`` (flat ``image * N + n``)."""
    n = order.shape[1]
    n_tiles = (offsets.shape[0] - 1) // order.shape[0]
    for i in range(lo, hi, step):
        base = i * n_tiles
        cursor = offsets[base:base + n_tiles].copy()
        for j in range(n):
            g = order[i, j]
            for ty in range(rects[i, g, 2], rects[i, g, 3]):
                for tx in range(rects[i, g, 0], rects[i, g, 1]):
                    t = ty * tiles_x + tx
                    ids[cursor[t]] = i * n + g
                    cursor[t] += 1


@njit(**_OPTS)
def _span(lo_f, hi_f, x0, x1):  # pragma: no cover - compiled
    """Integers ``[lo, hi)`` of ``[x0, x1)`` inside the real interval ``[lo_f, hi_f]`` widened by ``SPAN_MARGIN_PX``."""
    first = np.ceil(lo_f - SPAN_MARGIN_PX)
    last = np.floor(hi_f + SPAN_MARGIN_PX) + 1.0
    lo = x0 if first < x0 else (x1 if first > x1 else int(first))
    hi = x1 if last > x1 else (x0 if last < x0 else int(last))
    return lo, hi


@njit(**_OPTS)
def _ellipse_rows(tp, k, y0, y1):  # pragma: no cover - compiled
    """The rows ``[lo, hi)`` of ``[y0, y1)`` that overlap ``k``'s skip ellipse reaches (``|dy| <= y_extent``)."""
    my, y_ext = float(tp[k, 1]), float(tp[k, 14])
    return _span(my - 0.5 - y_ext, my - 0.5 + y_ext, y0, y1)


@njit(**_OPTS)
def _ellipse_span(tp, k, cy, x0, x1):  # pragma: no cover - compiled
    """The pixels ``[lo, hi)`` of ``[x0, x1)`` in the row at centre ``cy`` inside overlap ``k``'s skip ellipse:
    ``dx`` within ``centre_slope * dy +- sqrt(span_a dy^2 + span_b)``, in float64."""
    dy = float(cy) - float(tp[k, 1])
    half = np.sqrt(max(float(tp[k, 12]) * dy * dy + float(tp[k, 13]), 0.0))
    mid = float(tp[k, 0]) - 0.5 + float(tp[k, 11]) * dy
    return _span(mid - half, mid + half, x0, x1)


@njit(**_OPTS)
def blend_forward(offsets, tp, centres, width, height, tile_size, consts, out, alpha_out, t_final, last,
                  lo, hi, step):  # pragma: no cover - compiled
    """Front-to-back compositing of the tiles ``range(lo, hi, step)`` (of ``I * T``); writes
    ``out [I, H, W, 4]``, ``alpha_out [I, H, W]``, the transmittance left ``t_final [I, H, W]`` and ``last
    [I, H, W]`` (the end, exclusive, of the overlaps each pixel used).

    ``tp [M, PARAM_WIDTH]`` packs, for every overlap in the binned order, its Gaussian's row (see
    ``PARAM_WIDTH``). Within a tile the overlaps go front to back, and each reaches only the pixels
    inside the ellipse where ``-sigma`` is at least its skip threshold ``log(alpha_min / opacity) -
    SKIP_MARGIN`` (rows within ``|dy| <= y_extent``, and in each row ``dx`` within ``centre_slope * dy +-
    sqrt(span_a dy^2 + span_b)``, widened by ``SPAN_MARGIN_PX``): outside it ``o exp(-sigma) < alpha_min``
    and the pixel would skip the overlap anyway. Each pixel inside gets the exact test. The tile stops
    once all its pixels are done. ``consts`` = (alpha_min, alpha_max, transmittance_min, -0.5, 1, 0) in
    the inputs' dtype; ``centres[k] = k + 0.5``.
    """
    a_min, a_max, t_min, m_half, one, zero = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5]
    tiles_x = (width + tile_size - 1) // tile_size
    n_tiles = tiles_x * ((height + tile_size - 1) // tile_size)
    P = tile_size * tile_size
    T = np.empty(P, tp.dtype)
    acc = np.empty((P, NUM_FEATURES + 1), tp.dtype)
    stop = np.empty(P, np.int64)
    done = np.empty(P, np.bool_)
    for tile in range(lo, hi, step):
        start, end = offsets[tile], offsets[tile + 1]
        if start == end:
            continue
        i = tile // n_tiles
        y0 = ((tile % n_tiles) // tiles_x) * tile_size
        x0 = ((tile % n_tiles) % tiles_x) * tile_size
        x1 = min(x0 + tile_size, width)
        y1 = min(y0 + tile_size, height)
        nx = x1 - x0
        n_pixels = nx * (y1 - y0)
        for p in range(n_pixels):
            T[p] = one
            for f in range(NUM_FEATURES + 1):
                acc[p, f] = zero
            stop[p] = end
            done[p] = False
        n_done = 0
        for k in range(start, end):
            mx, my, ca, cb, cc, op, th = tp[k, 0], tp[k, 1], tp[k, 2], tp[k, 3], tp[k, 4], tp[k, 5], tp[k, 10]
            f0, f1, f2, f3 = tp[k, 6], tp[k, 7], tp[k, 8], tp[k, 9]
            row_lo, row_hi = _ellipse_rows(tp, k, y0, y1)
            for py in range(row_lo, row_hi):
                cy = centres[py]
                span_lo, span_hi = _ellipse_span(tp, k, cy, x0, x1)
                row = (py - y0) * nx - x0
                dy = cy - my
                sy = (m_half * cc * dy * dy)
                by = cb * dy
                for px in range(span_lo, span_hi):
                    p = row + px
                    if done[p]:
                        continue
                    dx = centres[px] - mx
                    ns = (m_half * ca * dx * dx) + sy - by * dx
                    if ns < th:
                        continue
                    alpha = min(a_max, op * np.exp(ns))
                    if alpha < a_min:
                        continue
                    t_next = T[p] * (one - alpha)
                    if t_next <= t_min:
                        stop[p] = k
                        done[p] = True
                        n_done += 1
                        continue
                    w = alpha * T[p]
                    acc[p, 0] += w * f0
                    acc[p, 1] += w * f1
                    acc[p, 2] += w * f2
                    acc[p, 3] += w * f3
                    acc[p, 4] += w
                    T[p] = t_next
            if n_done == n_pixels:
                break
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * nx + px - x0
                for f in range(NUM_FEATURES):
                    out[i, py, px, f] = acc[p, f]
                alpha_out[i, py, px] = acc[p, NUM_FEATURES]
                t_final[i, py, px] = T[p]
                last[i, py, px] = stop[p]


@njit(**_OPTS)
def blend_backward(offsets, tp, centres, width, height, tile_size, consts, grad_out, grad_alpha,
                   t_final, last, slots, lo, hi, step):  # pragma: no cover - compiled
    """Gradients of :func:`blend_forward` into per-overlap ``slots [M, SLOT_WIDTH]``.

    Back to front per pixel (gsplat's order), over the same ellipses as the forward pass: from the
    transmittance left, ``T_d = T_{d+1} / (1 - alpha_d)`` recovers each entry's transmittance, and with
    ``g_d = grad_out . f_d + grad_alpha`` the reference's ``BlendWeights`` gradient is
    ``dL/dalpha_d = g_d T_d - (sum_{j>d} g_j w_j) / (1 - alpha_d)``, the suffix sum accumulating as the pass
    goes; then through ``alpha = o exp(-sigma)`` (not where it was capped).
    """
    a_min, a_max, m_half, one, zero = consts[0], consts[1], consts[3], consts[4], consts[5]
    tiles_x = (width + tile_size - 1) // tile_size
    n_tiles = tiles_x * ((height + tile_size - 1) // tile_size)
    P = tile_size * tile_size
    T = np.empty(P, tp.dtype)
    suffix = np.empty(P, tp.dtype)
    go = np.empty((P, NUM_FEATURES + 1), tp.dtype)
    end = np.empty(P, np.int64)
    for tile in range(lo, hi, step):
        start = offsets[tile]
        if start == offsets[tile + 1]:
            continue
        i = tile // n_tiles
        y0 = ((tile % n_tiles) // tiles_x) * tile_size
        x0 = ((tile % n_tiles) % tiles_x) * tile_size
        x1 = min(x0 + tile_size, width)
        y1 = min(y0 + tile_size, height)
        nx = x1 - x0
        k_top = start
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * nx + px - x0
                T[p] = t_final[i, py, px]
                suffix[p] = zero
                nonzero = grad_alpha[i, py, px] != zero
                for f in range(NUM_FEATURES):
                    go[p, f] = grad_out[i, py, px, f]
                    nonzero = nonzero or go[p, f] != zero
                go[p, NUM_FEATURES] = grad_alpha[i, py, px]
                end[p] = last[i, py, px] if nonzero else start
                k_top = max(k_top, end[p])
        for k in range(k_top - 1, start - 1, -1):
            mx, my, a, b, c, op, th = tp[k, 0], tp[k, 1], tp[k, 2], tp[k, 3], tp[k, 4], tp[k, 5], tp[k, 10]
            f0, f1, f2, f3 = tp[k, 6], tp[k, 7], tp[k, 8], tp[k, 9]
            row_lo, row_hi = _ellipse_rows(tp, k, y0, y1)
            g0 = zero
            g1 = zero
            g2 = zero
            g3 = zero
            g4 = zero
            g5 = zero
            g6 = zero
            g7 = zero
            g8 = zero
            g9 = zero
            for py in range(row_lo, row_hi):
                cy = centres[py]
                span_lo, span_hi = _ellipse_span(tp, k, cy, x0, x1)
                row = (py - y0) * nx - x0
                dy = cy - my
                sy = (m_half * c * dy * dy)
                by = b * dy
                for px in range(span_lo, span_hi):
                    p = row + px
                    if k >= end[p]:
                        continue
                    dx = centres[px] - mx
                    ns = (m_half * a * dx * dx) + sy - by * dx
                    if ns < th:
                        continue
                    e = np.exp(ns)
                    raw = op * e
                    alpha = min(a_max, raw)
                    if alpha < a_min:
                        continue
                    t_k = T[p] / (one - alpha)
                    T[p] = t_k
                    w = alpha * t_k
                    gk = (go[p, 0] * f0 + go[p, 1] * f1 + go[p, 2] * f2 + go[p, 3] * f3) + go[p, 4]
                    d_alpha = gk * t_k - suffix[p] / (one - alpha)
                    suffix[p] += gk * w
                    g6 += w * go[p, 0]
                    g7 += w * go[p, 1]
                    g8 += w * go[p, 2]
                    g9 += w * go[p, 3]
                    if raw <= a_max:
                        g5 += d_alpha * e
                        d_ns = d_alpha * raw
                        g0 += d_ns * (a * dx + b * dy)
                        g1 += d_ns * (c * dy + b * dx)
                        g2 += d_ns * (m_half * dx * dx)
                        g3 += d_ns * (-(dx * dy))
                        g4 += d_ns * (m_half * dy * dy)
            slots[k, 0] = g0
            slots[k, 1] = g1
            slots[k, 2] = g2
            slots[k, 3] = g3
            slots[k, 4] = g4
            slots[k, 5] = g5
            slots[k, 6] = g6
            slots[k, 7] = g7
            slots[k, 8] = g8
            slots[k, 9] = g9


@njit(**_OPTS)
def sum_slots(offsets, ids, slots, tiles_per_image, grads, lo, hi, step):  # pragma: no cover - compiled
    """``grads[g] += slots[k]`` for every overlap ``k`` of Gaussian ``g``; one thread per image (a Gaussian
    index belongs to one image, so no two threads write the same row)."""
    width = slots.shape[1]
    for i in range(lo, hi, step):
        for k in range(offsets[i * tiles_per_image], offsets[(i + 1) * tiles_per_image]):
            g = ids[k]
            for j in range(width):
                grads[g, j] += slots[k, j]


def constants(dtype, alpha_min: float, alpha_max: float, transmittance_min: float) -> np.ndarray:
    """The kernels' constants in ``dtype`` (see :func:`blend_forward`)."""
    return np.array([alpha_min, alpha_max, transmittance_min, -0.5, 1.0, 0.0], dtype=dtype)


def pixel_centres(size: int, dtype) -> np.ndarray:
    """``[size]`` pixel centres ``k + 0.5`` in ``dtype``."""
    return (np.arange(size, dtype=np.float64) + 0.5).astype(dtype)


# ------------------------------------------------------------------ projection and colour, fused
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


@njit(**_OPTS)
def _sh_bases(x, y, z, out):  # pragma: no cover - compiled
    """``out[:16]`` = the real SH bases at the unit direction (x, y, z) (:func:`fastavatar_nb.render.sh.eval_sh_bases`)."""
    xx, yy, zz = x * x, y * y, z * z
    out[0] = SH_C0
    out[1] = -SH_C1 * y
    out[2] = SH_C1 * z
    out[3] = -SH_C1 * x
    out[4] = SH_C2[0] * x * y
    out[5] = SH_C2[1] * y * z
    out[6] = SH_C2[2] * (2 * zz - xx - yy)
    out[7] = SH_C2[3] * x * z
    out[8] = SH_C2[4] * (xx - yy)
    out[9] = SH_C3[0] * y * (3 * xx - yy)
    out[10] = SH_C3[1] * x * y * z
    out[11] = SH_C3[2] * y * (4 * zz - xx - yy)
    out[12] = SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy)
    out[13] = SH_C3[4] * x * (4 * zz - xx - yy)
    out[14] = SH_C3[5] * z * (xx - yy)
    out[15] = SH_C3[6] * x * (xx - 3 * yy)


@njit(**_OPTS)
def _sh_gradients(x, y, z, gx, gy, gz):  # pragma: no cover - compiled
    """``gx, gy, gz [16]`` = d/dx, d/dy, d/dz of the 16 bases of :func:`_sh_bases`."""
    xx, yy, zz = x * x, y * y, z * z
    for k in range(16):
        gx[k] = 0.0
        gy[k] = 0.0
        gz[k] = 0.0
    gx[3] = -SH_C1
    gy[1] = -SH_C1
    gz[2] = SH_C1
    gx[4], gy[4] = SH_C2[0] * y, SH_C2[0] * x
    gy[5], gz[5] = SH_C2[1] * z, SH_C2[1] * y
    gx[6], gy[6], gz[6] = SH_C2[2] * (-2 * x), SH_C2[2] * (-2 * y), SH_C2[2] * 4 * z
    gx[7], gz[7] = SH_C2[3] * z, SH_C2[3] * x
    gx[8], gy[8] = SH_C2[4] * 2 * x, SH_C2[4] * (-2 * y)
    gx[9], gy[9] = SH_C3[0] * 6 * x * y, SH_C3[0] * (3 * xx - 3 * yy)
    gx[10], gy[10], gz[10] = SH_C3[1] * y * z, SH_C3[1] * x * z, SH_C3[1] * x * y
    gx[11], gy[11], gz[11] = SH_C3[2] * (-2 * x * y), SH_C3[2] * (4 * zz - xx - 3 * yy), SH_C3[2] * 8 * y * z
    gx[12], gy[12], gz[12] = SH_C3[3] * (-6 * x * z), SH_C3[3] * (-6 * y * z), SH_C3[3] * (6 * zz - 3 * xx - 3 * yy)
    gx[13], gy[13], gz[13] = SH_C3[4] * (4 * zz - 3 * xx - yy), SH_C3[4] * (-2 * x * y), SH_C3[4] * 8 * x * z
    gx[14], gy[14], gz[14] = SH_C3[5] * 2 * x * z, SH_C3[5] * (-2 * y * z), SH_C3[5] * (xx - yy)
    gx[15], gy[15] = SH_C3[6] * (3 * xx - 3 * yy), SH_C3[6] * (-6 * x * y)


@njit(**_OPTS)
def _to_camera(means, covars, viewmats, b, n, c):  # pragma: no cover - compiled
    """Camera-space mean ``R mu + t`` and covariance ``R Sigma R^T`` (9-tuple, row-major)."""
    R = viewmats[b, c]
    mx, my, mz = means[b, n, 0], means[b, n, 1], means[b, n, 2]
    x = R[0, 0] * mx + R[0, 1] * my + R[0, 2] * mz + R[0, 3]
    y = R[1, 0] * mx + R[1, 1] * my + R[1, 2] * mz + R[1, 3]
    z = R[2, 0] * mx + R[2, 1] * my + R[2, 2] * mz + R[2, 3]
    S = covars[b, n]
    # RS = R Sigma, then (R Sigma) R^T
    rs00 = R[0, 0] * S[0, 0] + R[0, 1] * S[1, 0] + R[0, 2] * S[2, 0]
    rs01 = R[0, 0] * S[0, 1] + R[0, 1] * S[1, 1] + R[0, 2] * S[2, 1]
    rs02 = R[0, 0] * S[0, 2] + R[0, 1] * S[1, 2] + R[0, 2] * S[2, 2]
    rs10 = R[1, 0] * S[0, 0] + R[1, 1] * S[1, 0] + R[1, 2] * S[2, 0]
    rs11 = R[1, 0] * S[0, 1] + R[1, 1] * S[1, 1] + R[1, 2] * S[2, 1]
    rs12 = R[1, 0] * S[0, 2] + R[1, 1] * S[1, 2] + R[1, 2] * S[2, 2]
    rs20 = R[2, 0] * S[0, 0] + R[2, 1] * S[1, 0] + R[2, 2] * S[2, 0]
    rs21 = R[2, 0] * S[0, 1] + R[2, 1] * S[1, 1] + R[2, 2] * S[2, 1]
    rs22 = R[2, 0] * S[0, 2] + R[2, 1] * S[1, 2] + R[2, 2] * S[2, 2]
    c00 = rs00 * R[0, 0] + rs01 * R[0, 1] + rs02 * R[0, 2]
    c01 = rs00 * R[1, 0] + rs01 * R[1, 1] + rs02 * R[1, 2]
    c02 = rs00 * R[2, 0] + rs01 * R[2, 1] + rs02 * R[2, 2]
    c10 = rs10 * R[0, 0] + rs11 * R[0, 1] + rs12 * R[0, 2]
    c11 = rs10 * R[1, 0] + rs11 * R[1, 1] + rs12 * R[1, 2]
    c12 = rs10 * R[2, 0] + rs11 * R[2, 1] + rs12 * R[2, 2]
    c20 = rs20 * R[0, 0] + rs21 * R[0, 1] + rs22 * R[0, 2]
    c21 = rs20 * R[1, 0] + rs21 * R[1, 1] + rs22 * R[1, 2]
    c22 = rs20 * R[2, 0] + rs21 * R[2, 1] + rs22 * R[2, 2]
    return x, y, z, (c00, c01, c02, c10, c11, c12, c20, c21, c22)


@njit(**_OPTS)
def _jacobian(x, y, z, fx, fy, cx, cy, width, height):  # pragma: no cover - compiled
    """EWA's ``J`` entries ``(j00, j02, j11, j12)`` with gsplat's clipping, the clipped ``x/z``, ``y/z`` and
    whether each was clipped."""
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    rx = x / z
    ry = y / z
    rxc = min(max(rx, -lim_x_neg), lim_x_pos)
    ryc = min(max(ry, -lim_y_neg), lim_y_pos)
    tx = z * rxc
    ty = z * ryc
    return fx / z, -fx * tx / (z * z), fy / z, -fy * ty / (z * z), tx, ty, rxc != rx, ryc != ry


@njit(**_OPTS)
def project_forward(means, covars, sh, opacities, viewmats, Ks, campos, width, height, sh_degree, near_plane,
                    far_plane, eps2d, alpha_min, extent_sigmas, means2d, conics, depths, radii,
                    colors, lo, hi, step):  # pragma: no cover - compiled
    """Steps 1-5 of the reference for every (subject ``b``, camera ``c``, Gaussian ``n``): the 2D mean, the
    conic of the blurred 2D covariance, the camera depth, the culled extent (0 = culled) and the SH colour.

    Inputs: means ``[B, N, 3]``, covars ``[B, N, 3, 3]`` (world), sh ``[B, N, 16, 3]``, opacities ``[B, N]``,
    viewmats ``[B, C, 4, 4]``, Ks ``[B, C, 3, 3]``, campos ``[B, C, 3]``. Outputs ``[B, C, N, ...]``.
    """
    N = means.shape[1]
    C = viewmats.shape[1]
    n_coef = (sh_degree + 1) * (sh_degree + 1)
    bases = np.empty(16, np.float64)
    for bn in range(lo, hi, step):
        b, n = bn // N, bn % N
        op = opacities[b, n]
        for c in range(C):
            x, y, z, S = _to_camera(means, covars, viewmats, b, n, c)
            fx, fy, cx, cy = Ks[b, c, 0, 0], Ks[b, c, 1, 1], Ks[b, c, 0, 2], Ks[b, c, 1, 2]
            j00, j02, j11, j12, tx, ty, _, _ = _jacobian(x, y, z, fx, fy, cx, cy, width, height)
            # Sigma2d = J S J^T with J = [[j00, 0, j02], [0, j11, j12]]
            v0x, v0y, v0z = j00 * S[0] + j02 * S[6], j00 * S[1] + j02 * S[7], j00 * S[2] + j02 * S[8]
            v1x, v1y, v1z = j11 * S[3] + j12 * S[6], j11 * S[4] + j12 * S[7], j11 * S[5] + j12 * S[8]
            s00 = v0x * j00 + v0z * j02
            s01 = v0y * j11 + v0z * j12
            s10 = v1x * j00 + v1z * j02
            s11 = v1y * j11 + v1z * j12
            a = s00 + eps2d
            bb = 0.5 * (s01 + s10)
            cc = s11 + eps2d
            det = a * cc - bb * bb
            safe = det if det > 0 else 1.0
            u = fx * x / z + cx
            v = fy * y / z + cy
            means2d[b, c, n, 0] = u
            means2d[b, c, n, 1] = v
            conics[b, c, n, 0] = cc / safe
            conics[b, c, n, 1] = -bb / safe
            conics[b, c, n, 2] = a / safe
            depths[b, c, n] = z
            # opacity-aware extent and culling (screen_radii)
            ext = min(np.sqrt(2.0 * np.log(max(max(op, 1e-12) / alpha_min, 1.0))), extent_sigmas)
            rx = np.ceil(ext * np.sqrt(max(a, 0.0)))
            ry = np.ceil(ext * np.sqrt(max(cc, 0.0)))
            keep = (z > near_plane) and (z < far_plane) and (det > 0) and (op >= alpha_min) and (rx > 0 or ry > 0)
            keep = keep and (u + rx > 0) and (u - rx < width) and (v + ry > 0) and (v - ry < height)
            keep = keep and np.isfinite(u) and np.isfinite(v) and np.isfinite(rx) and np.isfinite(ry)
            radii[b, c, n, 0] = int(rx) if keep else 0
            radii[b, c, n, 1] = int(ry) if keep else 0
            # colour: SH at the direction camera centre -> Gaussian
            dx = means[b, n, 0] - campos[b, c, 0]
            dy = means[b, n, 1] - campos[b, c, 1]
            dz = means[b, n, 2] - campos[b, c, 2]
            norm = max(np.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
            _sh_bases(dx / norm, dy / norm, dz / norm, bases)
            for ch in range(3):
                acc = 0.0
                for k in range(n_coef):
                    acc += bases[k] * sh[b, n, k, ch]
                colors[b, c, n, ch] = max(acc + 0.5, 0.0)


@njit(**_OPTS)
def project_backward(means, covars, sh, viewmats, Ks, campos, width, height, sh_degree, eps2d, radii,
                     g_means2d, g_conics, g_depths, g_colors, d_means, d_covars, d_sh, lo, hi, step):  # pragma: no cover - compiled
    """Gradients of :func:`project_forward` w.r.t. means ``[B, N, 3]``, world covariances ``[B, N, 3, 3]`` and
    SH ``[B, N, 16, 3]``, summed over the cameras (one thread per Gaussian: no shared writes). Culled
    Gaussians (``radii`` 0) drew nothing and get nothing.

    The chain, per camera: conic = inverse of the blurred ``Sigma2d`` (``dL/dSigma2d = -X G X`` with ``X``
    the conic matrix); ``Sigma2d = J Sigma_c J^T`` (``dL/dSigma_c = J^T G2 J``, ``dL/dJ = 2 G2 J Sigma_c``);
    ``J`` and the 2D mean through ``(x, y, z)``, with the clipping of ``x/z``, ``y/z``; ``mu_c = R mu + t``,
    ``Sigma_c = R Sigma R^T``; the colour ``max(SH(d) . sh + 0.5, 0)`` with ``d`` the normalised direction.
    """
    N = means.shape[1]
    C = viewmats.shape[1]
    n_coef = (sh_degree + 1) * (sh_degree + 1)
    bases = np.empty(16, np.float64)
    bgx, bgy, bgz = np.empty(16, np.float64), np.empty(16, np.float64), np.empty(16, np.float64)
    dS = np.empty((3, 3), np.float64)
    RdS = np.empty((3, 3), np.float64)
    for bn in range(lo, hi, step):
        b, n = bn // N, bn % N
        for c in range(C):
            if radii[b, c, n, 0] == 0 and radii[b, c, n, 1] == 0:
                continue
            R = viewmats[b, c]
            x, y, z, S = _to_camera(means, covars, viewmats, b, n, c)
            fx, fy, cx, cy = Ks[b, c, 0, 0], Ks[b, c, 1, 1], Ks[b, c, 0, 2], Ks[b, c, 1, 2]
            j00, j02, j11, j12, tx, ty, clip_x, clip_y = _jacobian(x, y, z, fx, fy, cx, cy, width, height)
            v0x, v0y, v0z = j00 * S[0] + j02 * S[6], j00 * S[1] + j02 * S[7], j00 * S[2] + j02 * S[8]
            v1x, v1y, v1z = j11 * S[3] + j12 * S[6], j11 * S[4] + j12 * S[7], j11 * S[5] + j12 * S[8]
            a = v0x * j00 + v0z * j02 + eps2d
            bb = 0.5 * ((v0y * j11 + v0z * j12) + (v1x * j00 + v1z * j02))
            cc = v1y * j11 + v1z * j12 + eps2d
            det = a * cc - bb * bb
            # conic X = [[A, Bc], [Bc, C]] = inverse of [[a, bb], [bb, cc]]; G = dL/dX (off-diagonal split)
            A, Bc, Cc = cc / det, -bb / det, a / det
            gA, gB, gC = g_conics[b, c, n, 0], g_conics[b, c, n, 1] * 0.5, g_conics[b, c, n, 2]
            # XG, then -(XG)X
            xg00 = A * gA + Bc * gB
            xg01 = A * gB + Bc * gC
            xg10 = Bc * gA + Cc * gB
            xg11 = Bc * gB + Cc * gC
            g00 = -(xg00 * A + xg01 * Bc)
            g01 = -(xg00 * Bc + xg01 * Cc)
            g10 = -(xg10 * A + xg11 * Bc)
            g11 = -(xg10 * Bc + xg11 * Cc)
            g01 = 0.5 * (g01 + g10)  # Sigma2d's off-diagonal enters as the mean of its two entries
            # dL/dSigma_c = J^T G2 J, J = [[j00, 0, j02], [0, j11, j12]], G2 = [[g00, g01], [g01, g11]]
            # rows of G2 J: (g00 j00, g01 j11, g00 j02 + g01 j12), (g01 j00, g11 j11, g01 j02 + g11 j12)
            h00, h01, h02 = g00 * j00, g01 * j11, g00 * j02 + g01 * j12
            h10, h11, h12 = g01 * j00, g11 * j11, g01 * j02 + g11 * j12
            dS00, dS01, dS02 = j00 * h00, j00 * h01, j00 * h02
            dS10, dS11, dS12 = j11 * h10, j11 * h11, j11 * h12
            dS20 = j02 * h00 + j12 * h10
            dS21 = j02 * h01 + j12 * h11
            dS22 = j02 * h02 + j12 * h12
            # dL/dJ = G2 J S^T + G2^T J S = H (S + S^T) with H = G2 J; only j00, j02, j11, j12 are variables
            s01, s02, s12 = S[1] + S[3], S[2] + S[6], S[5] + S[7]
            dj00 = h00 * 2.0 * S[0] + h01 * s01 + h02 * s02
            dj02 = h00 * s02 + h01 * s12 + h02 * 2.0 * S[8]
            dj11 = h10 * s01 + h11 * 2.0 * S[4] + h12 * s12
            dj12 = h10 * s02 + h11 * s12 + h12 * 2.0 * S[8]
            # J -> (x, y, z): j00 = fx/z, j02 = -fx tx/z^2, j11 = fy/z, j12 = -fy ty/z^2
            z2 = z * z
            gx = 0.0
            gy = 0.0
            gz = -fx / z2 * dj00 - fy / z2 * dj11 + 2.0 * fx * tx / (z2 * z) * dj02 + 2.0 * fy * ty / (z2 * z) * dj12
            g_tx = -fx / z2 * dj02
            g_ty = -fy / z2 * dj12
            if clip_x:
                gz += g_tx * (tx / z)
            else:
                gx += g_tx
            if clip_y:
                gz += g_ty * (ty / z)
            else:
                gy += g_ty
            # the 2D mean and the depth
            gu, gv = g_means2d[b, c, n, 0], g_means2d[b, c, n, 1]
            gx += gu * fx / z
            gy += gv * fy / z
            gz += -gu * fx * x / z2 - gv * fy * y / z2 + g_depths[b, c, n]
            # mu_c = R mu + t: dL/dmu = R^T g
            for j in range(3):
                d_means[b, n, j] += R[0, j] * gx + R[1, j] * gy + R[2, j] * gz
            # Sigma_c = R Sigma R^T: dL/dSigma = R^T dS R
            dS[0, 0], dS[0, 1], dS[0, 2] = dS00, dS01, dS02
            dS[1, 0], dS[1, 1], dS[1, 2] = dS10, dS11, dS12
            dS[2, 0], dS[2, 1], dS[2, 2] = dS20, dS21, dS22
            for p in range(3):  # R^T dS
                for q in range(3):
                    RdS[p, q] = R[0, p] * dS[0, q] + R[1, p] * dS[1, q] + R[2, p] * dS[2, q]
            for p in range(3):  # (R^T dS) R
                for q in range(3):
                    d_covars[b, n, p, q] += RdS[p, 0] * R[0, q] + RdS[p, 1] * R[1, q] + RdS[p, 2] * R[2, q]
            # colour
            dx = means[b, n, 0] - campos[b, c, 0]
            dy = means[b, n, 1] - campos[b, c, 1]
            dz = means[b, n, 2] - campos[b, c, 2]
            norm = max(np.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
            ux, uy, uz = dx / norm, dy / norm, dz / norm
            _sh_bases(ux, uy, uz, bases)
            _sh_gradients(ux, uy, uz, bgx, bgy, bgz)
            gux = 0.0
            guy = 0.0
            guz = 0.0
            for ch in range(3):
                gc = g_colors[b, c, n, ch]
                if gc == 0.0:
                    continue
                acc = 0.0
                for k in range(n_coef):
                    acc += bases[k] * sh[b, n, k, ch]
                if acc + 0.5 < 0.0:  # clamped at 0: no gradient
                    continue
                for k in range(n_coef):
                    d_sh[b, n, k, ch] += bases[k] * gc
                    gux += bgx[k] * sh[b, n, k, ch] * gc
                    guy += bgy[k] * sh[b, n, k, ch] * gc
                    guz += bgz[k] * sh[b, n, k, ch] * gc
            dot = ux * gux + uy * guy + uz * guz
            d_means[b, n, 0] += (gux - ux * dot) / norm
            d_means[b, n, 1] += (guy - uy * dot) / norm
            d_means[b, n, 2] += (guz - uz * dot) / norm


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for float32, on one Gaussian and a one-tile image."""
    dtype = np.float32
    rects = np.array([[[0, 1, 0, 1]]], np.int32)
    order = np.zeros((1, 1), np.int64)
    counts = np.zeros(1, np.int64)
    bin_count(rects, order, 1, counts, 0, 1, 1)
    offsets = np.zeros(2, np.int64)
    offsets[1:] = np.cumsum(counts)
    ids = np.empty(offsets[-1], np.int64)
    bin_fill(rects, order, 1, offsets, ids, 0, 1, 1)
    params = np.array([[2.0, 2.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, -5.0, 0.0, -1.0, 10.0, 3.2, 0.0]], dtype)
    cen, k = pixel_centres(4, dtype), constants(dtype, 1 / 255, 0.999, 1e-4)
    out = np.zeros((1, 4, 4, NUM_FEATURES), dtype)
    al, t_final = np.zeros((1, 4, 4), dtype), np.zeros((1, 4, 4), dtype)
    last = np.zeros((1, 4, 4), np.int64)
    tp = params[ids]
    blend_forward(offsets, tp, cen, 4, 4, 4, k, out, al, t_final, last, 0, 1, 1)
    slots = np.zeros((ids.shape[0], SLOT_WIDTH), dtype)
    blend_backward(offsets, tp, cen, 4, 4, 4, k, np.ones_like(out), np.ones_like(al), t_final, last, slots, 0, 1, 1)
    grads = np.zeros((1, SLOT_WIDTH), dtype)
    sum_slots(offsets, ids, slots, 1, grads, 0, 1, 1)
    means = np.zeros((1, 1, 3), dtype)
    covars = (np.eye(3, dtype=dtype) * 1e-4)[None, None]
    sh = np.zeros((1, 1, 16, 3), dtype)
    op = np.full((1, 1), 0.5, dtype)
    view = np.eye(4, dtype=dtype)[None, None].copy()
    view[0, 0, 2, 3] = 1.0
    Ks = np.array([[[[100.0, 0, 2], [0, 100.0, 2], [0, 0, 1]]]], dtype)
    campos = np.array([[[0.0, 0.0, -1.0]]], dtype)
    m2, con, dep, col = (np.zeros((1, 1, 1, d), dtype) for d in (2, 3, 1, 3))
    dep = dep[..., 0]
    radii = np.zeros((1, 1, 1, 2), np.int32)
    project_forward(means, covars, sh, op, view, Ks, campos, 4, 4, 3, 0.01, 1e10, 0.3, 1 / 255, 3.33, m2, con, dep,
                    radii, col, 0, 1, 1)
    project_backward(means, covars, sh, view, Ks, campos, 4, 4, 3, 0.3, radii, np.ones_like(m2), np.ones_like(con),
                     np.ones_like(dep), np.ones_like(col), np.zeros_like(means), np.zeros_like(covars),
                     np.zeros_like(sh), 0, 1, 1)
