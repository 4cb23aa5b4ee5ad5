"""Notebook viewers: one import for what the notebooks show (``from fastavatar_nb import viewers``).

The code lives by concern: :mod:`fastavatar_nb.images` (uint8, PNG, colour maps, labelled grids, GIFs; no
plotly), :mod:`fastavatar_nb.plots` (plotly figures and live training curves) and
:mod:`fastavatar_nb.orbit` (the server-side orbit viewer and turntables). This module re-exports their public
names, so ``viewers.image_grid`` and ``viewers.OrbitViewer`` keep working.
"""

from __future__ import annotations

from ._live import in_notebook_kernel
from .images import colorize, data_uri, image_grid, png_bytes, save_gif, to_uint8
from .orbit import OrbitViewer, orbit_framing, turntable_frames
from .plots import (
    LiveCurves,
    camera_frusta,
    camera_frusta_traces,
    ellipsoids,
    scatter_gaussians,
    setup_plotly,
    sh_sphere,
    splat_figure,
)

__all__ = [
    "OrbitViewer", "LiveCurves", "scatter_gaussians", "ellipsoids", "camera_frusta", "camera_frusta_traces",
    "splat_figure", "sh_sphere", "image_grid", "colorize", "to_uint8", "png_bytes", "in_notebook_kernel",
    "setup_plotly", "turntable_frames", "save_gif", "orbit_framing", "data_uri",
]
