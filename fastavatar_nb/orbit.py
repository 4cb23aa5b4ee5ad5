"""The orbit viewer (:class:`OrbitViewer`), rendered server-side, and turntables.

The viewer returns an object the notebook displays; without a live frontend (headless ``nbval``, ``nbconvert
--execute``, a plain script) it still displays a static picture and nothing raises. Angles are in degrees: yaw 0
looks at the face from +z, positive pitch looks down from above (:mod:`fastavatar_nb.cameras`' convention).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .cameras import Cameras
from .gaussians import Gaussians
from .images import png_bytes, to_uint8

if TYPE_CHECKING:
    from .render import Backend

__all__ = ["OrbitViewer", "orbit_framing", "turntable_frames"]

RenderFn = Callable[..., Any]
"""``render(gaussians, cameras, background=..., backend=..., sh_degree=...)`` returning an object with
``colors [..., C, H, W, 3]`` and ``backend: str`` (:func:`fastavatar_nb.render.render`)."""


def _default_render() -> RenderFn:
    from .render import render  # imported late: viewers work with any render function

    return render


ORBIT_MARGIN = 1.1
"""The default orbit distance leaves this much room around the head's bounding sphere."""


def orbit_framing(gaussians: Gaussians, fov_y_deg: float = 15.0) -> tuple[tuple[float, float, float], float]:
    """Default orbit ``(target, distance)`` for one set: the centre of the 2-98 percentile box of the
    means, and the distance at which that box's bounding sphere fills the vertical field of view
    (with :data:`ORBIT_MARGIN`). Shared by :class:`OrbitViewer` and the browser viewer."""
    g = gaussians.detach()
    m = g.means.reshape(-1, 3).to("cpu", torch.float32)
    lo, hi = torch.quantile(m, 0.02, dim=0), torch.quantile(m, 0.98, dim=0)
    radius = max(float((hi - lo).norm()) / 2, 3.0 * float(g.scales.max()), 1e-3)
    target = tuple(float(v) for v in (lo + hi) / 2)
    return target, radius / math.sin(math.radians(fov_y_deg) / 2) * ORBIT_MARGIN


