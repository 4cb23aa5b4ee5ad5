"""Bust points: corresponded points on the shoulders and upper torso (issue 12).

NeRSemble's ``points3d.ply`` (FLAME, 10,144 points) and the synthetic generator's head and neck
rays stop at the neck base (lowest FLAME ring at ``y ~ -0.19 m``), but every image shows the
shoulders and upper chest down to the bottom of the frame. Without points there the fitted
Gaussians leave the torso white. This module adds ``B = num_bust_points(K)`` *bust* points,
always the **last** ``B`` of the ``K`` points (head rays first, then neck rays, then bust).

Design of the canonical bust rays (:func:`bust_rays`), all relative to an *anchor* ``A`` at the
neck base (the centroid of the lowest ring of head/neck points), so the same ray set serves
every subject up to that translation and point ``k`` is the same place on every bust:

- Every ray is aimed at the *bust centre* ``C = A + BUST_CENTER_OFFSET`` (0.105 m below the
  anchor: the middle of the upper torso) and starts ``BUST_RAY_LENGTH`` = 0.6 m from it, so it
  meets the torso from outside on its way in.
- Directions ``u(az, el) = (cos el sin az, sin el, cos el cos az)`` (``az`` from ``+z``, the
  face direction, towards ``+x``; the ray travels along ``-u``) cover
  ``|az| <= BUST_AZIMUTH_DEG`` = 110 deg (front and sides; the back is never seen by the rig's
  cameras, which sit at yaw -48..48 deg) and ``BUST_ELEVATION_DEG`` = (-8, 47) deg. The lowest
  elevation reaches ~0.11 m below the anchor on the chest and sides (the rig sees the torso
  down to ``y ~ -0.26 .. -0.29`` m: top-row cameras pitched ~14 deg down and bottom-row ones
  ~16 deg up, each with a ~22 deg vertical field); the highest stays below the jaw: a ray at
  47 deg passes ~0.15 m in front of / beside the chin and ears, and meets the torso where it
  leaves the neck, ~8 cm from the neck axis (the shoulders' inner edge), so no ray meets the
  head, jaw, beard or neck first.
- The lattice is a 2D Fibonacci (golden-angle) lattice, uniform in ``az`` and in
  ``sin(el)`` (equal solid angle per ray): ray ``i`` has ``sin(el) = lerp(sin el_lo,
  sin el_hi, (i + 0.5) / B)`` and ``az = lerp(-110, 110, frac(i * 0.618...))`` deg. Equal solid
  angle seen from the bust centre means the shoulder tops (nearly horizontal, met at ~40 deg
  incidence from elevations 25..47 deg) get about as many points per area as the chest.

Synthetic subjects trace these rays into their signed-distance field with the fixed anchor
:data:`fastavatar_nb.data.synthetic.BUST_ANCHOR`. Real subjects (:func:`fit_bust_points`) take
the anchor from their own FLAME points (:func:`neck_base_anchor`) and march each ray through the
*visual hull* of their foreground masks: the first point along the ray that every view seeing it
calls foreground. A ray that never enters the hull (the NeRSemble T-shirt is cut away by a tilted
plane, white below) falls back to where it meets the canonical proxy torso (the synthetic
shirt's ellipsoid placed at the anchor, :data:`BUST_PROXY_OFFSET`, :data:`BUST_PROXY_RADII`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .subject import MultiViewSubject

__all__ = [
    "BUST_FRACTION", "BUST_CENTER_OFFSET", "BUST_RAY_LENGTH", "BUST_AZIMUTH_DEG", "BUST_ELEVATION_DEG",
    "BUST_PROXY_OFFSET", "BUST_PROXY_RADII", "num_bust_points", "bust_rays", "neck_base_anchor",
    "visual_hull_inside", "fit_bust_points", "with_bust",
]

BUST_FRACTION = 0.2
"""Share of the ``K`` corresponded points on the bust (the last ones)."""

BUST_CENTER_OFFSET = (0.0, -0.105, 0.0)
"""Bust centre relative to the anchor (metres): every bust ray aims at ``anchor + offset``."""

BUST_RAY_LENGTH = 0.6
"""Metres from a bust ray's origin to the bust centre."""

BUST_AZIMUTH_DEG = 110.0
"""Bust rays come from azimuths ``|az| <= 110`` deg from ``+z`` (front and sides)."""

