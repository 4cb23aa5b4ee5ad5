"""Plotly figures for the notebooks: Gaussians as points and ellipsoids, camera frusta, SH spheres, 2D splats, and
live training curves (:class:`LiveCurves`).

Every function returns a ``go.Figure`` (or, for :class:`LiveCurves`, an object that displays one); nothing needs a
live frontend. Conventions: world units are metres, world +y is up and the face looks towards +z (the package-wide
convention of :mod:`fastavatar_nb.cameras`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from . import _live
from .cameras import Cameras
from .gaussians import Gaussians, quat_to_rotmat
from .images import colorize, is_scalar_image, to_uint8

__all__ = ["setup_plotly", "scatter_gaussians", "ellipsoids", "camera_frusta", "camera_frusta_traces", "splat_figure",
           "sh_sphere", "LiveCurves"]

LiveMode = Literal["auto", "display", "none"]
PlotlyMode = Literal["embedded", "cdn", "mimetype"]
_PLOTLY_RENDERERS = {
    "embedded": "plotly_mimetype+notebook",
    "cdn": "plotly_mimetype+notebook_connected",
    "mimetype": "plotly_mimetype",
}


def setup_plotly(mode: PlotlyMode = "embedded") -> str:
    """Choose how plotly figures are written into notebook outputs; call once in a setup cell.

    In a Jupyter kernel plotly's default writes only its own JSON mimetype, which JupyterLab and
    VS Code draw but ``nbconvert --to html`` (and GitHub) cannot, so exported notebooks lose every
    figure. The modes add an HTML version next to it:

    - ``"embedded"``: plotly.js is embedded once in the notebook (about 4.7 MB in the *executed*
      notebook); figures show in exported HTML even offline.
    - ``"cdn"``: the HTML loads plotly.js from a CDN (small files; the reader needs internet).
    - ``"mimetype"``: plotly's kernel default (JupyterLab/VS Code only).

    Returns:
        The plotly renderer string now in use (``plotly.io.renderers.default``).
    """
    import plotly.io as pio

    if mode not in _PLOTLY_RENDERERS:
        raise ValueError(f"setup_plotly mode must be one of {sorted(_PLOTLY_RENDERERS)}, got {mode!r}")
    pio.renderers.default = _PLOTLY_RENDERERS[mode]
    return pio.renderers.default


# ----------------------------------------------------------------------------- small utilities


def _scene_extent(fig: go.Figure) -> np.ndarray | None:
    """``[3]`` data ranges (x, y, z) over every 3D trace of ``fig``, or None when it has no points."""
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for tr in fig.data:
        if not isinstance(tr, (go.Scatter3d, go.Mesh3d)) or tr.x is None:
            continue
        xyz = [np.array([np.nan if v is None else v for v in a], dtype=np.float64) for a in (tr.x, tr.y, tr.z)]
        for i, a in enumerate(xyz):
            if np.isfinite(a).any():
                lo[i], hi[i] = min(lo[i], np.nanmin(a)), max(hi[i], np.nanmax(a))
    return hi - lo if np.isfinite(lo).all() else None


def _scene_layout(fig: go.Figure, height: int = 520) -> go.Figure:
    """Metric axes with equal scale, world +y up, looking at the face from the front-right.

    The aspect ratio follows the data (like plotly's ``aspectmode="data"``) but is normalised so
    the longest axis has length 1 and the viewpoint stays outside the box even for elongated
    scenes (a Gaussian with a camera far away).
    """
    ext = _scene_extent(fig)
    scene: dict[str, Any] = dict(
        xaxis_title="x (m)", yaxis_title="y (m, up)", zaxis_title="z (m)",
        camera=dict(up=dict(x=0, y=1, z=0), eye=dict(x=0.9, y=0.5, z=1.6)),
    )
    if ext is None or not (ext > 0).any():
        scene["aspectmode"] = "cube"
    else:
        r = np.maximum(ext / ext.max(), 0.05)
        scene["aspectmode"] = "manual"
        scene["aspectratio"] = dict(x=float(r[0]), y=float(r[1]), z=float(r[2]))
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=50, b=0),
                      legend=dict(yanchor="top", y=0.98, xanchor="left", x=0.01), scene=scene)
    return fig


def scatter_gaussians(gaussians: Gaussians, max_points: int = 20_000, *, size_range: tuple[float, float] = (1.5, 7.0),
                      min_opacity: float = 0.0, seed: int = 0, name: str = "Gaussians",
                      fig: go.Figure | None = None) -> go.Figure:
    """3D scatter of Gaussian centres coloured by their DC (view-independent) colour.

    Marker size (in screen pixels) grows with the Gaussian's mean scale, mapped from the 5th-95th
    percentile of ``log(mean scale)`` onto ``size_range``.

    Args:
        gaussians: an unbatched set (K Gaussians); index a batch first (``g[i]``).
        max_points: at most this many centres are drawn (a seeded random subset).
        size_range: smallest and largest marker size in pixels.
        min_opacity: Gaussians with opacity below this are left out.
        seed: seed of the subset choice.
        name: legend name of the trace.
        fig: add the trace to this figure (e.g. one from :func:`camera_frusta`) instead of a new one.

    Returns:
        The figure, with one ``Scatter3d`` trace added.
    """
    if gaussians.batch_shape:
        raise ValueError(f"scatter_gaussians draws one set; got batch_shape {tuple(gaussians.batch_shape)}: "
                         "index it first (gaussians[i])")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    g = gaussians.detach().to("cpu", torch.float32)
    keep = torch.nonzero(g.opacities >= min_opacity).squeeze(-1)
    if keep.numel() > max_points:
        gen = torch.Generator().manual_seed(seed)
        keep = keep[torch.randperm(keep.numel(), generator=gen)[:max_points].sort().values]
    means = g.means[keep].numpy()
    rgb = (g.dc_colors[keep].numpy() * 255 + 0.5).astype(np.uint8)
    log_s = g.log_scales[keep].mean(-1).numpy()
    if log_s.size:
        lo, hi = np.percentile(log_s, 5), np.percentile(log_s, 95)
        t = np.clip((log_s - lo) / (hi - lo), 0, 1) if hi > lo else np.full_like(log_s, 0.5)
    else:
        t = log_s
    sizes = size_range[0] + t * (size_range[1] - size_range[0])
    custom = np.stack([keep.numpy(), g.opacities[keep].numpy(), g.scales[keep].mean(-1).numpy() * 1000], -1)
    trace = go.Scatter3d(
        x=means[:, 0], y=means[:, 1], z=means[:, 2], mode="markers", name=name,
        marker=dict(size=sizes, color=[f"rgb({r},{gg},{b})" for r, gg, b in rgb], opacity=0.9, line=dict(width=0)),
        customdata=custom,
        hovertemplate="Gaussian %{customdata[0]:.0f}<br>opacity %{customdata[1]:.2f}"
                      "<br>mean scale %{customdata[2]:.1f} mm<extra></extra>",
    )
    fig = go.Figure() if fig is None else fig
    fig.add_trace(trace)
    if fig.layout.title.text is None:
        fig.update_layout(title=f"{name}: {len(keep)} of {g.num_gaussians} centres (colour = DC colour)")
    return _scene_layout(fig)


def _frustum_polyline(camtoworld: np.ndarray, K: np.ndarray, width: int, height: int, size: float) -> np.ndarray:
    """Points (rows, NaN = pen up) tracing one frustum: 4 edges, the image rectangle, an 'up' triangle."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    def at(u: float, v: float) -> np.ndarray:  # pixel (u, v) at depth `size`, in world coordinates
        pc = np.array([(u - cx) / fx * size, (v - cy) / fy * size, size, 1.0])
        return (camtoworld @ pc)[:3]

    o = camtoworld[:3, 3]
    c = [at(0, 0), at(width, 0), at(width, height), at(0, height)]
    up = [at(0.3 * width, 0), at(0.5 * width, -0.25 * height), at(0.7 * width, 0)]  # row 0 is the image top
    nan = np.full(3, np.nan)
    pts = [o, c[0], nan, o, c[1], nan, o, c[2], nan, o, c[3], nan, c[0], c[1], c[2], c[3], c[0], nan, *up, nan]
    return np.stack(pts)


def camera_frusta_traces(cameras: Cameras, *, size: float = 0.1, color: str = "#1f77b4",
                         labels: Sequence[str] | None = None, name: str = "cameras") -> list[go.Scatter3d]:
    """Plotly traces drawing each camera as a wire pyramid plus a labelled centre marker.

    Args:
        cameras: C cameras (``viewmats [C, 4, 4]``; no further batch dimensions).
        size: depth of the drawn image plane in metres.
        color: line and marker colour.
        labels: C names shown next to the centres (default ``"0" .. "C-1"``), e.g. camera ids.
        name: legend name.

    Returns:
        Two traces: the frusta (all cameras in one line trace; a small triangle marks the image top)
        and the centres (markers with text labels).
    """
    if cameras.viewmats.ndim != 3:
        raise ValueError(f"camera_frusta expects cameras [C, 4, 4], got viewmats {tuple(cameras.viewmats.shape)}")
    C = len(cameras)
    labels = [str(i) for i in range(C)] if labels is None else [str(s) for s in labels]
    if len(labels) != C:
        raise ValueError(f"camera_frusta got {C} cameras but {len(labels)} labels")
    c2w = cameras.camtoworlds.detach().to("cpu", torch.float64).numpy()
    Ks = cameras.Ks.detach().to("cpu", torch.float64).numpy()
    lines = np.concatenate([_frustum_polyline(c2w[i], Ks[i], cameras.width, cameras.height, size)
                            for i in range(C)])
    centres = c2w[:, :3, 3]

    def col(a: np.ndarray) -> list[float | None]:
        return [None if not np.isfinite(v) else float(v) for v in a]

    return [
        go.Scatter3d(x=col(lines[:, 0]), y=col(lines[:, 1]), z=col(lines[:, 2]), mode="lines", name=name,
                     line=dict(color=color, width=3), hoverinfo="skip", legendgroup=name),
        go.Scatter3d(x=centres[:, 0], y=centres[:, 1], z=centres[:, 2], mode="markers+text", text=labels,
                     textposition="top center", marker=dict(size=3, color=color), name=f"{name} (centres)",
                     hovertemplate="camera %{text}<br>(%{x:.2f}, %{y:.2f}, %{z:.2f}) m<extra></extra>",
                     legendgroup=name, showlegend=False),
    ]


def camera_frusta(cameras: Cameras, *, size: float = 0.1, color: str = "#1f77b4",
                  labels: Sequence[str] | None = None, name: str = "cameras",
                  fig: go.Figure | None = None) -> go.Figure:
    """A figure of camera frusta (see :func:`camera_frusta_traces`), or those traces added to ``fig``.

    Combine with a point cloud in either order::

        fig = camera_frusta(cams, fig=scatter_gaussians(g))
    """
    fig = go.Figure() if fig is None else fig
    fig.add_traces(camera_frusta_traces(cameras, size=size, color=color, labels=labels, name=name))
    if fig.layout.title.text is None:
        fig.update_layout(title=f"{len(cameras)} cameras (triangle = image top)")
    return _scene_layout(fig)


def _unit_sphere(rings: int, segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Latitude-longitude unit sphere: vertices ``[V, 3]`` and triangles ``[T, 3]``."""
    theta = np.linspace(0, np.pi, rings + 1)
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    verts = np.stack([np.sin(th) * np.cos(ph), np.cos(th), np.sin(th) * np.sin(ph)], -1).reshape(-1, 3)
    tris = []
    for r in range(rings):
        for s in range(segments):
            a, b = r * segments + s, r * segments + (s + 1) % segments
            c, d = a + segments, b + segments
            tris += [(a, c, b), (b, c, d)]
    return verts, np.array(tris)


def ellipsoids(gaussians: Gaussians, nsigma: float = 2.0, max_gaussians: int = 400, *, resolution: int = 8,
               seed: int = 0, name: str = "ellipsoids", fig: go.Figure | None = None) -> go.Figure:
    """The Gaussians drawn as solid ellipsoids at ``nsigma`` standard deviations, in their DC colour.

    The ellipsoid of Gaussian k is ``{mu_k + nsigma R_k S_k u : |u| = 1}``, the level set of its
    density through ``nsigma`` standard deviations along each principal axis.

    Args:
        gaussians: an unbatched set.
        nsigma: size of the drawn surface in standard deviations.
        max_gaussians: at most this many (a seeded random subset).
        resolution: rings of the sphere mesh (``2 * resolution`` segments around).
        seed: seed of the subset.
        name: legend name.
        fig: add to this figure instead of a new one.

    Returns:
        The figure with one ``Mesh3d`` trace added.
    """
    if gaussians.batch_shape:
        raise ValueError(f"ellipsoids draws one set; got batch_shape {tuple(gaussians.batch_shape)}: "
                         "index it first (gaussians[i])")
    g = gaussians.detach().to("cpu", torch.float32)
    idx = torch.arange(g.num_gaussians)
    if g.num_gaussians > max_gaussians:
        idx = torch.randperm(g.num_gaussians, generator=torch.Generator().manual_seed(seed))[:max_gaussians].sort().values
    M = (quat_to_rotmat(g.quats[idx]) * g.scales[idx][:, None, :] * nsigma).numpy()  # [n, 3, 3] = nsigma R S
    verts, tris = _unit_sphere(resolution, 2 * resolution)
    V = np.einsum("nij,vj->nvi", M, verts) + g.means[idx].numpy()[:, None, :]  # [n, V, 3]
    n = len(idx)
    faces = (tris[None] + (np.arange(n) * len(verts))[:, None, None]).reshape(-1, 3)
    rgb = (g.dc_colors[idx].numpy() * 255 + 0.5).astype(np.uint8)
    face_colors = [f"rgb({r},{gg},{b})" for r, gg, b in np.repeat(rgb, len(tris), axis=0)]
    V = V.reshape(-1, 3)
    fig = go.Figure() if fig is None else fig
    fig.add_trace(go.Mesh3d(x=V[:, 0], y=V[:, 1], z=V[:, 2], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
                            facecolor=face_colors, flatshading=False, name=name, showlegend=True,
                            hoverinfo="skip", lighting=dict(ambient=0.6, diffuse=0.6, specular=0.1)))
    if fig.layout.title.text is None:
        fig.update_layout(title=f"{n} of {g.num_gaussians} Gaussians as {nsigma:g}-sigma ellipsoids")
    return _scene_layout(fig)


def sh_sphere(sh: Tensor, degree: int = 3, *, resolution: int = 40, title: str | None = None) -> go.Figure:
    """The colour a set of SH coefficients shows from every direction, painted on a unit sphere.

    The sphere point in direction ``p`` has the colour a camera placed in direction ``p`` (looking
    back at the Gaussian, viewing direction ``-p``) sees: ``max(SH(-p) . sh + 0.5, 0)`` clamped to 1.

    Args:
        sh: ``[16, 3]`` coefficients of one Gaussian (DC first).
        degree: SH bands used (0-3).
        resolution: rings of the sphere mesh.
        title: figure title.
    """
    from .render.sh import sh_to_color

    if tuple(sh.shape) != (16, 3):
        raise ValueError(f"sh_sphere expects one Gaussian's coefficients [16, 3], got {tuple(sh.shape)}")
    verts, tris = _unit_sphere(resolution, 2 * resolution)
    dirs = torch.from_numpy(verts).to(torch.float32)
    rgb = sh_to_color(sh.detach().to("cpu", torch.float32), -dirs, degree).clamp(0, 1).numpy()
    rgb8 = (rgb * 255 + 0.5).astype(np.uint8)
    fig = go.Figure(go.Mesh3d(
        x=verts[:, 0], y=verts[:, 1], z=verts[:, 2], i=tris[:, 0], j=tris[:, 1], k=tris[:, 2],
        vertexcolor=[f"rgb({r},{g},{b})" for r, g, b in rgb8], hoverinfo="skip",
        lighting=dict(ambient=1.0, diffuse=0.0, specular=0.0),
    ))
    fig.update_layout(title=title or f"colour seen from each direction (SH degree {degree})")
    return _scene_layout(fig, height=420)


def _ellipse_points(mean: np.ndarray, cov: np.ndarray, k: float, n: int = 48) -> np.ndarray:
    lam, vec = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)])  # [2, n]
    return (mean[:, None] + vec @ (np.sqrt(np.clip(lam, 0, None))[:, None] * k * circle)).T


def splat_figure(image: Tensor | np.ndarray, means2d: Tensor | None = None, covars2d: Tensor | None = None, *,
                 nsigmas: Sequence[float] = (1.0, 2.0, 3.0), radii: Tensor | None = None,
                 tile_size: int | None = None, tile_counts: Tensor | None = None,
                 highlight_tiles: Sequence[tuple[int, int]] = (), title: str | None = None,
                 display_width: int = 420) -> go.Figure:
    """An image in pixel coordinates with projected Gaussians and the tile grid drawn over it.

    Pixel ``(u, v)`` (column, row) covers ``[u, u+1] x [v, v+1]``, so its centre is at ``+0.5``
    like the renderer's; rows grow downwards.

    Args:
        image: ``[H, W, 3]`` (float in [0, 1] or uint8) or ``[H, W]`` scalar (colorized).
        means2d: ``[N, 2]`` pixel centres of the Gaussians.
        covars2d: ``[N, 2, 2]`` screen covariances; each is drawn as ellipses at ``nsigmas``.
        nsigmas: the standard-deviation levels drawn.
        radii: ``[N, 2]`` per-axis extents: the boxes ``mean +- radius`` are drawn dashed.
        tile_size: draw the tile grid with this tile edge (pixels).
        tile_counts: ``[tiles_y, tiles_x]`` numbers written in each tile (zeros left out).
        highlight_tiles: ``(tx, ty)`` tiles shaded in orange.
        title: figure title.
        display_width: width of the drawn figure in screen pixels.
    """
    img = colorize(image) if is_scalar_image(image) else to_uint8(image)
    H, W = img.shape[:2]
    fig = go.Figure(go.Image(z=img[..., :3], x0=0.5, y0=0.5, dx=1, dy=1, hoverinfo="x+y+z"))
    levels = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b"]
    if means2d is not None and covars2d is not None:
        mu = means2d.detach().to("cpu", torch.float64).numpy().reshape(-1, 2)
        cov = covars2d.detach().to("cpu", torch.float64).numpy().reshape(-1, 2, 2)
        if len(cov) != len(mu):
            raise ValueError(f"splat_figure: {len(mu)} means2d but {len(cov)} covars2d")
        for li, k in enumerate(nsigmas):
            pts = []
            for m, c in zip(mu, cov, strict=True):
                pts += [_ellipse_points(m, c, k), np.full((1, 2), np.nan)]
            p = np.concatenate(pts)
            fig.add_trace(go.Scatter(x=p[:, 0], y=p[:, 1], mode="lines", name=f"{k:g} sigma",
                                     line=dict(color=levels[li % len(levels)], width=1.5), hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=mu[:, 0], y=mu[:, 1], mode="markers", name="centre",
                                 marker=dict(symbol="x", size=6, color="black")))
    if radii is not None and means2d is not None:
        mu = means2d.detach().to("cpu", torch.float64).numpy().reshape(-1, 2)
        r = radii.detach().to("cpu", torch.float64).numpy().reshape(-1, 2)
        if len(r) != len(mu):
            raise ValueError(f"splat_figure: {len(mu)} means2d but {len(r)} radii")
        xs, ys = [], []
        for (mx, my), (rx, ry) in zip(mu, r, strict=True):
            if rx <= 0 and ry <= 0:
                continue
            xs += [mx - rx, mx + rx, mx + rx, mx - rx, mx - rx, None]
            ys += [my - ry, my - ry, my + ry, my + ry, my - ry, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="extent (radii)",
                                 line=dict(color="#2ca02c", width=1.5, dash="dash"), hoverinfo="skip"))
    if tile_size is not None:
        xs, ys = [], []
        for x in range(0, W + 1, tile_size):
            xs += [x, x, None]
            ys += [0, H, None]
        for y in range(0, H + 1, tile_size):
            xs += [0, W, None]
            ys += [y, y, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{tile_size}px tiles",
                                 line=dict(color="rgba(0,0,0,0.35)", width=1), hoverinfo="skip"))
        for tx, ty in highlight_tiles:
            fig.add_shape(type="rect", x0=tx * tile_size, x1=min((tx + 1) * tile_size, W), y0=ty * tile_size,
                          y1=min((ty + 1) * tile_size, H), fillcolor="rgba(255,127,14,0.35)", line_width=0)
        if tile_counts is not None:
            cnt = tile_counts.detach().to("cpu").numpy() if isinstance(tile_counts, Tensor) else np.asarray(tile_counts)
            ty, tx = np.nonzero(cnt)
            fig.add_trace(go.Scatter(x=(tx + 0.5) * tile_size, y=(ty + 0.5) * tile_size, mode="text",
                                     text=[str(int(c)) for c in cnt[ty, tx]], name="Gaussians per tile",
                                     textfont=dict(size=12, color="black"), hoverinfo="skip"))
    fig.update_xaxes(range=[0, W], showgrid=False, title_text="u (pixels)", constrain="domain")
    fig.update_yaxes(range=[H, 0], showgrid=False, title_text="v (pixels)", scaleanchor="x", constrain="domain")
    fig.update_layout(title=title, width=display_width + 160, height=int(display_width * H / W) + 110,
                      margin=dict(l=50, r=10, t=70, b=40), legend=dict(x=1.02, y=1))
    return fig


# ----------------------------------------------------------------------------- live training curves
class LiveCurves:
    """Training curves that redraw while a loop runs, one panel per named value.

    In a Jupyter kernel the figure is shown on the first :meth:`update` and then replaced in
    place (an IPython display handle), which works in JupyterLab, VS Code and ``nbconvert
    --execute`` alike and leaves the final figure in the saved notebook. Outside a kernel nothing
    is displayed; :meth:`figure` returns the curves. (plotly's ``FigureWidget`` is not used:
    plotly >= 6 needs the optional ``anywidget`` package for it and widget state does not
    survive an HTML export.)

    Every redraw sends the whole figure to the frontend, so redraws are rationed (mode
    ``"auto"``): the wait before the next one is the largest of ``min_interval_s``,
    ``COST_FACTOR`` (10) times what the last redraw took (a slow machine draws less often) and
    ``AGE_FRACTION`` (5 %) of the time since the first one (a long loop: about 20 redraws in the
    first 20 s, then a few dozen more for every tenfold of its duration); there are at most
    ``max_redraws`` of them, and during the loop each curve is thinned to ``live_points``
    points. :meth:`finish` draws every recorded point. When ``FASTAVATAR_HEADLESS=1`` (a
    headless run: ``fastavatar-nb run``, ``make test``; see :func:`fastavatar_nb._live.live_displays`)
    nobody watches: the figure is drawn once, by :meth:`finish`.

    Example::

        curves = LiveCurves("fitting")
        for step in range(n):
            ...
            curves.update(step, loss=loss.item(), psnr=psnr)
        curves.finish()          # final redraw, every point
        fig = curves.figure()    # the static figure (e.g. to save)

    Args:
        title: figure title.
        log_y: logarithmic y axes.
        min_interval_s: least time between redraws during the loop.
        mode: ``"auto"`` (in a kernel: rationed redraws, or one drawing at :meth:`finish` when
            headless), ``"display"`` (always call IPython.display, a redraw every
            ``min_interval_s`` up to ``max_redraws``, whatever the environment; for tests and
            debugging), ``"none"`` (record only).
        height: figure height in pixels.
        cols: panels per row.
        max_redraws: most redraws during the loop (the one by :meth:`finish` not counted).
        live_points: most points per curve in a redraw during the loop (evenly thinned, the
            last one kept); :meth:`finish` and :meth:`figure` use every point.
        clock: the time source in seconds (tests pass a fake one).
    """

    COST_FACTOR = 10.0
    """Mode "auto": wait at least this many times the duration of the last redraw."""
    AGE_FRACTION = 0.05
    """Mode "auto": wait at least this fraction of the time since the first redraw."""

    def __init__(self, title: str = "training curves", *, log_y: bool = False, min_interval_s: float = 1.0,
                 mode: LiveMode = "auto", height: int = 300, cols: int = 3, max_redraws: int = 200,
                 live_points: int = 1000, clock: Callable[[], float] = time.perf_counter) -> None:
        if mode not in ("auto", "display", "none"):
            raise ValueError(f"LiveCurves mode must be 'auto', 'display' or 'none', got {mode!r}")
        if max_redraws < 0:
            raise ValueError(f"LiveCurves max_redraws must be >= 0, got {max_redraws}")
        if live_points < 2:
            raise ValueError(f"LiveCurves live_points must be >= 2, got {live_points}")
        self.title = title
        self.log_y = log_y
        self.min_interval_s = float(min_interval_s)
        self.height = height
        self.cols = cols
        self.max_redraws = int(max_redraws)
        self.live_points = int(live_points)
        self.mode = mode
        self.live = mode == "display" or (mode == "auto" and _live.in_notebook_kernel())
        """Whether anything is displayed (at least the figure drawn by :meth:`finish`)."""
        self.redraw = mode == "display" or (mode == "auto" and _live.live_displays())
        """Whether the figure is also redrawn during the loop (False when headless)."""
        self.redraws = 0
        """Redraws made by :meth:`update` so far."""
        self.history: dict[str, tuple[list[int], list[float]]] = {}
        """Recorded curves: name -> (steps, values)."""
        self._clock = clock
        self._handle = None
        self._first_draw = -math.inf
        self._last_draw = -math.inf
        self._last_cost = 0.0

    def update(self, step: int, **values: float | Tensor) -> None:
        """Record ``values`` (floats or 0-d tensors) at ``step`` and redraw if it is time to."""
        if not values:
            raise ValueError("LiveCurves.update needs at least one named value, e.g. update(step, loss=0.1)")
        for k, v in values.items():
            try:
                x = float(v)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"LiveCurves.update: value {k!r} is not a scalar ({type(v).__name__})") from e
            steps, vals = self.history.setdefault(k, ([], []))
            steps.append(int(step))
            vals.append(x)
        if self.redraw and self.redraws < self.max_redraws and self._clock() - self._last_draw >= self._wait():
            self.redraws += 1
            self._draw(self.live_points)

    def _wait(self) -> float:
        """Seconds to wait after the last redraw before the next one."""
        if self.mode != "auto" or self._first_draw == -math.inf:
            return self.min_interval_s
        age = self._last_draw - self._first_draw
        return max(self.min_interval_s, self.COST_FACTOR * self._last_cost, self.AGE_FRACTION * age)

    def last(self, name: str) -> float:
        """The most recent value recorded for ``name``."""
        if name not in self.history:
            raise KeyError(f"LiveCurves has no curve {name!r}; recorded: {sorted(self.history)}")
        return self.history[name][1][-1]

    def figure(self, max_points: int | None = None) -> go.Figure:
        """The curves so far as a static figure (one panel per value, sharing the step axis).

        Args:
            max_points: thin each curve evenly to at most this many points (its last point kept);
                ``None``: every point.
        """
        names = list(self.history)
        n = max(1, len(names))
        cols = min(self.cols, n)
        rows = math.ceil(n / cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=names or [""], horizontal_spacing=0.08,
                            vertical_spacing=0.15)
        for i, k in enumerate(names):
            steps, vals = _thin(*self.history[k], max_points)
            r, c = divmod(i, cols)
            fig.add_trace(go.Scatter(x=steps, y=vals, mode="lines", name=k, showlegend=False), row=r + 1, col=c + 1)
            fig.update_xaxes(title_text="step", row=r + 1, col=c + 1)
            if self.log_y:
                fig.update_yaxes(type="log", row=r + 1, col=c + 1)
        fig.update_layout(title=self.title, height=self.height * rows, margin=dict(l=50, r=20, t=60, b=40))
        return fig

    def finish(self) -> None:
        """Draw the figure once more with every recorded value (call after the loop).

        In a kernel this always draws, also when headless (the figure stays in the saved
        notebook). Returns nothing, so that a notebook cell ending in ``curves.finish()`` does
        not show the curves a second time; :meth:`figure` gives the static figure.
        """
        if self.live:
            self._draw(None)

    def _draw(self, max_points: int | None) -> None:
        from IPython.display import display

        t0 = self._clock()
        # A raw mime bundle, not the figure: plotly's _ipython_display_ ignores display ids, so
        # updating a displayed figure in place would append a new output each time.
        bundle = _figure_bundle(self.figure(max_points))
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        self._last_draw = self._clock()
        self._last_cost = self._last_draw - t0
        if self._first_draw == -math.inf:
            self._first_draw = self._last_draw

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        return _figure_bundle(self.figure())


def _thin(steps: list[int], values: list[float], max_points: int | None) -> tuple[list[int], list[float]]:
    """At most ``max_points`` evenly spaced entries of a curve, its last one included."""
    n = len(steps)
    if max_points is None or n <= max_points:
        return steps, values
    keep = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return [steps[i] for i in keep], [values[i] for i in keep]


def _figure_bundle(fig: go.Figure) -> dict[str, Any]:
    """The mime bundle plotly's default renderers make for ``fig``.

    Unlike ``fig._repr_mimebundle_()``, which re-activates every renderer on each call (the
    ``notebook`` renderer then embeds plotly.js, about 4.7 MB, into the notebook again each
    time), this activates pending renderers once, as ``fig.show()`` does.
    """
    import plotly.io as pio

    build = getattr(pio.renderers, "_build_mime_bundle", None)  # plotly's own, stable since plotly 4
    bundle = dict(fig._repr_mimebundle_() if build is None else build(fig.to_dict()))
    # Outside a kernel plotly's default renderer may be empty: keep the figure JSON and a text line.
    bundle.setdefault("application/vnd.plotly.v1+json", fig.to_plotly_json())
    bundle.setdefault("text/plain", f"plotly Figure: {fig.layout.title.text or 'untitled'}")
    return bundle


# ----------------------------------------------------------------------------- orbit viewer