class OrbitViewer:
    """An orbit viewer for any :class:`~fastavatar_nb.gaussians.Gaussians`, rendered server-side.

    The view is a camera on a sphere around ``target`` (yaw, pitch, distance sliders) rendered
    with :func:`fastavatar_nb.render.render`; the image is shown as a PNG in an
    ``ipywidgets.Image``. A ``Play`` button spins a turntable. While a slider moves or the
    turntable plays, frames are rendered at ``interactive_scale`` times the resolution and a
    full-resolution frame follows ``refine_delay_s`` seconds after the motion stops. A label
    shows the backend, milliseconds per frame and the resolution.

    Dragging the image (left/right = yaw, up/down = pitch, wheel = distance) works when the
    optional package ``ipyevents`` is installed (it is not a dependency); the sliders always work.

    Without a widget frontend (headless ``nbval``, exported HTML, a terminal) displaying the
    viewer shows a static PNG of the current view instead (see :meth:`_repr_mimebundle_`).

    Args:
        gaussians: an unbatched set (index a batch first, ``g[i]``), on any device.
        width, height: full-resolution frame size in pixels.
        backend: renderer backend (``"auto"``, ``"torch"``, ``"gsplat"``).
        yaw_deg, pitch_deg: initial view (degrees; yaw 0 looks from +z at the face).
        distance: camera distance in metres (default: the scene's bounding sphere fills the view).
        fov_y_deg: vertical field of view.
        target: orbit centre (default the centre of the 2-98 percentile box of the means).
        background: background colour passed to ``render``.
        sh_degree: SH bands used.
        interactive_scale: resolution factor while moving (``1.0`` disables previews).
        refine_delay_s: idle time after which the full-resolution frame is rendered.
        play_step_deg: yaw step per turntable frame.
        play_interval_ms: time between turntable frames.
        tile_size: rasterizer tile size passed to ``render``; ``None``: ``render``'s per-backend
            default (:data:`fastavatar_nb.render.DEFAULT_TILE_SIZE`).
        render_fn: the render function (default :func:`fastavatar_nb.render.render`); it is called
            with ``tile_size=`` only when a tile size is in effect.
    """

    def __init__(self, gaussians: Gaussians, width: int = 256, height: int = 256, backend: Backend = "auto", *,
                 yaw_deg: float = 0.0, pitch_deg: float = 0.0, distance: float | None = None,
                 fov_y_deg: float = 15.0, target: Sequence[float] | None = None, background: float = 1.0,
                 sh_degree: int = 3, interactive_scale: float = 0.5, refine_delay_s: float = 0.3,
                 play_step_deg: float = 6.0, play_interval_ms: int = 120, tile_size: int | None = None,
                 render_fn: RenderFn | None = None) -> None:
        import ipywidgets as widgets

        if not isinstance(gaussians, Gaussians):
            raise TypeError(f"OrbitViewer needs a Gaussians, got {type(gaussians).__name__}")
        if gaussians.batch_shape:
            raise ValueError(f"OrbitViewer shows one set; got batch_shape {tuple(gaussians.batch_shape)}: "
                             "index it first (gaussians[i])")
        if width < 8 or height < 8:
            raise ValueError(f"OrbitViewer frame must be at least 8x8 pixels, got {width}x{height}")
        if not 0.0 < interactive_scale <= 1.0:
            raise ValueError(f"interactive_scale must be in (0, 1], got {interactive_scale}")
        self.gaussians = gaussians.detach()
        self.width, self.height = int(width), int(height)
        self.backend = backend
        self.fov_y_deg = float(fov_y_deg)
        self.background = background
        self.sh_degree = sh_degree
        self.interactive_scale = float(interactive_scale)
        self.refine_delay_s = float(refine_delay_s)
        self.play_step_deg = float(play_step_deg)
        if render_fn is None:
            render_fn = _default_render()
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self._render_fn = render_fn
        self._render_kwargs: dict[str, Any] = {} if tile_size is None else {"tile_size": int(tile_size)}

        auto_target, auto_distance = orbit_framing(self.gaussians, self.fov_y_deg)
        self.target = auto_target if target is None else tuple(float(v) for v in target)
        d0 = auto_distance if distance is None else float(distance)
        if not d0 > 0:
            raise ValueError(f"OrbitViewer distance must be positive, got {d0}")

        self._image_widget = widgets.Image(format="png", width=self.width, height=self.height)
        self.yaw = widgets.FloatSlider(value=yaw_deg, min=-180, max=180, step=1, description="yaw",
                                       continuous_update=True, readout_format=".0f")
        self.pitch = widgets.FloatSlider(value=pitch_deg, min=-80, max=80, step=1, description="pitch",
                                         continuous_update=True, readout_format=".0f")
        self.distance = widgets.FloatSlider(value=d0, min=d0 / 4, max=d0 * 4, step=d0 / 100,
                                            description="distance", continuous_update=True, readout_format=".2f")
        self.play = widgets.Play(value=0, min=0, max=max(1, round(360 / self.play_step_deg)) - 1, step=1,
                                 interval=play_interval_ms, repeat=True, description="turntable")
        self.status = widgets.Label(value="")
        self.drag_enabled = False
        for s in (self.yaw, self.pitch, self.distance):
            s.observe(self._on_slider, names="value")
        self.play.observe(self._on_play, names="value")
        self.play.observe(self._on_playing, names="playing")
        self._play_yaw0 = float(yaw_deg)
        self._suspend = False
        self._dragging: tuple[float, float] | None = None
        self._refine_handle = None
        self._last_ms = 0.0
        self._last_frame_t = -math.inf
        self._frame: np.ndarray | None = None
        self._frame_is_full = False
        self._attach_drag()
        self.widget = widgets.VBox([
            self._image_widget,
            widgets.HBox([self.play, self.status]),
            self.yaw, self.pitch, self.distance,
        ])
        """The ipywidgets layout (image, turntable and status, three sliders)."""
        self.refresh()

    # ------------------------------------------------------------------ public API
    def cameras(self, scale: float = 1.0) -> Cameras:
        """The current view as a one-camera :class:`Cameras` at ``scale`` times the frame size."""
        w, h = max(8, round(self.width * scale)), max(8, round(self.height * scale))
        return Cameras.from_spherical(
            torch.tensor([math.radians(self.yaw.value)]), torch.tensor([math.radians(self.pitch.value)]),
            float(self.distance.value), w, h, self.fov_y_deg, self.target,
        ).to(self.gaussians.device)

    def set_view(self, yaw: float | None = None, pitch: float | None = None, distance: float | None = None) -> None:
        """Move the camera (degrees, metres; ``None`` keeps a value) and render at full resolution."""
        self._suspend = True
        try:
            if yaw is not None:
                self.yaw.value = float(yaw)
            if pitch is not None:
                self.pitch.value = float(pitch)
            if distance is not None:
                if not distance > 0:
                    raise ValueError(f"distance must be positive, got {distance}")
                self.distance.value = float(distance)
        finally:
            self._suspend = False
        self.refresh()

    def refresh(self) -> None:
        """Render the current view at full resolution and show it."""
        self._cancel_refine()
        self._show(self._render(1.0), full=True)

    def current_image(self) -> np.ndarray:
        """The current view at full resolution, ``[height, width, 3]`` uint8 (rendered if needed)."""
        if self._frame is None or not self._frame_is_full:
            self.refresh()
        return self._frame

    def show(self) -> None:
        """Display the viewer (``IPython.display.display(viewer)``)."""
        from IPython.display import display

        display(self)

    @property
    def last_ms(self) -> float:
        """Milliseconds the last frame took to render."""
        return self._last_ms

    # ------------------------------------------------------------------ rendering
    def _render(self, scale: float) -> np.ndarray:
        cams = self.cameras(scale)
        dev = self.gaussians.device
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self._render_fn(self.gaussians, cams, background=self.background, backend=self.backend,
                                  sh_degree=self.sh_degree, **self._render_kwargs)
            img = out.colors[0]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        self._last_ms = (time.perf_counter() - t0) * 1000
        self._last_frame_t = time.perf_counter()
        self._last_backend = str(getattr(out, "backend", self.backend))
        kind = "" if scale >= 1.0 else "  (preview)"
        self.status.value = f"{self._last_backend} | {self._last_ms:.0f} ms/frame | {cams.width}x{cams.height}{kind}"
        return to_uint8(img)

    def _show(self, frame: np.ndarray, full: bool) -> None:
        self._frame, self._frame_is_full = frame, full
        self._image_widget.value = png_bytes(frame)

    def _interactive_update(self) -> None:
        """A view parameter changed: preview now, full resolution once motion stops."""
        loop = _running_loop()
        if loop is None or self.interactive_scale >= 1.0:
            self.refresh()  # no event loop (tests, scripts): render the final frame directly
            return
        # Behind the frontend (frames arrive faster than they render): skip this one, the refine catches up.
        if time.perf_counter() - self._last_frame_t >= 0.5 * self._last_ms / 1000:
            self._show(self._render(self.interactive_scale), full=False)
        self._cancel_refine()
        self._refine_handle = loop.call_later(self.refine_delay_s, self._refine_if_idle)

    def _refine_if_idle(self) -> None:
        self._refine_handle = None
        if self.play.playing or self._dragging is not None:
            return
        self.refresh()

    def _cancel_refine(self) -> None:
        if self._refine_handle is not None:
            self._refine_handle.cancel()
            self._refine_handle = None

    # ------------------------------------------------------------------ widget callbacks
    def _on_slider(self, change: dict) -> None:
        if not self._suspend:
            self._interactive_update()

    def _on_play(self, change: dict) -> None:
        yaw = (self._play_yaw0 + change["new"] * self.play_step_deg + 180.0) % 360.0 - 180.0
        self.yaw.value = yaw  # triggers _on_slider

    def _on_playing(self, change: dict) -> None:
        if change["new"]:
            self._play_yaw0 = float(self.yaw.value) - self.play.value * self.play_step_deg
        else:
            self.refresh()

    def _attach_drag(self) -> None:
        try:
            from ipyevents import Event
        except ImportError:
            return
        self._events = Event(source=self._image_widget,
                             watched_events=["mousedown", "mouseup", "mousemove", "mouseleave", "wheel"],
                             prevent_default_action=True)
        self._events.on_dom_event(self._on_drag_event)
        self.drag_enabled = True

    def _on_drag_event(self, event: dict) -> None:
        """ipyevents DOM event -> view change (0.5 degree per pixel; wheel zooms by 10 %)."""
        kind = event.get("type")
        if kind == "mousedown":
            self._dragging = (float(event["offsetX"]), float(event["offsetY"]))
        elif kind == "mousemove" and self._dragging is not None:
            x, y = float(event["offsetX"]), float(event["offsetY"])
            dx, dy = x - self._dragging[0], y - self._dragging[1]
            self._dragging = (x, y)
            self._suspend = True
            try:
                self.yaw.value = (self.yaw.value - 0.5 * dx + 180.0) % 360.0 - 180.0
                self.pitch.value = float(np.clip(self.pitch.value + 0.5 * dy, self.pitch.min, self.pitch.max))
            finally:
                self._suspend = False
            self._interactive_update()
        elif kind in ("mouseup", "mouseleave") and self._dragging is not None:
            self._dragging = None
            self.refresh()
        elif kind == "wheel":
            factor = 1.1 if float(event.get("deltaY", 0.0)) > 0 else 1 / 1.1
            self.distance.value = float(np.clip(self.distance.value * factor, self.distance.min, self.distance.max))

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        """The widget for live frontends plus a PNG of the current view for everything else."""
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["image/png"] = base64.b64encode(png_bytes(self.current_image(), compress_level=6)).decode("ascii")
        bundle["text/plain"] = (f"OrbitViewer(K={self.gaussians.num_gaussians}, yaw={self.yaw.value:.0f}, "
                                f"pitch={self.pitch.value:.0f}, distance={self.distance.value:.2f}; {self.status.value})")
        return bundle

    def __repr__(self) -> str:
        return (f"OrbitViewer(K={self.gaussians.num_gaussians}, {self.width}x{self.height}, "
                f"backend={self.backend!r})")