BUST_ELEVATION_DEG = (10.0, 47.0)
"""Elevation range (degrees) of the bust rays' directions seen from the bust centre."""

BUST_PROXY_OFFSET = (0.0, -0.105, 0.0)
"""Centre of the canonical proxy torso (the fallback surface) relative to the anchor."""

BUST_PROXY_RADII = (0.21, 0.10, 0.12)
"""Radii (x, y, z) of the canonical proxy torso ellipsoid (the synthetic shirt's)."""

_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


def num_bust_points(num_points: int) -> int:
    """How many of ``K = num_points`` corresponded points are bust points (the last ones)."""
    return int(round(BUST_FRACTION * num_points))


def bust_rays(num_bust: int, anchor: Tensor | tuple[float, float, float] | list[float],
              device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The canonical bust rays for ``anchor``: origins and unit directions ``[B, 3]`` (float32).

    A pure function of ``(num_bust, anchor)``; changing the anchor translates every origin by
    the same amount and leaves the directions unchanged. Design in the module docstring.
    """
    if num_bust < 0:
        raise ValueError(f"bust_rays: num_bust must be >= 0, got {num_bust}")
    a = torch.as_tensor(anchor, dtype=torch.float64).detach().cpu().reshape(-1)
    if a.numel() != 3 or not bool(torch.isfinite(a).all()):
        raise ValueError(f"bust_rays: anchor must be 3 finite numbers, got {anchor!r}")
    i = torch.arange(num_bust, dtype=torch.float64) + 0.5
    lo, hi = (math.sin(math.radians(e)) for e in BUST_ELEVATION_DEG)
    s = lo + (hi - lo) * i / max(num_bust, 1)
    c = torch.sqrt(1.0 - s * s)
    frac = torch.remainder(i * _GOLDEN_FRACTION, 1.0)
    az = math.radians(BUST_AZIMUTH_DEG) * (2.0 * frac - 1.0)
    u = torch.stack([c * torch.sin(az), s, c * torch.cos(az)], -1)
    centre = a + torch.tensor(BUST_CENTER_OFFSET, dtype=torch.float64)
    origins = centre + BUST_RAY_LENGTH * u
    return origins.to(torch.float32).to(device), (-u).to(torch.float32).to(device)


def neck_base_anchor(points: Tensor, band: float = 0.01) -> Tensor:
    """The anchor of the bust rays: centroid ``[3]`` of the head/neck points within ``band`` metres
    of the lowest one (FLAME's lowest ring at the neck base; the synthetic neck band's foot).

    ``points`` must be head and neck points only (no bust points).
    """
    if points.ndim != 2 or points.shape[-1] != 3 or points.shape[0] == 0:
        raise ValueError(f"neck_base_anchor: points must be [N, 3] with N >= 1, got {tuple(points.shape)}")
    y = points[:, 1]
    ring = points[y <= y.min() + band]
    return ring.mean(0)


def _proxy_hits(o: Tensor, d: Tensor, anchor: Tensor) -> Tensor:
    """Ray parameters ``t [B]`` where unit rays ``o + t d`` enter the proxy torso ellipsoid (closest
    approach to it where they miss)."""
    c = anchor.to(o) + torch.tensor(BUST_PROXY_OFFSET, dtype=o.dtype, device=o.device)
    r = torch.tensor(BUST_PROXY_RADII, dtype=o.dtype, device=o.device)
    p, q = (o - c) / r, d / r  # the ellipsoid becomes the unit sphere
    a, b, cc = (q * q).sum(-1), (p * q).sum(-1), (p * p).sum(-1) - 1.0
    disc = b * b - a * cc
    t_hit = (-b - torch.sqrt(disc.clamp_min(0.0))) / a
    return torch.where(disc >= 0, t_hit, -b / a).clamp_min(0.0)


def visual_hull_inside(points: Tensor, masks: Tensor, cameras, threshold: float = 0.5,
                       min_views: int = 3) -> Tensor:
    """``[N]`` bool: points inside the visual hull of ``masks [C, H, W]`` seen by ``cameras``.

    A point is inside when it lies in front of and within the image of at least ``min_views``
    cameras, and in every camera where it does the (bilinearly sampled) mask exceeds ``threshold``.
    """
    return _hull_score(points, masks, cameras, min_views) > threshold


def _hull_score(points: Tensor, masks: Tensor, cameras, min_views: int) -> Tensor:
    """``[N]``: the smallest mask value over the views in which a point projects into the image
    (``-1`` where fewer than ``min_views`` such views)."""
    C, H, W = masks.shape
    uv, z = cameras.project(points)  # [C, N, 2], [C, N]
    u, v = uv[..., 0], uv[..., 1]
    seen = (z > 0) & (u >= 0) & (u <= W) & (v >= 0) & (v <= H)
    grid = torch.stack([u / W * 2.0 - 1.0, v / H * 2.0 - 1.0], -1)[:, :, None]  # [C, N, 1, 2]
    vals = F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="border",
                         align_corners=False)[:, 0, :, 0]  # [C, N]
    score = torch.where(seen, vals, torch.full_like(vals, 2.0)).amin(0)
    return torch.where(seen.sum(0) >= min_views, score, torch.full_like(score, -1.0))


def fit_bust_points(subject: MultiViewSubject, num_bust: int, anchor: Tensor | None = None,
                    step: float = 0.0015, threshold: float = 0.5, min_views: int = 3,
                    chunk: int = 2_000_000, slide_deg: float = 30.0,
                    return_fallback: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Bust points ``[B, 3]`` of a real subject from the visual hull of its foreground masks.

    Each canonical ray of :func:`bust_rays` ``(num_bust, anchor)`` is marched inward from
    ``0.3`` m before the bust centre to ``0.05`` m past it in steps of ``step`` metres; the first
    sample inside the hull (:func:`visual_hull_inside`) is refined by 6 bisection steps.

    Args:
        subject: its masks, cameras and (unless ``anchor`` is given) points: the anchor is
            :func:`neck_base_anchor` of ``subject.points`` (give head/neck points only).
        num_bust: ``B``.
        anchor: override the neck-base anchor ``[3]``.
        step, threshold, min_views: marching step (metres), mask threshold, fewest views.
        chunk: sample points evaluated at once, summed over views (memory bound).
        slide_deg: how far (degrees) a missing ray's elevation may be raised (see below).
        return_fallback: also return the ``[B]`` status of each ray: 0 met the hull, 1 slid,
            2 fell back to the proxy.

    Rays that miss (K is fixed, so every ray still gives a point):

    1. *slide*: a ray that never enters the hull (e.g. below the cut of NeRSemble's T-shirts,
       which are cut away by a tilted plane at about the FLAME neck base in front) is raised in
       elevation in 2 deg steps, same azimuth, still aimed at the bust centre, up to
       ``slide_deg``; the first raised ray that meets the hull gives the point (so it lands on the
       lowest visible torso above the cut at that azimuth: several rays may share the cut edge).
    2. *fallback*: a ray that still misses gets the point where it meets the canonical proxy
       torso (:data:`BUST_PROXY_RADII` ellipsoid at ``anchor + BUST_PROXY_OFFSET``; its closest
       approach when it misses).
    """
    dev = subject.device
    anchor = neck_base_anchor(subject.points) if anchor is None else torch.as_tensor(anchor, dtype=torch.float32)
    anchor = anchor.to(dev, torch.float32)
    o, d = bust_rays(num_bust, anchor, device=dev)
    if num_bust == 0:
        out = torch.zeros(0, 3, device=dev)
        return (out, torch.zeros(0, dtype=torch.long, device=dev)) if return_fallback else out
    first_t = _first_hull_hits(o, d, subject, step, threshold, min_views, chunk)
    fallback = torch.isnan(first_t)
    slid = torch.zeros_like(fallback)
    if bool(fallback.any()) and slide_deg > 0:
        # raise the missing rays' elevation (same azimuth, still aimed at the bust centre) until they meet the hull
        idx = fallback.nonzero().squeeze(-1)
        u = -d[idx]
        el = torch.asin(u[:, 1].clamp(-1.0, 1.0))
        az = torch.atan2(u[:, 0], u[:, 2])
        steps = torch.arange(1, int(slide_deg // 2) + 1, device=dev, dtype=torch.float32) * math.radians(2.0)
        el2 = el[:, None] + steps[None, :]  # [F, E]
        u2 = torch.stack([el2.cos() * az[:, None].sin(), el2.sin(), el2.cos() * az[:, None].cos()], -1)
        centre = anchor + torch.tensor(BUST_CENTER_OFFSET, device=dev)
        o2, d2 = (centre + BUST_RAY_LENGTH * u2).reshape(-1, 3), (-u2).reshape(-1, 3)
        t2 = _first_hull_hits(o2, d2, subject, 2.0 * step, threshold, min_views, chunk).reshape(idx.numel(), -1)
        ok = ~torch.isnan(t2)
        k = ok.float().argmax(1)  # smallest raised elevation that meets the hull
        got = ok.any(1)
        rows = torch.arange(idx.numel(), device=dev)
        pts2 = (o2 + torch.nan_to_num(t2.reshape(-1))[:, None] * d2).reshape(idx.numel(), -1, 3)[rows, k]
        slid_pts = torch.zeros(num_bust, 3, device=dev)
        slid_pts[idx[got]] = pts2[got]
        slid[idx[got]] = True
        fallback = fallback & ~slid
    t = torch.where(fallback, _proxy_hits(o, d, anchor), torch.nan_to_num(first_t))
    out = o + t[:, None] * d
    if bool(slid.any()):
        out[slid] = slid_pts[slid]
    if return_fallback:
        return out, torch.where(slid, torch.ones_like(first_t, dtype=torch.long),
                                torch.where(fallback, torch.full_like(first_t, 2, dtype=torch.long),
                                            torch.zeros_like(first_t, dtype=torch.long)))
    return out


def _first_hull_hits(o: Tensor, d: Tensor, subject: MultiViewSubject, step: float, threshold: float,
                     min_views: int, chunk: int) -> Tensor:
    """``t [R]`` where unit rays ``o + t d`` first enter the visual hull between ``BUST_RAY_LENGTH - 0.3`` and
    ``BUST_RAY_LENGTH + 0.05`` (NaN where they never do): samples every ``step`` metres, then 6 bisections."""
    dev = o.device
    masks, cams = subject.masks, subject.cameras
    ts = torch.arange(BUST_RAY_LENGTH - 0.3, BUST_RAY_LENGTH + 0.05 + 1e-9, step, device=dev, dtype=torch.float32)
    S, R = ts.numel(), o.shape[0]
    per = max(1, chunk // (S * masks.shape[0]))
    first = torch.full((R,), -1, dtype=torch.long, device=dev)
    for r0 in range(0, R, per):
        r1 = min(R, r0 + per)
        pts = o[r0:r1, None] + ts[None, :, None] * d[r0:r1, None]  # [r, S, 3]
        inside = visual_hull_inside(pts.reshape(-1, 3), masks, cams, threshold, min_views).reshape(r1 - r0, S)
        idx = inside.float().argmax(1)  # first inside sample
        first[r0:r1] = torch.where(inside.any(1), idx, torch.full_like(idx, -1))
    hit = first >= 0
    hi = ts[first.clamp_min(0)]
    lo = (hi - step).clamp_min(0.0)
    for _ in range(6):  # bisect between the last outside sample and the first inside one
        mid = 0.5 * (lo + hi)
        ins = visual_hull_inside(o + mid[:, None] * d, masks, cams, threshold, min_views)
        hi, lo = torch.where(ins, mid, hi), torch.where(ins, lo, mid)
    t = torch.where(first > 0, hi, ts[first.clamp_min(0)])
    return torch.where(hit, t, torch.full_like(t, float("nan")))


def with_bust(subject: MultiViewSubject, num_points: int, **fit_kwargs) -> MultiViewSubject:
    """The subject with ``K = num_points`` corresponded points: its own (FLAME) points thinned to
    ``K - num_bust_points(K)`` (:meth:`MultiViewSubject.thin_points`) followed by
    :func:`fit_bust_points` (anchored at the neck base of *all* its own points).

    Raises ``ValueError`` when the subject has fewer points than the head part needs.
    """
    num_bust = num_bust_points(num_points)
    num_head = num_points - num_bust
    if num_head < 1:
        raise ValueError(f"with_bust: K = {num_points} leaves no head points ({num_bust} bust points)")
    if subject.num_points < num_head:
        raise ValueError(f"with_bust on {subject.subject_id!r}: K = {num_points} needs {num_head} head points "
                         f"(K - {num_bust} bust points) but the subject has only {subject.num_points}")
    anchor = neck_base_anchor(subject.points)
    head = subject.thin_points(num_head)
    bust = fit_bust_points(subject, num_bust, anchor=anchor, **fit_kwargs)
    return head._replace(points=torch.cat([head.points, bust.to(head.points)]).contiguous())
