"""Figures of multi-view subjects: the camera rig around the head points, view grids, overlays.

Every function returns an object (a plotly ``go.Figure`` or a ``PIL.Image.Image``); the notebook
decides to display it. Built on the generic helpers of :mod:`fastavatar_nb.plots` and :mod:`fastavatar_nb.images`
(``camera_frusta_traces``, ``image_grid``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image

from ..images import image_grid, to_uint8
from ..plots import camera_frusta_traces
from .subject import MultiViewSubject

__all__ = ["rig_figure", "view_grid", "points_overlay", "subjects_grid", "rays_side_view"]


def _points_trace(points: torch.Tensor, max_points: int, name: str, seed: int = 0) -> go.Scatter3d:
    p = points.detach().to("cpu", torch.float32)
    if p.shape[0] > max_points:
        idx = torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points].sort().values
        p = p[idx]
    p = p.numpy()
    return go.Scatter3d(x=p[:, 0], y=p[:, 1], z=p[:, 2], mode="markers", name=name,
                        marker=dict(size=1.5, color=p[:, 2], colorscale="Greys", cmin=p[:, 2].min() - 0.1,
                                    opacity=0.8, line=dict(width=0)),
                        hovertemplate="(%{x:.3f}, %{y:.3f}, %{z:.3f}) m<extra></extra>")


def rig_figure(subject: MultiViewSubject, *, max_points: int = 5000, frustum_size: float = 0.15,
               height: int = 560) -> go.Figure:
    """3D figure of a subject's cameras (wire frusta labelled by view index) around its head points.

    Args:
        subject: the subject; its ``cameras`` and ``points`` are drawn (images are not).
        max_points: at most this many points (a seeded random subset).
        frustum_size: depth of the drawn image planes in metres.
        height: figure height in pixels.

    Returns:
        A plotly figure in metres, world +y up, first looking at the face from +z.
    """
    fig = go.Figure()
    fig.add_trace(_points_trace(subject.points, max_points, f"points3d ({subject.num_points:,})"))
    fig.add_traces(camera_frusta_traces(subject.cameras, size=frustum_size,
                                        labels=[str(i) for i in range(subject.num_views)]))
    axis = 0.1
    for d, colour, label in ((0, "red", "+x"), (1, "green", "+y (up)"), (2, "blue", "+z (face)")):
        end = [0.0, 0.0, 0.0]
        end[d] = axis
        fig.add_trace(go.Scatter3d(x=[0, end[0]], y=[0, end[1]], z=[0, end[2]], mode="lines+text",
                                   text=["", label], line=dict(color=colour, width=5), name=label,
                                   showlegend=False, hoverinfo="skip"))
    fig.update_layout(
        title=f"subject {subject.subject_id}: {subject.num_views} cameras around {subject.num_points:,} points",
        height=height, margin=dict(l=0, r=0, t=40, b=0),
        scene=dict(aspectmode="data", xaxis_title="x (m)", yaxis_title="y (m, up)", zaxis_title="z (m)",
                   camera=dict(up=dict(x=0, y=1, z=0), eye=dict(x=0.3, y=0.9, z=1.6))),
    )
    return fig


def view_grid(subject: MultiViewSubject, views: Sequence[int] | None = None, *, masks: bool = False,
              cols: int = 8, min_height: int = 120) -> Image.Image:
    """Grid of a subject's views titled ``index: camera_id`` (optionally followed by the masks).

    Args:
        subject: the subject.
        views: view indices to show (default all, in order).
        masks: add a second block with the foreground masks of the same views.
        cols: images per row.
        min_height: small images are enlarged (nearest neighbour) to at least this height.
    """
    views = list(range(subject.num_views)) if views is None else [int(v) for v in views]
    images: list = [subject.images[v] for v in views]
    titles = [f"{v}: {subject.camera_ids[v]}" for v in views]
    if masks:
        images += [subject.masks[v][..., None].expand(-1, -1, 3) for v in views]
        titles += [f"mask {v}" for v in views]
    return image_grid(images, titles, cols=cols, min_height=min_height, font_size=11)


def points_overlay(subject: MultiViewSubject, views: Sequence[int] | None = None, *, max_points: int = 3000,
                   cols: int = 8, min_height: int = 160, seed: int = 0) -> Image.Image:
    """Views with the subject's points projected on top (red where the mask is background).

    The visual version of :meth:`MultiViewSubject.mask_coverage`: with correct cameras and
    points every dot is green (on the head). Each view is drawn at ``min_height`` or its own
    size, whichever is larger, so the dots stay small.
    """
    views = list(range(subject.num_views)) if views is None else [int(v) for v in views]
    pts = subject.points
    if pts.shape[0] > max_points:
        pts = pts[torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]]
    scale = max(1, -(-min_height // subject.height))
    uv, z = subject.cameras.project(pts.to(subject.device))
    tiles, titles = [], []
    for v in views:
        img = to_uint8(subject.images[v])
        img = np.asarray(Image.fromarray(img).resize((subject.width * scale, subject.height * scale), Image.NEAREST))
        img = img.copy()
        col = uv[v, :, 0].floor().long().cpu()
        row = uv[v, :, 1].floor().long().cpu()
        ok = (z[v].cpu() > 0) & (col >= 0) & (col < subject.width) & (row >= 0) & (row < subject.height)
        m = subject.masks[v].cpu()
        inside = torch.zeros_like(ok)
        inside[ok] = m[row[ok], col[ok]] > 0.5
        px = (uv[v].cpu() * scale).floor().long()
        for sel, colour in ((ok & inside, (0, 170, 0)), (ok & ~inside, (230, 0, 0))):
            x, y = px[sel, 0].clamp(0, img.shape[1] - 1).numpy(), px[sel, 1].clamp(0, img.shape[0] - 1).numpy()
            img[y, x] = colour
        tiles.append(img)
        titles.append(f"{v}: {100 * float((ok & inside).float().mean()):.1f}% in mask")
    return image_grid(tiles, titles, cols=cols, min_height=min_height, font_size=11)


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def subjects_grid(subjects: Sequence[MultiViewSubject], view: int = 8, *, attributes: Sequence[str] = (),
                  cols: int = 6, min_height: int = 240) -> Image.Image:
    """One view of each subject side by side, titled ``"<id>: <value>, <value>"``.

    Args:
        subjects: the subjects (any sizes).
        view: which view to show (8 is NeRSemble's frontal validation camera).
        attributes: names of attributes whose values go into the titles (missing ones are skipped).
        cols: images per row.
        min_height: small images are enlarged (nearest neighbour) to at least this height, which
            also leaves room for the titles.
    """
    if not subjects:
        raise ValueError("subjects_grid needs at least one subject")
    titles = []
    for s in subjects:
        values = [_fmt(s.attributes[k]) for k in attributes if k in s.attributes]
        titles.append(s.subject_id + (": " + ", ".join(values) if values else ""))
    return image_grid([s.images[view] for s in subjects], titles, cols=cols, min_height=min_height, font_size=11)


_GROUP_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def rays_side_view(origins: torch.Tensor, points: torch.Tensor, groups: dict[str, torch.Tensor] | None = None, *,
                   slice_width: float = 0.012, extent: float = 0.3, height: int = 460) -> go.Figure:
    """Side view (``z`` to the right, ``y`` up) of the rays that define corresponded points.

    Ray ``k`` is drawn from ``origins[k]`` to ``points[k]`` (where it met the surface), for the
    rays whose point lies in the slice ``|x| < slice_width`` around the head's mid-plane, so the
    picture is a clean profile. Each group gets its own colour.

    Args:
        origins, points: ``[K, 3]`` metres.
        groups: name -> ``[K]`` bool mask (default: every ray, one group called "rays").
        slice_width: half-width (metres) of the slice around ``x = 0``.
        extent: half-size (metres) of the square shown around the points' centre.
        height: figure height in pixels.
    """
    o = origins.detach().to("cpu", torch.float64)
    p = points.detach().to("cpu", torch.float64)
    if o.shape != p.shape or o.ndim != 2 or o.shape[-1] != 3:
        raise ValueError(f"rays_side_view: origins and points must both be [K, 3], got {tuple(o.shape)} "
                         f"and {tuple(p.shape)}")
    groups = {"rays": torch.ones(len(p), dtype=torch.bool)} if groups is None else groups
    in_slice = p[:, 0].abs() < slice_width
    fig = go.Figure()
    for i, (name, mask) in enumerate(groups.items()):
        colour = _GROUP_COLOURS[i % len(_GROUP_COLOURS)]
        k = torch.nonzero(mask.cpu() & in_slice).flatten()
        seg = torch.stack([o[k][:, [2, 1]], p[k][:, [2, 1]], torch.full((len(k), 2), float("nan"))], 1).reshape(-1, 2)
        fig.add_trace(go.Scatter(x=seg[:, 0].numpy(), y=seg[:, 1].numpy(), mode="lines", name=name,
                                 line=dict(color=colour, width=1), opacity=0.35, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=p[k, 2].numpy(), y=p[k, 1].numpy(), mode="markers", name=f"points ({name})",
                                 marker=dict(color=colour, size=4), customdata=k.numpy(),
                                 hovertemplate="k=%{customdata}: z %{x:.3f}, y %{y:.3f} m<extra></extra>"))
    cz, cy = float(p[:, 2].mean()), float(p[:, 1].mean())
    fig.update_layout(height=height, xaxis=dict(title="z (m), the face looks towards +z", range=[cz - extent, cz + extent]),
                      yaxis=dict(title="y (m)", range=[cy - extent, cy + extent], scaleanchor="x"),
                      title=f"rays through the mid-plane (|x| < {slice_width * 1000:.0f} mm) and the points they define")
    return fig