# ---------------------------------------------------------------------------------------------
# Turntables: frames, a GIF and a standalone HTML page
# ---------------------------------------------------------------------------------------------


def turntable_frames(gaussians: Gaussians, n: int = 36, width: int = 138, height: int = 200, *,
                     radius: float = 1.1, pitch_deg: float = 0.0, fov_y_deg: float = 15.0, sh_degree: int = 3,
                     background: float = 1.0, backend: Backend = "auto", batch: int = 6) -> np.ndarray:
    """``n`` uint8 frames ``[n, height, width, 3]`` of a head turning once, starting from the front.

    Cameras: :meth:`~fastavatar_nb.cameras.Cameras.orbit` (yaw 0 looks at the face from +z).
    """
    from .render import render

    if n < 1:
        raise ValueError(f"turntable_frames: n must be >= 1, got {n}")
    cams = Cameras.orbit(n, width, height, radius=radius, pitch_deg=pitch_deg, fov_y_deg=fov_y_deg)
    cams = cams.to(gaussians.means.device)
    frames = []
    with torch.no_grad():
        for i in range(0, n, batch):
            out = render(gaussians, cams[i:i + batch], background=background, backend=backend, sh_degree=sh_degree)
            frames.append(out.colors.clamp(0, 1).cpu())
    return (torch.cat(frames).numpy() * 255 + 0.5).astype(np.uint8)


def _running_loop():
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
