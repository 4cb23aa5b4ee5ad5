"""A pure-PyTorch, differentiable, tile-based 3D Gaussian Splatting rasterizer.

This is the reference renderer of fastavatar-nb: it runs on CPU and GPU, needs no
compilation, and follows gsplat's conventions closely enough that the two agree to
about 1e-3 per pixel. It is written to be read; notebook 01 derives it step by step.

The pipeline, one function per step (shapes use ``B`` for flattened batch, ``C``
cameras, ``N`` Gaussians):

1. :func:`world_to_camera` -- means and covariances into each camera's frame.
2. :func:`perspective_projection` -- EWA splatting: 2D means and covariances
   ``Sigma' = J W Sigma W^T J^T`` with the Jacobian ``J`` of the pinhole projection.
3. :func:`conics_from_covariances` -- add the 0.3 px low-pass and invert (the "conic").
4. :func:`screen_radii` -- opacity-aware 3-sigma extent per axis, and culling
   (near plane, degenerate, off-screen, too transparent).
5. :mod:`~fastavatar_nb.render.sh` -- view-dependent colour from spherical harmonics.
6. :func:`bin_tiles` -- list every (tile, Gaussian) overlap, sorted by tile then depth.
7. :func:`alpha_blend` -- front-to-back compositing, paper Eq. (1):
   ``C = sum_d c_d a_d prod_{j<d} (1 - a_j)``, with gsplat's rules (alpha capped at
   0.999, contributions below 1/255 skipped, a pixel stops once its transmittance
   would fall to 1e-4).

Only steps 2, 3, 5 and 7 carry gradients; the integer bookkeeping (4, 6) does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..gaussians import covariance
from .sh import sh_to_color

__all__ = [
    "ALPHA_MAX", "ALPHA_MIN", "TRANSMITTANCE_MIN",
    "world_to_camera", "perspective_projection", "conics_from_covariances", "screen_radii",
    "TILE_OVERHEAD_PX", "TileBins", "auto_tile_size", "bin_tiles", "BlendWeights", "alpha_blend", "finish_blend", "rasterize",
    "RenderMemoryError", "MEMORY_CHECK_FLOOR", "overlaps_per_image", "estimate_memory", "plan_image_chunks",
]

ALPHA_MAX = 0.999
"""Largest alpha a single Gaussian may contribute (gsplat)."""
ALPHA_MIN = 1.0 / 255.0
"""Contributions below this alpha are skipped (gsplat)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops accumulating before its transmittance would fall to this value (gsplat)."""
EXTENT_SIGMAS = 3.33
"""Screen extent in standard deviations before the opacity-aware tightening (gsplat)."""


def world_to_camera(means: Tensor, covars: Tensor, viewmats: Tensor) -> tuple[Tensor, Tensor]:
    """Transform Gaussians into camera frames.

    Args:
        means: ``[B, N, 3]`` world centres.
        covars: ``[B, N, 3, 3]`` world covariances.
        viewmats: ``[B, C, 4, 4]`` OpenCV world-to-camera.

    Returns:
        ``means_c [B, C, N, 3]`` and ``covars_c [B, C, N, 3, 3]`` (``R Sigma R^T``).
    """
    R = viewmats[..., :3, :3]  # [B, C, 3, 3]
    t = viewmats[..., :3, 3]  # [B, C, 3]
    means_c = torch.einsum("bcij,bnj->bcni", R, means) + t[:, :, None, :]
    covars_c = torch.einsum("bcij,bnjk,bclk->bcnil", R, covars, R)
    return means_c, covars_c


def perspective_projection(means_c: Tensor, covars_c: Tensor, Ks: Tensor, width: int,
                           height: int) -> tuple[Tensor, Tensor]:
    """EWA projection of camera-space Gaussians through a pinhole camera.

    ``mean2d = (fx x/z + cx, fy y/z + cy)`` and ``Sigma2d = J Sigma_c J^T`` with
    ``J = [[fx/z, 0, -fx x/z^2], [0, fy/z, -fy y/z^2]]``. As in gsplat, ``x/z`` and ``y/z``
    inside ``J`` are clipped to 30% beyond the field of view, so Gaussians far outside the
    image do not blow up.

    Args:
        means_c: ``[B, C, N, 3]``; covars_c: ``[B, C, N, 3, 3]``; Ks: ``[B, C, 3, 3]``.

    Returns:
        ``means2d [B, C, N, 2]`` (pixels, centres at +0.5) and ``covars2d [B, C, N, 2, 2]``.
    """
    x, y, z = means_c.unbind(-1)
    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [B, C, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], -1)
    J = J.reshape(z.shape + (2, 3))
    covars2d = J @ covars_c @ J.transpose(-1, -2)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    return means2d, covars2d


def conics_from_covariances(covars2d: Tensor, eps2d: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """Add the screen-space low-pass ``eps2d * I`` and invert.

    Returns:
        ``conics [..., 3]`` = ``(a, b, c)`` of the inverse covariance ``[[a, b], [b, c]]``,
        the blurred covariances ``[..., 2, 2]``, and their determinants ``[...]`` (``<= 0``
        marks a degenerate Gaussian).
    """
    blurred = covars2d + eps2d * torch.eye(2, dtype=covars2d.dtype, device=covars2d.device)
    a, b, c = blurred[..., 0, 0], 0.5 * (blurred[..., 0, 1] + blurred[..., 1, 0]), blurred[..., 1, 1]
    det = a * c - b * b
    safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / safe, -b / safe, a / safe], -1)
    return conics, blurred, det


@torch.no_grad()
def screen_radii(means2d: Tensor, covars2d: Tensor, det: Tensor, depths: Tensor, opacities: Tensor,
                 width: int, height: int, near_plane: float = 0.01, far_plane: float = 1e10) -> Tensor:
    """Per-axis pixel extent of each projected Gaussian; 0 where it is culled.

    The extent is ``ceil(k * sigma_axis)`` with ``k = min(3.33, sqrt(2 ln(opacity * 255)))``:
    beyond it the Gaussian's alpha is below 1/255 and would be skipped anyway.

    Args:
        means2d ``[..., 2]``, covars2d ``[..., 2, 2]`` (blurred), det ``[...]``,
        depths ``[...]`` (camera z), opacities ``[...]``.

    Returns:
        ``radii [..., 2]`` int64.
    """
    op = opacities.clamp_min(1e-12)
    extend = torch.clamp(torch.sqrt(2.0 * torch.log((op / ALPHA_MIN).clamp_min(1.0))), max=EXTENT_SIGMAS)
    rx = torch.ceil(extend * torch.sqrt(covars2d[..., 0, 0].clamp_min(0)))
    ry = torch.ceil(extend * torch.sqrt(covars2d[..., 1, 1].clamp_min(0)))
    keep = (depths > near_plane) & (depths < far_plane) & (det > 0) & (opacities >= ALPHA_MIN)
    keep &= (rx > 0) | (ry > 0)
    mx, my = means2d[..., 0], means2d[..., 1]
    keep &= (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
    keep &= torch.isfinite(mx) & torch.isfinite(my)
    radii = torch.stack([rx, ry], -1).nan_to_num(0.0).to(torch.int64)
    return radii * keep[..., None]


TILE_OVERHEAD_PX = 10.0
"""Fixed cost of one (tile, Gaussian) overlap in the torch rasterizer, in units of per-pixel work
(fitted to ``benchmarks/render.py`` tile sweeps on an idle 2-core CPU:
``benchmarks/results/render_cpu_tiles.json``)."""


@torch.no_grad()
def auto_tile_size(means2d: Tensor, radii: Tensor, candidates: tuple[int, ...] = (4, 8, 16)) -> int:
    """The tile edge with the lowest estimated blending cost for this set of projected Gaussians.

    Cost model: ``M(t) * (t^2 + TILE_OVERHEAD_PX)`` where ``M(t)`` is the number of
    (tile, Gaussian) overlaps with tiles of edge ``t`` (exact, from the extents) and ``t^2``
    the pixels each overlap evaluates. Small tiles waste fewer pixels around small Gaussians;
    large ones have fewer overlaps. On the heads of ``benchmarks/render.py`` (2.5k and 10k
    Gaussians at 69x100, 138x200, 275x401) it picks the measured fastest tile in all six cases
    (4 px in five, 8 px for 2.5k Gaussians at 275x401); 4 and 8 px are within about 10% of each
    other there, 16 px is 1.1-6x slower.

    Args:
        means2d: ``[..., 2]`` projected centres; radii: ``[..., 2]`` extents (0 = culled).
    """
    r = radii.reshape(-1, 2).to(means2d.dtype)
    m = means2d.reshape(-1, 2)
    vis = r[:, 0] > 0
    if not vis.any():
        return candidates[-1]
    r, m = r[vis], m[vis]

    def cost(t: int) -> float:
        nx = torch.ceil((m[:, 0] + r[:, 0]) / t) - torch.floor((m[:, 0] - r[:, 0]) / t)
        ny = torch.ceil((m[:, 1] + r[:, 1]) / t) - torch.floor((m[:, 1] - r[:, 1]) / t)
        return float((nx * ny).sum()) * (t * t + TILE_OVERHEAD_PX)

    return min(candidates, key=cost)


@dataclass
class TileBins:
    """Every (tile, Gaussian) overlap, sorted by image, then tile, then depth.

    Attributes:
        gaussian_ids: ``[M]`` index into the flattened ``[I * N]`` projected Gaussians.
        tile_ids: ``[M]`` global tile index ``image * tiles_per_image + ty * tiles_x + tx``.
        segment_starts: ``[M]`` position in these arrays of the first overlap of the same tile.
        tiles_x, tiles_y: tile grid size per image; num_images: ``I``; tile_size: pixels.
    """

    gaussian_ids: Tensor
    tile_ids: Tensor
    segment_starts: Tensor
    tiles_x: int
    tiles_y: int
    num_images: int
    tile_size: int

    @property
    def counts_per_tile(self) -> Tensor:
        """``[I, tiles_y, tiles_x]`` number of Gaussians overlapping each tile."""
        n = self.num_images * self.tiles_x * self.tiles_y
        counts = torch.bincount(self.tile_ids, minlength=n)
        return counts.reshape(self.num_images, self.tiles_y, self.tiles_x)


@torch.no_grad()
def bin_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int,
              tile_size: int = 16) -> TileBins:
    """List the tiles each Gaussian touches and sort the overlaps for blending.

    Args:
        means2d: ``[I, N, 2]`` pixel centres of the Gaussians in each of ``I`` images.
        radii: ``[I, N, 2]`` per-axis extents from :func:`screen_radii` (0 = culled).
        depths: ``[I, N]`` camera z, the sort key within a tile (front to back).

    Returns:
        :class:`TileBins`.
    """
    n_images, N = depths.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    dev = means2d.device
    # Sort the Gaussians of each image front to back once; overlaps are generated in this
    # order, and a stable sort by tile keeps it inside every tile.
    order = torch.argsort(depths.masked_fill(radii[..., 0] <= 0, float("inf")), dim=-1)
    flat = (order + torch.arange(n_images, device=dev)[:, None] * N).reshape(-1)  # [I*N], image-major, by depth
    m = means2d.reshape(-1, 2)[flat] / tile_size
    r = radii.reshape(-1, 2)[flat].to(means2d.dtype) / tile_size
    x0 = torch.floor(m[:, 0] - r[:, 0]).clamp(0, tiles_x).long()
    x1 = torch.ceil(m[:, 0] + r[:, 0]).clamp(0, tiles_x).long()
    y0 = torch.floor(m[:, 1] - r[:, 1]).clamp(0, tiles_y).long()
    y1 = torch.ceil(m[:, 1] + r[:, 1]).clamp(0, tiles_y).long()
    nx = x1 - x0
    counts = nx * (y1 - y0) * (radii.reshape(-1, 2)[flat, 0] > 0)
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(flat.numel(), device=dev), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(total, device=dev) - first[owner]
    nxo = nx[owner]
    tx = x0[owner] + k % nxo.clamp_min(1)
    ty = y0[owner] + k // nxo.clamp_min(1)
    image = flat[owner] // N
    tile_ids = image * (tiles_x * tiles_y) + ty * tiles_x + tx
    tile_ids, perm = torch.sort(tile_ids, stable=True)
    gaussian_ids = flat[owner][perm]
    _, seg_counts = torch.unique_consecutive(tile_ids, return_counts=True)
    seg_first = torch.cumsum(seg_counts, 0) - seg_counts
    segment_starts = torch.repeat_interleave(seg_first, seg_counts, output_size=total)
    return TileBins(gaussian_ids, tile_ids, segment_starts, tiles_x, tiles_y, n_images, tile_size)


class BlendWeights(torch.autograd.Function):
    """Blending weights ``w_d = alpha_d T_d`` along dim 1, ``T_d = prod_{j<d} (1 - alpha_j)``.

    Entries whose inclusive transmittance ``T_d (1 - alpha_d)`` is at most 1e-4 get weight 0
    (the pixel is done, gsplat's rule); that cut-off is not differentiated.

    Forward is two lines of PyTorch; the backward is written out because autograd's
    ``cumprod`` backward is slow on CPU. With ``g_d = dL/dw_d``:
    ``dL/dalpha_d = g_d T_d - (sum_{j>d} g_j w_j) / (1 - alpha_d)``, the suffix sum being the
    total minus an inclusive cumulative sum (``tests/test_render.py`` checks it against finite
    differences).
    """

    @staticmethod
    def forward(ctx, alpha: Tensor) -> Tensor:
        T_incl = torch.cumprod(1.0 - alpha, dim=1)
        T = torch.cat([torch.ones_like(T_incl[:, :1]), T_incl[:, :-1]], dim=1)
        T = T * (T_incl > TRANSMITTANCE_MIN)
        w = alpha * T
        ctx.save_for_backward(alpha, T, w)
        return w

    @staticmethod
    def backward(ctx, grad_w: Tensor) -> Tensor:
        alpha, T, w = ctx.saved_tensors
        gw = grad_w * w
        csum = torch.cumsum(gw, dim=1)
        suffix = csum[:, -1:] - csum  # sum over later entries j > d
        return grad_w * T - suffix / (1.0 - alpha)


def alpha_blend(bins: TileBins, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                width: int, height: int) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of the binned Gaussians (paper Eq. 1).

    For overlap ``d`` of a tile and each pixel ``p`` of that tile:
    ``alpha_d = min(0.999, o_d exp(-sigma_d(p)))`` with
    ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` (skipped below 1/255); the transmittance
    ``T_d = prod_{j<d} (1 - alpha_j)``; the weight ``w_d = alpha_d T_d`` while
    ``T_d (1 - alpha_d) > 1e-4``, else 0 (the pixel is done). Each pixel's value is
    ``sum_d w_d f_d``.

    Implementation: alphas are computed for the flat list of overlaps ``[M, P]``
    (``P = tile_size^2`` pixels); then every tile's depth-sorted list is padded with
    transparent entries to a common length ``L``, ``[tiles, L, P]``, so the transmittance is a
    cumulative product along ``L`` and the sum over Gaussians is one batched matrix product.
    Tiles are grouped by list length (powers of two) and each group padded to its own
    longest list, so padding at most doubles the work however uneven the tiles are.

    Args:
        bins: from :func:`bin_tiles`.
        means2d: ``[I, N, 2]``; conics: ``[I, N, 3]``; opacities: ``[I, N]``.
        features: ``[I, N, F]`` per-Gaussian values to composite (e.g. RGB and depth).

    Returns:
        ``(features [I, H, W, F], alphas [I, H, W])``, premultiplied (no background).
    """
    F_ = features.shape[-1]
    ts = bins.tile_size
    P = ts * ts
    dtype, dev = means2d.dtype, means2d.device
    g = bins.gaussian_ids
    M = g.numel()
    n_tiles = bins.num_images * bins.tiles_x * bins.tiles_y
    out = torch.zeros(n_tiles, P, F_ + 1, dtype=dtype, device=dev)
    if M > 0:
        # alpha of every (overlap, pixel) pair: [M, ts (rows), ts (columns)]
        local = bins.tile_ids % (bins.tiles_x * bins.tiles_y)
        offs = torch.arange(ts, device=dev, dtype=dtype) + 0.5  # pixel centres inside a tile
        mu = means2d.reshape(-1, 2)[g]
        con = conics.reshape(-1, 3)[g]
        dx = ((local % bins.tiles_x) * ts).to(dtype)[:, None] + offs - mu[:, 0:1]  # [M, ts]
        dy = ((local // bins.tiles_x) * ts).to(dtype)[:, None] + offs - mu[:, 1:2]  # [M, ts]
        a, b, c = con[:, 0:1], con[:, 1:2], con[:, 2:3]
        neg_sigma = (-0.5 * a * dx * dx)[:, None, :] + (-0.5 * c * dy * dy)[:, :, None] \
            - (b * dy)[:, :, None] * dx[:, None, :]
        alpha = torch.clamp_max(opacities.reshape(-1)[g][:, None, None] * torch.exp(neg_sigma), ALPHA_MAX)
        del neg_sigma  # [M, ts, ts]: not needed by autograd (exp saves its output), free it now
        alpha = alpha * (alpha >= ALPHA_MIN)
        feats = torch.cat([features.reshape(-1, F_)[g], torch.ones(M, 1, dtype=dtype, device=dev)], -1)
        alpha = alpha.reshape(M, P)
        with torch.no_grad():
            tiles, counts = torch.unique_consecutive(bins.tile_ids, return_counts=True)
            S = tiles.numel()
            seg = torch.repeat_interleave(torch.arange(S, device=dev), counts, output_size=M)
            pos = torch.arange(M, device=dev) - bins.segment_starts
            # tiles whose lists have similar lengths share a padded block: lengths in (2^(b-1), 2^b]
            bucket = torch.ceil(torch.log2(counts.to(torch.float64))).long()
        for b in torch.unique(bucket).tolist():
            with torch.no_grad():
                segs = torch.nonzero(bucket == b).squeeze(1)  # the tiles of this block
                L = int(counts[segs].max())
                local = torch.full((S,), -1, dtype=torch.long, device=dev)
                local[segs] = torch.arange(segs.numel(), device=dev)
                rows = torch.nonzero(local[seg] >= 0).squeeze(1)  # their overlaps, in order
                slot = local[seg[rows]] * L + pos[rows]
            # pad each tile's depth-sorted list to L entries: [tiles, L, P] and [tiles, L, F+1]
            n = segs.numel()
            alpha_p = torch.zeros(n * L, P, dtype=dtype, device=dev).index_copy(0, slot, alpha[rows]).reshape(n, L, P)
            feat_p = torch.zeros(n * L, F_ + 1, dtype=dtype, device=dev).index_copy(0, slot, feats[rows])
            w = BlendWeights.apply(alpha_p)  # [n, L, P]: alpha_d T_d, 0 once the pixel is done
            per_tile = torch.bmm(w.transpose(1, 2), feat_p.reshape(n, L, F_ + 1))  # [n, P, F+1]
            out = out.index_copy(0, tiles[segs], per_tile)
    if M == 0 and features.requires_grad:  # nothing drawn: keep the graph so a backward still runs (zero grads)
        out = out + 0.0 * features.sum()
    img = out.reshape(bins.num_images, bins.tiles_y, bins.tiles_x, ts, ts, F_ + 1)
    img = img.permute(0, 1, 3, 2, 4, 5).reshape(bins.num_images, bins.tiles_y * ts, bins.tiles_x * ts, F_ + 1)
    img = img[:, :height, :width]
    return img[..., :F_], img[..., F_]


# ------------------------------------------------------------------------------------ memory
GIB = 1024 ** 3
MEMORY_CHECK_FLOOR = 256 * 1024 ** 2
"""Estimates below this many bytes are not compared with a default (looked-up) budget."""


class RenderMemoryError(MemoryError):
    """The torch rasterizer would need more memory than the budget, even one image at a time.

    Attributes: ``estimate`` (bytes, the whole call), ``budget`` (bytes), ``one_image`` (bytes
    the call would need with the images drawn one at a time).
    """

    def __init__(self, message: str, estimate: int, budget: int, one_image: int):
        super().__init__(message)
        self.estimate, self.budget, self.one_image = estimate, budget, one_image


# Bytes per element, read off the code and checked with a tensor-allocation tracker
# (tests/test_render_memory.py; measured/estimated is 0.57-0.95 over 200-20k Gaussians, 1-16 cameras,
# 16x23 to 2000x2916 pixels, tiles 4-16, with and without gradients). ``s`` is the dtype's size.
MEM_PROJECTION = 110
"""Peak elements (x s) per Gaussian per image while projecting and shading: covariances,
Jacobians, conics, radii, and SH (``bases[..., None] * sh`` alone is 48)."""
MEM_PROJECTION_KEPT = (45, 125)
"""Elements (x s) per Gaussian per image that stay alive during blending (without, with grad)."""
MEM_BINS_BYTES = 90
"""Peak bytes per (tile, Gaussian) overlap in :func:`bin_tiles` (int64 ids, sort, segments)."""
MEM_OVERLAP = 12
"""Elements (x s) per overlap in :func:`alpha_blend` besides its pixels (centre, conic, features),
plus ``2 x tile_size`` (the ``dx``, ``dy`` offsets)."""
MEM_BLEND = (7, 12)
"""Peak elements (x s) per overlap-pixel (``M x tile_size^2``) while blending one group of images
(without, with grad): the ``[M, P]`` alphas and the padded ``[tiles, L, P]`` blocks of the
transmittance (padding at most doubles a block)."""
MEM_BLEND_SAVED = 10
"""Elements (x s) per overlap-pixel that autograd keeps for the backward pass (every group)."""
MEM_BACKWARD = 8
"""Extra elements (x s) per overlap-pixel of the largest group while the backward pass runs."""
MEM_BLEND_PIXEL = 15
"""Elements (x s) per padded pixel inside :func:`alpha_blend` (the tile buffer, its copies)."""
MEM_OUTPUT_PIXEL = (5, 16)
"""Elements (x s) per pixel of the outputs (without, with grad): colours, alphas and depths (5);
with grad also the concatenation of groups and the compositing over the background in
:func:`fastavatar_nb.render.render` (without grad it is done in place, one image at a time)."""


@torch.no_grad()
def overlaps_per_image(means2d: Tensor, radii: Tensor, width: int, height: int, tile_size: int) -> Tensor:
    """``[I]`` number of (tile, Gaussian) overlaps of each image, as :func:`bin_tiles` would list them.

    Args: means2d ``[I, N, 2]``, radii ``[I, N, 2]`` (0 = culled).
    """
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    m = means2d / tile_size
    r = radii.to(means2d.dtype) / tile_size
    nx = torch.ceil(m[..., 0] + r[..., 0]).clamp(0, tiles_x) - torch.floor(m[..., 0] - r[..., 0]).clamp(0, tiles_x)
    ny = torch.ceil(m[..., 1] + r[..., 1]).clamp(0, tiles_y) - torch.floor(m[..., 1] - r[..., 1]).clamp(0, tiles_y)
    counts = (nx * ny).nan_to_num(0.0) * (radii[..., 0] > 0)
    return counts.sum(-1).to(torch.int64)


def estimate_memory(overlaps: Tensor | list[int], num_gaussians: int, width: int, height: int, tile_size: int,
                    itemsize: int = 4, grad: bool = False, chunks: list[tuple[int, int]] | None = None) -> int:
    """Estimated peak bytes of :func:`rasterize` (plus the compositing in ``render``).

    ``peak = s * (P_proj * I * N) + max over groups g of [s * kept * I * N + saved(groups <= g)
    + (90 + s (12 + 2 t)) M_g + s * blend * M_g t^2 + s * 15 * px_g + s * 5 * px_done]``, then the outputs
    ``s * (5 | 16) * I * H * W`` (without, with grad), with ``I`` images, ``N`` Gaussians, ``M_g`` the overlaps of a group of
    images drawn together (``chunks``; default all at once), ``t`` the tile edge and ``s`` the
    dtype's size; with ``grad`` autograd's saved tensors (``10 s M t^2`` over all groups) and a
    backward pass (``8 s M_g t^2`` for the largest group) are added. The constants are
    ``MEM_*`` above.

    Args:
        overlaps: ``[I]`` overlaps per image (:func:`overlaps_per_image`).
    """
    ov = [int(v) for v in (overlaps.tolist() if isinstance(overlaps, Tensor) else overlaps)]
    n_images = len(ov)
    if chunks is None:
        chunks = [(0, n_images)]
    s, P = itemsize, tile_size * tile_size
    px = width * height
    padpx = math.ceil(width / tile_size) * tile_size * math.ceil(height / tile_size) * tile_size
    gi = n_images * num_gaussians
    peak = s * MEM_PROJECTION * gi
    kept = s * MEM_PROJECTION_KEPT[grad] * gi
    saved = 0
    largest_group = 0
    for start, stop in chunks:
        M = sum(ov[start:stop])
        largest_group = max(largest_group, M)
        if grad:
            saved += s * MEM_BLEND_SAVED * M * P
        if len(chunks) == 1:
            done = 0
        else:  # without grad the outputs are allocated first; with grad the groups' results pile up
            done = s * MEM_OUTPUT_PIXEL[0] * px * (start if grad else n_images)
        work = (MEM_BINS_BYTES + s * (MEM_OVERLAP + 2 * tile_size)) * M + s * MEM_BLEND[grad] * M * P + s * MEM_BLEND_PIXEL * padpx * (stop - start)
        peak = max(peak, kept + saved + done + work)
    outputs = kept + saved + s * MEM_OUTPUT_PIXEL[grad] * px * n_images
    peak = max(peak, outputs)
    if grad:
        peak = max(peak, outputs + s * MEM_BACKWARD * largest_group * P)
    return int(peak)


def plan_image_chunks(overlaps: Tensor | list[int], num_gaussians: int, width: int, height: int, tile_size: int,
                      budget: int, itemsize: int = 4, grad: bool = False) -> tuple[list[tuple[int, int]], int]:
    """Group consecutive images so that :func:`estimate_memory` stays within ``budget`` bytes.

    Returns:
        ``(chunks, estimate)``: ``[(start, stop), ...]`` (one group when everything fits at once)
        and the estimated peak with that grouping.

    Raises:
        RenderMemoryError: not even one image at a time fits.
    """
    ov = [int(v) for v in (overlaps.tolist() if isinstance(overlaps, Tensor) else overlaps)]
    n = len(ov)
    args = (num_gaussians, width, height, tile_size, itemsize, grad)
    whole = estimate_memory(ov, *args)
    if whole <= budget or n <= 1:
        if whole > budget:
            raise _memory_error(whole, budget, whole, n, *args)
        return [(0, n)], whole
    singles = [(i, i + 1) for i in range(n)]
    one = estimate_memory(ov, *args, chunks=singles)
    if one > budget:
        raise _memory_error(whole, budget, one, n, *args)
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < n:  # greedy: grow each group while the estimate stays within budget
        stop = start + 1
        while stop < n and estimate_memory(ov, *args, chunks=chunks + [(start, stop + 1)] + singles[stop + 1:]) <= budget:
            stop += 1
        chunks.append((start, stop))
        start = stop
    return chunks, estimate_memory(ov, *args, chunks=chunks)


def _memory_error(estimate: int, budget: int, one: int, n_images: int, num_gaussians: int, width: int,
                  height: int, tile_size: int, itemsize: int, grad: bool) -> RenderMemoryError:
    what = "rendering and the backward pass" if grad else "rendering"
    return RenderMemoryError(
        f"render (torch backend): {what} of {n_images} image(s) of {width}x{height} pixels with "
        f"{num_gaussians:,} Gaussians would need about {estimate / GIB:.2f} GiB "
        f"({one / GIB:.2f} GiB even one image at a time, the outputs included), over the memory budget of "
        f"{budget / GIB:.2f} GiB. Render fewer cameras per call (cameras[i:j]) or a smaller image "
        f"(cameras.resize(width, height)); or change the budget with the environment variable "
        f"FASTAVATAR_RENDER_MEMORY_GB or render(..., memory_budget_gb=...) if the memory is really there.",
        estimate, budget, one,
    )


def finish_blend(out: Tensor, alphas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``alpha_blend``'s ``[I, H, W, 4]`` sums and ``[I, H, W]`` alphas -> premultiplied RGB, alphas and
    the expected depth (the z sum over alpha, 0 where nothing is drawn)."""
    rgb = out[..., :3].contiguous()
    zsum = out[..., 3]
    exp_depth = torch.where(alphas > 1e-10, zsum / alphas.clamp_min(1e-10), torch.zeros_like(zsum))
    return rgb, alphas.contiguous(), exp_depth


def project(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
            width: int, height: int, near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-4 for ``B`` Gaussian sets, each seen by its ``C`` cameras (shapes as in :func:`rasterize`).

    Returns:
        ``means2d [B, C, N, 2]``, ``conics [B, C, N, 3]``, ``depths [B, C, N]`` (camera z),
        ``opacities [B, C, N]`` (expanded over the cameras) and ``radii [B, C, N, 2]`` (0 = culled).
    """
    B, N = means.shape[:2]
    C = viewmats.shape[1]
    covars = covariance(quats, scales)  # [B, N, 3, 3]
    means_c, covars_c = world_to_camera(means, covars, viewmats)
    means2d, covars2d = perspective_projection(means_c, covars_c, Ks, width, height)
    conics, blurred, det = conics_from_covariances(covars2d, eps2d)
    depths = means_c[..., 2]  # [B, C, N]
    op = opacities[:, None, :].expand(B, C, N)
    radii = screen_radii(means2d, blurred, det, depths, op, width, height, near_plane, far_plane)
    return means2d, conics, depths, op, radii


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh: Tensor, viewmats: Tensor,
              Ks: Tensor, width: int, height: int, sh_degree: int = 3, tile_size: int | None = None,
              near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
              return_meta: bool = False, memory_budget: int | Callable[[], int | None] | None = None):
    """Render ``B`` Gaussian sets, each from its ``C`` cameras (all steps above).

    Args:
        means ``[B, N, 3]``, quats ``[B, N, 4]`` (wxyz), scales ``[B, N, 3]`` (activated),
        opacities ``[B, N]`` (activated), sh ``[B, N, 16, 3]``,
        viewmats ``[B, C, 4, 4]``, Ks ``[B, C, 3, 3]``.

    ``tile_size=None`` picks it from the Gaussians' screen size (:func:`auto_tile_size`).

    ``memory_budget`` (bytes, or a function returning them or ``None``, called only when the
    estimate is over :data:`MEMORY_CHECK_FLOOR`): when the estimated peak (:func:`estimate_memory`, from the exact
    number of tile overlaps of each image) is over it, the images are binned and blended in
    groups that fit (the same pixels, gradients flow through every group); when one image at a
    time does not fit either, :class:`RenderMemoryError`. ``None``: everything at once, no check.

    Returns:
        ``colors [B, C, H, W, 3]`` (premultiplied, no background), ``alphas [B, C, H, W]``,
        ``depths [B, C, H, W]`` (expected camera z, 0 where nothing is drawn), and with
        ``return_meta`` a dict with ``means2d, conics, radii, depths`` per Gaussian and the
        :class:`TileBins` (``None`` when the images were drawn in groups).
    """
    B, N = means.shape[:2]
    C = viewmats.shape[1]
    means2d, conics, depths, op, radii = project(means, quats, scales, opacities, viewmats, Ks, width, height,
                                                 near_plane, far_plane, eps2d)
    campos = torch.linalg.inv(viewmats)[..., :3, 3]  # [B, C, 3]
    dirs = means[:, None, :, :] - campos[:, :, None, :]  # [B, C, N, 3]
    colors = sh_to_color(sh[:, None].expand(B, C, N, 16, 3), dirs, sh_degree)  # [B, C, N, 3]
    n_images = B * C
    if tile_size is None:
        tile_size = auto_tile_size(means2d, radii)
    m2, r2, d2 = means2d.reshape(n_images, N, 2), radii.reshape(n_images, N, 2), depths.reshape(n_images, N)
    feats = torch.cat([colors, depths[..., None]], -1).reshape(n_images, N, 4)
    con2, op2 = conics.reshape(n_images, N, 3), op.reshape(n_images, N)
    chunks = [(0, n_images)]
    if memory_budget is not None:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means, quats, scales, opacities, sh, viewmats, Ks))
        ov = overlaps_per_image(m2, r2, width, height, tile_size)
        args = (N, width, height, tile_size)
        if callable(memory_budget):  # a default budget: look it up only for large renders
            if estimate_memory(ov, *args, means.element_size(), grad) <= MEMORY_CHECK_FLOOR:
                memory_budget = None
            else:
                memory_budget = memory_budget()
        if memory_budget is not None:
            chunks, _ = plan_image_chunks(ov, *args, int(memory_budget), means.element_size(), grad)
    if len(chunks) == 1:
        bins = bin_tiles(m2, r2, d2, width, height, tile_size)
        out, alphas = alpha_blend(bins, m2, con2, op2, feats, width, height)
        rgb, alphas, exp_depth = finish_blend(out, alphas)
    else:  # groups of images, each finished on its own: the same pixels as one pass (test_render_memory.py)
        bins = None
        parts = [finish_blend(*alpha_blend(bin_tiles(m2[a:b], r2[a:b], d2[a:b], width, height, tile_size),
                                      m2[a:b], con2[a:b], op2[a:b], feats[a:b], width, height))
                 for a, b in chunks[:1]]
        if torch.is_grad_enabled() and parts[0][0].requires_grad:
            for a, b in chunks[1:]:
                parts.append(finish_blend(*alpha_blend(bin_tiles(m2[a:b], r2[a:b], d2[a:b], width, height, tile_size),
                                                  m2[a:b], con2[a:b], op2[a:b], feats[a:b], width, height)))
            rgb, alphas, exp_depth = (torch.cat(t) for t in zip(*parts, strict=True))
        else:  # no graph: write each group into the outputs, so the peak is the outputs and one group
            first = parts.pop()
            rgb, alphas, exp_depth = (t.new_empty((n_images, *t.shape[1:])) for t in first)
            for (a, b), vals in zip(chunks, [first] + [None] * (len(chunks) - 1), strict=True):
                if vals is None:
                    vals = finish_blend(*alpha_blend(bin_tiles(m2[a:b], r2[a:b], d2[a:b], width, height, tile_size),
                                                m2[a:b], con2[a:b], op2[a:b], feats[a:b], width, height))
                for dst, src in zip((rgb, alphas, exp_depth), vals, strict=True):
                    dst[a:b] = src
                del vals
    rgb = rgb.reshape(B, C, height, width, 3)
    alphas = alphas.reshape(B, C, height, width)
    exp_depth = exp_depth.reshape(B, C, height, width)
    if return_meta:
        meta = {"means2d": means2d, "conics": conics, "radii": radii, "depths": depths, "bins": bins}
        return rgb, alphas, exp_depth, meta
    return rgb, alphas, exp_depth
