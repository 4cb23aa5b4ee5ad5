"""Real-time 3D in the browser: a WebGL splat viewer for notebooks and standalone pages.

:class:`HeadViewer` shows one or more heads side by side with one shared (linked) orbit camera.
The browser draws them with WebGL2 through `gsplat.js <https://github.com/dylanebert/gsplat.js>`_
(MIT), bundled with this package as ``assets/splat_viewer.js`` (built from ``js/`` by ``make js``;
nothing is fetched from a network at run time). In JupyterLab it is an
`anywidget <https://anywidget.dev>`_ widget: dragging orbits in the browser without a kernel
round trip, and :meth:`HeadViewer.set_head` replaces a head's Gaussians in place (the latent
explorer re-decodes on every slider move). Without a kernel the same viewer works from the
``text/html`` that every display carries (an exported notebook, ``nbconvert --to html``) and from
:func:`write_html` (or :meth:`HeadViewer.to_html`), one
self-contained file.

Conventions (the package's, :mod:`fastavatar_nb.cameras`): metres, world +y up, the face looks
along +z; the orbit camera is :meth:`Cameras.from_spherical <fastavatar_nb.cameras.Cameras.from_spherical>`
(yaw 0 looks at the face from +z, positive pitch from above, vertical field of view ``fov_y_deg``).

Colour: the browser draws **spherical-harmonic degree 0** (each Gaussian's view-independent DC
colour, ``0.5 + SH_C0 * sh[0]`` clamped to [0, 1], as 8-bit RGBA with the opacity); the kernel's
renderer uses all degree-3 bands. For heads trained here the difference is small (the notebooks'
renders at ``sh_degree=0`` look the same); it is visible on strong view-dependent highlights.

Payload: :data:`BYTES_PER_GAUSSIAN` (44) bytes per Gaussian: 110 kB for K = 2,500, 446 kB for
K = 10,144, sent once per head (and again on each :meth:`HeadViewer.set_head`); a page or an
exported notebook holds it base64-encoded (4/3 of that) plus the 111 kB viewer script per display.

Where the browser has no WebGL2, the viewer says so and the kernel-rendered
:class:`~fastavatar_nb.orbit.OrbitViewer` takes its place (one per head, not linked).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import torch
import traitlets

from .gaussians import Gaussians

__all__ = ["HeadViewer", "SplatWidget", "pack_head", "viewer_state", "html_page", "write_html",
           "BYTES_PER_GAUSSIAN", "BROWSER_SH_DEGREE", "ASSET"]

ASSET = Path(__file__).parent / "assets" / "splat_viewer.js"
"""The bundled browser module (gsplat.js and ``js/src/splat_viewer.js``, built by ``make js``)."""

BYTES_PER_GAUSSIAN = 44
"""Packed size of one Gaussian: mean, scale (3 float32 each), unit quaternion (4 float32), RGBA (4 uint8)."""

BROWSER_SH_DEGREE = 0
"""The spherical-harmonic degree the browser draws (view-independent colour)."""

IFRAME_MIN_WIDTH = 420
"""Pixels: room for the status line under a single narrow panel in the offline page's iframe."""
IFRAME_EXTRA_HEIGHT = 64
"""Pixels below the panels in that iframe: the titles and up to three lines of status."""

FALLBACK_NOTE = "WebGL2 is not available in this browser: showing the kernel-rendered OrbitViewer instead."


@lru_cache(maxsize=1)
def _bundle() -> str:
    """The browser module's text (read once)."""
    try:
        text = ASSET.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the browser viewer's script {ASSET} is missing from this installation; rebuild it with "
            "`make js` (npm ci && npm run build in js/) or reinstall fastavatar-nb") from None
    if "</script" in text.lower():  # would end the <script> element that embeds it in a page
        raise ValueError(f"{ASSET} contains '</script' and cannot be embedded in an HTML page")
    return text


