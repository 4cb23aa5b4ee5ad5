"""Signed-distance primitives and a batched sphere tracer (pure PyTorch, CPU or CUDA).

Used by :mod:`fastavatar_nb.data.synthetic` to render ground-truth heads with a renderer that
is *not* the Gaussian splatting model fitted later.

Convention: points are passed as three coordinate tensors ``x, y, z`` of one shape ``[N]``
(keeping the coordinates apart avoids slicing in the hot loop); all shape scalars are Python
floats in metres. Every primitive returns a distance bound ``[N]`` (negative inside) that may
underestimate the true distance (safe for sphere tracing) and is exact on the surface.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ellipsoid", "capsule", "smin", "smax", "sphere_trace", "ray_sphere_interval"]

SDF = Callable[[Tensor, Tensor, Tensor], Tensor]
"""A signed-distance function ``(x [N], y [N], z [N]) -> d [N]``."""


def ellipsoid(x: Tensor, y: Tensor, z: Tensor, c: tuple[float, float, float],
              r: tuple[float, float, float]) -> Tensor:
    """Distance bound to the axis-aligned ellipsoid with centre ``c`` and radii ``r``.

    Uses the first-order bound ``k0 (k0 - 1) / k1`` with ``k0 = |q / r|``, ``k1 = |q / r^2|``.
    """
    ax, ay, az = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    k0 = torch.sqrt(ax * ax + ay * ay + az * az)
    bx, by, bz = ax / r[0], ay / r[1], az / r[2]
    k1 = torch.sqrt(bx * bx + by * by + bz * bz).clamp_min(1e-6)
    return k0 * (k0 - 1.0) / k1


def capsule(x: Tensor, y: Tensor, z: Tensor, a: tuple[float, float, float], b: tuple[float, float, float],
            ra: float, rb: float) -> Tensor:
    """Distance bound to a capsule from ``a`` (radius ``ra``) to ``b`` (radius ``rb``), radius linear in between."""
    bax, bay, baz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    bb = bax * bax + bay * bay + baz * baz
    px, py, pz = x - a[0], y - a[1], z - a[2]
    h = ((px * bax + py * bay + pz * baz) / bb).clamp(0.0, 1.0)
    qx, qy, qz = px - h * bax, py - h * bay, pz - h * baz
    return torch.sqrt(qx * qx + qy * qy + qz * qz) - (ra + (rb - ra) * h)


def smin(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum (smooth union) with blend width ``k`` metres."""
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Smooth maximum (smooth intersection; ``smax(a, -b)`` carves ``b`` out of ``a``)."""
    return -smin(-a, -b, k)


def ray_sphere_interval(ox: Tensor, oy: Tensor, oz: Tensor, dx: Tensor, dy: Tensor, dz: Tensor,
                        center: tuple[float, float, float], radius: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances ``(t0 [N], t1 [N])`` of unit rays through a sphere.

    Rays that miss get ``t0 > t1``. ``t0`` is clamped at 0 (origins inside the sphere).
    """
    px, py, pz = ox - center[0], oy - center[1], oz - center[2]
    b = px * dx + py * dy + pz * dz
    c = px * px + py * py + pz * pz - radius * radius
    disc = b * b - c
    s = torch.sqrt(disc.clamp_min(0.0))
    t0, t1 = (-b - s).clamp_min(0.0), -b + s
    t1 = torch.where(disc > 0, t1, torch.full_like(t1, -1.0))
    return t0, t1


def sphere_trace(sdf: SDF, ox: Tensor, oy: Tensor, oz: Tensor, dx: Tensor, dy: Tensor, dz: Tensor,
                 t0: Tensor, t1: Tensor, max_steps: int = 96, eps: float = 2e-4,
                 step_scale: float = 0.9) -> tuple[Tensor, Tensor]:
    """March unit rays ``o + t d`` from ``t0`` until ``sdf < eps`` (hit) or ``t > t1`` (miss).

    Only rays still marching are evaluated (the active set shrinks every step).

    Args:
        sdf: ``(x, y, z) -> d``, a distance bound.
        ox, oy, oz, dx, dy, dz: ``[N]`` ray origins and unit directions.
        t0, t1: ``[N]`` interval to search (e.g. from :func:`ray_sphere_interval`).
        max_steps: step budget; rays still marching at the end count as hits when
            ``sdf < 20 eps`` (grazing rays), else as misses.
        eps: hit threshold in metres.
        step_scale: fraction of the distance bound stepped (below 1 for warped fields).

    Returns:
        ``(t [N], hit [N] bool)``: the ray parameter of the hit (undefined for misses).
    """
    t = t0.clone()
    hit = torch.zeros_like(t0, dtype=torch.bool)
    idx = torch.nonzero(t0 <= t1).squeeze(-1)
    state = [v.index_select(0, idx) for v in (ox, oy, oz, dx, dy, dz, t1)]
    at = t.index_select(0, idx)
    alive = torch.ones_like(at, dtype=torch.bool)
    d = at
    for _ in range(max_steps):
        if idx.numel() == 0:
            break
        aox, aoy, aoz, adx, ady, adz, at1 = state
        d = sdf(aox + at * adx, aoy + at * ady, aoz + at * adz)
        done_hit = (d < eps) & alive
        at = torch.where(done_hit | ~alive, at, at + step_scale * d)
        done = done_hit | ((at > at1) & alive)
        n_done = int(done.sum())
        if n_done:
            fin = torch.nonzero(done).squeeze(-1)
            t[idx[fin]] = at[fin]
            hit[idx[fin]] = done_hit[fin]
            alive = alive & ~done
            # compact the active set once enough rays have finished (index_select is cheap, masks are not);
            # until then finished rays stay in the set, frozen
            n_alive = int(alive.sum())
            if (idx.numel() - n_alive) * 8 >= idx.numel() or n_alive == 0:
                keep = torch.nonzero(alive).squeeze(-1)
                idx, at, d, alive = idx[keep], at[keep], d[keep], alive[keep]
                state = [v.index_select(0, keep) for v in state]
    if idx.numel():
        li = torch.nonzero(alive).squeeze(-1)
        t[idx[li]] = at[li]
        hit[idx[li]] = d[li] < 20 * eps
    return t, hit