def pack_head(gaussians: Gaussians) -> bytes:
    """One unbatched set of Gaussians as the browser viewer's little-endian byte layout.

    ``[K*3 float32 means][K*3 float32 scales][K*4 float32 unit quaternions wxyz][K*4 uint8 RGBA]``,
    RGBA being the DC colour (:data:`BROWSER_SH_DEGREE`) and the opacity, each rounded to 1/255.

    Raises:
        TypeError: not a :class:`Gaussians`.
        ValueError: a batch (index it first), no Gaussians, or non-finite values.
    """
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"the web viewer shows Gaussians, got {type(gaussians).__name__}")
    if gaussians.batch_shape:
        raise ValueError(f"the web viewer shows one set per panel; got batch_shape {tuple(gaussians.batch_shape)}: "
                         "index it first (gaussians[i]) or pass the sets as a list")
    if gaussians.num_gaussians == 0:
        raise ValueError("the web viewer got a set with no Gaussians (K = 0)")
    g = gaussians.detach().to("cpu", torch.float32).validate()
    rgba = torch.cat([g.dc_colors, g.opacities[:, None]], dim=-1)
    rgba = (rgba * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    floats = [g.means, g.scales, g.rotations]
    return b"".join(np.ascontiguousarray(t.numpy(), dtype="<f4").tobytes() for t in floats) + rgba.numpy().tobytes()


def _named_heads(heads: Gaussians | Sequence[Gaussians] | Mapping[str, Gaussians],
                 titles: Sequence[str] | None) -> tuple[list[Gaussians], list[str]]:
    if isinstance(heads, Gaussians):
        heads = [heads[i] for i in range(len(heads))] if heads.batch_shape else [heads]
    if isinstance(heads, Mapping):
        if titles is not None:
            raise ValueError("give titles either as the mapping's keys or as titles=, not both")
        titles, heads = [str(k) for k in heads], list(heads.values())
    heads = list(heads)
    if not heads:
        raise ValueError("the web viewer needs at least one head")
    titles = [""] * len(heads) if titles is None else [str(t) for t in titles]
    if len(titles) != len(heads):
        raise ValueError(f"{len(titles)} titles for {len(heads)} heads")
    return heads, titles


def viewer_state(heads: Gaussians | Sequence[Gaussians] | Mapping[str, Gaussians], *,
                 titles: Sequence[str] | None = None, width: int = 192, height: int = 256, yaw_deg: float = 0.0,
                 pitch_deg: float = 0.0, distance: float | None = None, fov_y_deg: float = 15.0,
                 target: Sequence[float] | None = None, background: float | Sequence[float] = 1.0) -> dict[str, Any]:
    """The viewer's fields (what the widget syncs and a page embeds), heads packed by :func:`pack_head`.

    ``target`` and ``distance`` default to the first head's framing
    (:func:`fastavatar_nb.orbit.orbit_framing`, the same as :class:`~fastavatar_nb.orbit.OrbitViewer`'s).
    """
    from .orbit import orbit_framing

    heads, titles = _named_heads(heads, titles)
    if int(width) < 8 or int(height) < 8:
        raise ValueError(f"the web viewer's panels must be at least 8x8 pixels, got {width}x{height}")
    if not 1.0 <= fov_y_deg <= 120.0:
        raise ValueError(f"fov_y_deg must be in [1, 120] degrees, got {fov_y_deg}")
    auto_target, auto_distance = orbit_framing(heads[0], fov_y_deg)
    distance = auto_distance if distance is None else float(distance)
    if not distance > 0:
        raise ValueError(f"distance must be positive, got {distance}")
    bg = [float(background)] * 3 if np.isscalar(background) else [float(c) for c in background]
    if len(bg) != 3 or not all(0.0 <= c <= 1.0 for c in bg):
        raise ValueError(f"background must be one value or three (RGB) in [0, 1], got {background}")
    return {
        "heads": [pack_head(h) for h in heads], "titles": titles, "width": int(width), "height": int(height),
        "yaw": float(yaw_deg), "pitch": float(pitch_deg), "distance": distance, "fov_y_deg": float(fov_y_deg),
        "target": [float(v) for v in (auto_target if target is None else target)], "background": bg,
    }


class SplatWidget(anywidget.AnyWidget):
    """The browser side of :class:`HeadViewer` (an anywidget; camera in degrees and metres)."""

    _esm = traitlets.Unicode().tag(sync=True)
    heads = traitlets.List(traitlets.Bytes()).tag(sync=True)
    """One :func:`pack_head` buffer per panel."""
    titles = traitlets.List(traitlets.Unicode()).tag(sync=True)
    width = traitlets.Int(192).tag(sync=True)
    height = traitlets.Int(256).tag(sync=True)
    yaw = traitlets.Float(0.0).tag(sync=True)
    pitch = traitlets.Float(0.0).tag(sync=True)
    distance = traitlets.Float(1.0).tag(sync=True)
    fov_y_deg = traitlets.Float(15.0).tag(sync=True)
    target = traitlets.List(traitlets.Float(), [0.0, 0.0, 0.0]).tag(sync=True)
    background = traitlets.List(traitlets.Float(), [1.0, 1.0, 1.0]).tag(sync=True)
    renderer = traitlets.Unicode("").tag(sync=True)
    """Set by the browser: its WebGL renderer's name, or ``"unavailable"``."""


class HeadViewer:
    """Heads drawn in the browser with WebGL, side by side, one linked orbit camera.

    Drag a panel to orbit (left/right yaw, up/down pitch), scroll to zoom; every panel follows.
    The camera's ``yaw``, ``pitch`` and ``distance`` come back to the kernel when the mouse is released
    (:attr:`widget`'s traits), and setting them moves the view.

    Args:
        heads: a :class:`Gaussians` (a batch shows each set), a list of them, or a mapping title -> set.
        titles: panel titles (not with a mapping).
        width, height: each panel's size in pixels.
        yaw_deg, pitch_deg, distance, fov_y_deg, target: the initial camera (degrees, metres), as
            :meth:`~fastavatar_nb.cameras.Cameras.from_spherical`; ``target``/``distance`` default to
            the first head's framing.
        background: RGB in [0, 1] (one value for grey levels); white by default, as the paper scores.
        fallback_backend: the renderer of the :class:`~fastavatar_nb.orbit.OrbitViewer` shown where
            the browser has no WebGL2.

    Displays as the widget in a live frontend and as a self-contained WebGL page (``text/html``)
    everywhere else, e.g. in ``nbconvert --to html`` exports.
    """

    def __init__(self, heads: Gaussians | Sequence[Gaussians] | Mapping[str, Gaussians], *,
                 titles: Sequence[str] | None = None, width: int = 192, height: int = 256, yaw_deg: float = 0.0,
                 pitch_deg: float = 0.0, distance: float | None = None, fov_y_deg: float = 15.0,
                 target: Sequence[float] | None = None, background: float | Sequence[float] = 1.0,
                 fallback_backend: str = "auto") -> None:
        import ipywidgets as widgets

        self._heads, titles = _named_heads(heads, titles)
        state = viewer_state(self._heads, titles=titles, width=width, height=height, yaw_deg=yaw_deg,
                             pitch_deg=pitch_deg, distance=distance, fov_y_deg=fov_y_deg, target=target,
                             background=background)
        self.widget = SplatWidget(_esm=_bundle(), **state)
        """The :class:`SplatWidget` (traits ``heads``, ``titles``, ``yaw``, ``pitch``, ``distance``, ...)."""
        self.fallback_backend = fallback_backend
        self.box = widgets.VBox([self.widget])
        """What is displayed: the widget, or the fallback viewers with a note."""
        self._fallback: list = []
        self.widget.observe(self._on_renderer, names="renderer")

    # ------------------------------------------------------------------ public API
    @property
    def heads(self) -> list[Gaussians]:
        """The sets shown, one per panel."""
        return list(self._heads)

    @property
    def titles(self) -> list[str]:
        return list(self.widget.titles)

    def set_head(self, index: int, gaussians: Gaussians, title: str | None = None) -> None:
        """Replace panel ``index``'s Gaussians (and title); the browser redraws without reloading."""
        if not -len(self._heads) <= index < len(self._heads):
            raise IndexError(f"panel {index} does not exist: this viewer has {len(self._heads)} panel(s)")
        packed = pack_head(gaussians)
        self._heads[index] = gaussians.detach()
        heads = list(self.widget.heads)
        heads[index] = packed
        if title is not None:
            titles = list(self.widget.titles)
            titles[index] = str(title)
            self.widget.titles = titles
        self.widget.heads = heads
        if self._fallback:  # the browser has no WebGL2: the kernel-rendered viewers show the head
            self._fallback[index].gaussians = self._heads[index]
            self._fallback[index].refresh()

    def set_view(self, yaw: float | None = None, pitch: float | None = None, distance: float | None = None) -> None:
        """Move the shared camera (degrees, metres; ``None`` keeps a value)."""
        if distance is not None and not distance > 0:
            raise ValueError(f"distance must be positive, got {distance}")
        with self.widget.hold_sync():
            for name, value in (("yaw", yaw), ("pitch", pitch), ("distance", distance)):
                if value is not None:
                    setattr(self.widget, name, float(value))

    def state(self) -> dict[str, Any]:
        """The fields a page embeds: heads (packed), titles and the current camera."""
        names = ("heads", "titles", "width", "height", "yaw", "pitch", "distance", "fov_y_deg", "target", "background")
        return {name: getattr(self.widget, name) for name in names}

    def to_html(self, path: str | os.PathLike, title: str = "3D heads", *, overwrite: bool = False) -> Path:
        """Write the current heads and view as one self-contained page (see :func:`write_html`)."""
        return _write_page(path, html_page(self.state(), title), overwrite)

    def show(self) -> None:
        from IPython.display import display

        display(self)

    # ------------------------------------------------------------------ fallback and display
    def _on_renderer(self, change: dict) -> None:
        if change["new"] != "unavailable":
            return
        import ipywidgets as widgets

        from .orbit import OrbitViewer

        w = self.widget
        orbits = [OrbitViewer(h, width=w.width, height=w.height, backend=self.fallback_backend, yaw_deg=w.yaw,
                              pitch_deg=w.pitch, distance=w.distance, fov_y_deg=w.fov_y_deg, target=w.target,
                              background=float(np.mean(w.background))) for h in self._heads]
        panels = [widgets.VBox([o.widget, widgets.Label(t)]) for o, t in zip(orbits, w.titles, strict=True)]
        self._fallback = orbits
        self.box.children = [widgets.Label(FALLBACK_NOTE), widgets.HBox(panels)]

    def offline_html(self) -> str:
        """The current heads and view as a self-contained WebGL page in an ``<iframe>`` (what a display
        carries as ``text/html`` for pages without a kernel)."""
        return iframe(html_page(self.state(), "3D heads", bare=True), self.widget)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        """The widget for live frontends, a self-contained WebGL page (an iframe) for everything else."""
        bundle = dict(self.box._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/html"] = self.offline_html()
        bundle["text/plain"] = repr(self)
        return bundle

    def __repr__(self) -> str:
        ks = ", ".join(f"{t or i}: K={h.num_gaussians:,}" for i, (t, h) in enumerate(zip(self.widget.titles, self._heads, strict=True)))
        return (f"HeadViewer({ks}; yaw {self.widget.yaw:.0f}, pitch {self.widget.pitch:.0f}, "
                f"distance {self.widget.distance:.2f})")


# ---------------------------------------------------------------------------------------------
# Pages without a kernel
# ---------------------------------------------------------------------------------------------

_LOADER = """
const source = document.getElementById("fa-splat-module").textContent;
const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
const viewer = await import(url);
const state = JSON.parse(document.getElementById("fa-splat-state").textContent);
viewer.mount(document.getElementById("fa-splat-root"), viewer.staticModel(state));
"""


def _json_for_script(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def html_page(state: Mapping[str, Any], title: str = "3D heads", *, bare: bool = False,
              images: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None) -> str:
    """A self-contained HTML page (no network, no other file) showing the viewer of ``state``.

    ``state`` is :func:`viewer_state`'s dict (or :meth:`HeadViewer.state`). ``images`` (name ->
    image) are shown as stills beside the viewer and ``info`` as a table below; ``bare`` leaves out
    the page's heading and margins (for an iframe in a notebook).
    """
    from .images import data_uri

    page_state = {k: v for k, v in state.items() if k != "heads"}
    page_state["heads_b64"] = [base64.b64encode(bytes(h)).decode("ascii") for h in state["heads"]]
    stills = "".join(
        f'<figure><img src="{data_uri(img)}" style="height:{state["height"]}px;image-rendering:pixelated">'
        f"<figcaption>{html.escape(str(name))}</figcaption></figure>" for name, img in (images or {}).items())
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in (info or {}).items())
    heading = "" if bare else f"<h2>{html.escape(title)}</h2>"
    margin = "0" if bare else "1.5em"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: {margin}; color: #222; background: #fff; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
figure {{ margin: 0; text-align: center; }} figcaption {{ font-size: 0.9em; color: #555; }}
table {{ border-collapse: collapse; margin-top: 1em; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: left; }}
</style></head><body>
{heading}<div class="row">{stills}<div id="fa-splat-root"></div></div>
{f"<table>{rows}</table>" if rows else ""}
<noscript>This page draws the head with JavaScript and WebGL2; the PLY file next to it opens in any 3DGS viewer.</noscript>
<script type="application/json" id="fa-splat-state">{_json_for_script(page_state)}</script>
<script type="text/plain" id="fa-splat-module">{_bundle()}</script>
<script type="module">{_LOADER}</script>
</body></html>
"""


def iframe(page: str, widget: Any) -> str:
    """``page`` in an ``<iframe srcdoc>`` sized for the widget's panels (isolated from the notebook's page)."""
    n = len(widget.heads)
    w, h = max(n * (widget.width + 4) + 8, IFRAME_MIN_WIDTH), widget.height + IFRAME_EXTRA_HEIGHT
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" width="{w}" height="{h}" '
            f'style="border:0" title="3D heads (WebGL)"></iframe>')


def _write_page(path: str | os.PathLike, page: str, overwrite: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the HTML file's path (e.g. {path / 'viewer.html'})")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist; create it first")
    path.write_text(page, encoding="utf-8")
    return path


def write_html(path: str | os.PathLike, heads: Gaussians | Sequence[Gaussians] | Mapping[str, Gaussians], *,
               title: str = "3D head", overwrite: bool = False, images: Mapping[str, Any] | None = None,
               info: Mapping[str, Any] | None = None, **view: Any) -> Path:
    """Write heads as one self-contained HTML file that opens offline in any browser with WebGL2.

    ``view`` takes :func:`viewer_state`'s keywords (``titles``, ``width``, ``height``, ``yaw_deg``, ...);
    ``images`` and ``info`` as in :func:`html_page`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: ``path``'s folder does not exist.
    """
    state = viewer_state(heads, **view)
    return _write_page(path, html_page(state, title, images=images, info=info), overwrite)
