"""Viewers: orbit viewer (against a small fake renderer and the real one), plotly helpers, grids."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.viewers import (
    LiveCurves,
    OrbitViewer,
    camera_frusta,
    camera_frusta_traces,
    colorize,
    ellipsoids,
    image_grid,
    scatter_gaussians,
    setup_plotly,
    sh_sphere,
    splat_figure,
)


@dataclass
class FakeOutput:
    colors: torch.Tensor
    backend: str = "fake"


class FakeRender:
    """Draws each Gaussian as a 3-pixel square of its DC colour, nearest last (no blending)."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, g: Gaussians, cams: Cameras, background: float = 1.0, backend: str = "auto",
                 sh_degree: int = 3) -> FakeOutput:
        self.sizes.append((cams.width, cams.height))
        uv, z = cams.project(g.means)  # [C, K, 2], [C, K]
        out = torch.full((len(cams), cams.height, cams.width, 3), float(background))
        for c in range(len(cams)):
            for k in torch.argsort(z[c], descending=True).tolist():
                u, v = int(uv[c, k, 0]), int(uv[c, k, 1])
                out[c, max(v - 1, 0):max(v + 2, 0), max(u - 1, 0):max(u + 2, 0)] = g.dc_colors[k]
        return FakeOutput(out)


def two_blobs() -> Gaussians:
    """A red Gaussian at +x and a blue one at -x: turning the camera swaps their sides."""
    pts = torch.tensor([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]])
    cols = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return Gaussians.from_points(pts, cols, scale=0.02, opacity=0.9)


def column_of(img: np.ndarray, rgb: tuple[int, int, int]) -> float:
    hit = np.nonzero(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1))
    assert hit[0].size, f"colour {rgb} not in the image"
    return float(hit[1].mean())


def test_viewer_image_changes_with_yaw():
    fake = FakeRender()
    v = OrbitViewer(two_blobs(), width=64, height=48, render_fn=fake)
    img0 = v.current_image()
    assert img0.shape == (48, 64, 3) and img0.dtype == np.uint8
    v.set_view(yaw=180)
    img1 = v.current_image()
    assert not np.array_equal(img0, img1)
    # seen from behind, red and blue swap sides
    red_right_0 = column_of(img0, (255, 0, 0)) > column_of(img0, (0, 0, 255))
    red_right_1 = column_of(img1, (255, 0, 0)) > column_of(img1, (0, 0, 255))
    assert red_right_0 != red_right_1
    assert fake.sizes[-1] == (64, 48)
    assert v.status.value.startswith("fake |") and "ms/frame" in v.status.value


def test_frontal_view_is_upright_and_not_mirrored():
    g = Gaussians.from_points(torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0]]),
                              torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), scale=0.02, opacity=0.9)
    img = OrbitViewer(g, width=64, height=64, render_fn=FakeRender(), target=(0, 0, 0),
                      distance=1.0).current_image()
    # yaw 0 looks at the face from +z: world +x (red) on the right, world +y (green) at the top
    assert column_of(img, (255, 0, 0)) > 32
    rows = np.nonzero(np.all(img == np.array([0, 255, 0], dtype=np.uint8), axis=-1))[0]
    assert rows.mean() < 32


def test_viewer_distance_and_pitch_move_the_camera():
    v = OrbitViewer(two_blobs(), width=64, height=48, render_fn=FakeRender())
    d = v.distance.value
    v.set_view(pitch=30, distance=2 * d)
    c = v.cameras().centers[0]
    assert math.isclose(float(c.norm()), 2 * d, rel_tol=1e-4)
    assert math.isclose(math.degrees(math.asin(float(c[1]) / float(c.norm()))), 30, abs_tol=1e-3)
    with pytest.raises(ValueError, match="distance"):
        v.set_view(distance=-1)


def test_default_distance_frames_the_scene():
    g = two_blobs()
    v = OrbitViewer(g, width=64, height=64, render_fn=FakeRender())
    uv, z = v.cameras().project(g.means)
    assert (z > 0).all() and (uv >= 0).all() and (uv < 64).all()


def test_turntable_and_drag_change_yaw():
    v = OrbitViewer(two_blobs(), width=32, height=32, render_fn=FakeRender(), play_step_deg=10)
    v.play.value = 9
    assert v.yaw.value == pytest.approx(90.0)
    v._on_drag_event({"type": "mousedown", "offsetX": 10, "offsetY": 10})
    v._on_drag_event({"type": "mousemove", "offsetX": 30, "offsetY": 20})
    assert v.yaw.value == pytest.approx(80.0) and v.pitch.value == pytest.approx(5.0)
    d = v.distance.value
    v._on_drag_event({"type": "mouseup", "offsetX": 30, "offsetY": 20})
    v._on_drag_event({"type": "wheel", "deltaY": 100})
    assert v.distance.value == pytest.approx(1.1 * d, rel=1e-3)


def test_preview_then_full_resolution_inside_an_event_loop():
    fake = FakeRender()
    v = OrbitViewer(two_blobs(), width=64, height=48, render_fn=fake, interactive_scale=0.5, refine_delay_s=0.05)

    async def drag_slider():
        v._last_frame_t = -math.inf  # do not skip the preview frame
        v.yaw.value = 40
        assert fake.sizes[-1] == (32, 24) and not v._frame_is_full
        assert "preview" in v.status.value
        await asyncio.sleep(0.2)

    asyncio.run(drag_slider())
    assert fake.sizes[-1] == (64, 48) and v._frame_is_full


def test_headless_display_has_widget_and_png():
    from IPython.core.formatters import format_display_data

    v = OrbitViewer(two_blobs(), width=40, height=30, render_fn=FakeRender())
    data, _ = format_display_data(v)
    assert "application/vnd.jupyter.widget-view+json" in data
    png = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
    assert png.size == (40, 30)
    assert np.array_equal(np.asarray(png.convert("RGB")), v.current_image())
    assert "OrbitViewer" in data["text/plain"]


def test_viewer_rejects_batched_gaussians():
    g = Gaussians.stack([two_blobs(), two_blobs()])
    with pytest.raises(ValueError, match="index it first"):
        OrbitViewer(g, render_fn=FakeRender())


def test_viewer_with_the_real_renderer():
    render_mod = pytest.importorskip("fastavatar_nb.render")
    if not hasattr(render_mod, "render"):
        pytest.skip("fastavatar_nb.render.render not available yet")
    v = OrbitViewer(two_blobs(), width=48, height=32, backend="torch")
    a = v.current_image()
    v.set_view(yaw=90)
    b = v.current_image()
    assert a.shape == (32, 48, 3) and (a < 250).any() and not np.array_equal(a, b)
    assert v.status.value.startswith("torch")


def test_scatter_gaussians_counts_and_colours():
    g = Gaussians.from_points(torch.randn(500, 3) * 0.1, torch.rand(500, 3), scale=0.01)
    fig = scatter_gaussians(g, max_points=200)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1 and len(fig.data[0].x) == 200
    full = scatter_gaussians(g)
    assert len(full.data[0].x) == 500
    np.testing.assert_allclose(np.asarray(full.data[0].x), g.means[:, 0].numpy(), rtol=1e-6)
    r, gg, b = (int(s) for s in full.data[0].marker.color[7][4:-1].split(","))
    np.testing.assert_allclose([r, gg, b], (g.dc_colors[7] * 255).numpy(), atol=1)
    g.opacity_logits[:100] = -10.0
    assert len(scatter_gaussians(g, min_opacity=0.1).data[0].x) == 400


def test_camera_frusta_traces_and_combination():
    cams = Cameras.orbit(5, 40, 30, radius=1.0)
    traces = camera_frusta_traces(cams, size=0.2, labels=list("abcde"))
    assert len(traces) == 2
    lines, centres = traces
    # per camera: 4 edges of 2 points, a 5-point rectangle, a 3-point triangle, each followed by a gap
    pts = [p for p in lines.x if p is not None]
    assert len(pts) == 5 * (4 * 2 + 5 + 3)
    np.testing.assert_allclose(np.stack([centres.x, centres.y, centres.z], -1), cams.centers.numpy(), atol=1e-5)
    assert list(centres.text) == list("abcde")
    # edge ends lie at distance sqrt(size^2 + lateral^2) >= size from the centre
    d = np.hypot(np.hypot(lines.x[1] - lines.x[0], lines.y[1] - lines.y[0]), lines.z[1] - lines.z[0])
    assert d >= 0.2
    g = Gaussians.from_points(torch.randn(50, 3) * 0.1, scale=0.01)
    fig = camera_frusta(cams, fig=scatter_gaussians(g))
    assert len(fig.data) == 3
    with pytest.raises(ValueError, match="labels"):
        camera_frusta(cams, labels=["a"])


def test_live_curves_record_and_figure():
    curves = LiveCurves("fit", mode="none")
    for step in range(5):
        curves.update(step, loss=1.0 / (step + 1), psnr=torch.tensor(10.0 + step))
    assert curves.history["loss"] == ([0, 1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert curves.last("psnr") == 14.0
    assert curves.finish() is None
    fig = curves.figure()
    assert len(fig.data) == 2 and list(fig.data[1].y) == [10.0, 11.0, 12.0, 13.0, 14.0]
    with pytest.raises(KeyError):
        curves.last("ssim")
    with pytest.raises(TypeError, match="loss"):
        curves.update(5, loss=torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        LiveCurves(mode="widget")


def test_image_grid_layout_and_colormap():
    imgs = [torch.ones(10, 20, 3), torch.zeros(10, 20, 3), torch.linspace(0, 1, 200).reshape(10, 20)]
    grid = image_grid(imgs, ["a", "b", "err"], cols=2, min_height=30, pad=2, font_size=10)
    assert isinstance(grid, Image.Image)
    # 3 images upscaled x3 (10 -> 30 rows), 2 columns, 2 rows with a 16-pixel title strip each
    assert grid.size == (2 * 60 + 3 * 2, 2 * (30 + 16) + 3 * 2)
    arr = np.asarray(grid)
    assert (arr[2 + 16 + 5, 2 + 60 + 2 + 5] == 0).all()  # second cell is black
    c = colorize(np.array([[0.0, 1.0]]))
    assert tuple(c[0, 0]) == (68, 1, 84) and tuple(c[0, 1]) == (253, 231, 37)
    with pytest.raises(ValueError, match="titles"):
        image_grid(imgs, ["a"])
    with pytest.raises(ValueError, match="image 0"):
        image_grid([torch.ones(3, 4, 5)])


def test_live_curves_update_one_output_in_place(monkeypatch):
    import IPython.display

    calls = []

    class Handle:
        def update(self, obj, raw=False):
            calls.append(("update", obj, raw))

    def fake_display(obj, raw=False, display_id=None):
        calls.append(("display", obj, raw))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", fake_display)
    curves = LiveCurves("fit", mode="display", min_interval_s=0.0)
    for step in range(3):
        curves.update(step, loss=1.0 / (step + 1))
    curves.finish()
    assert [c[0] for c in calls] == ["display", "update", "update", "update"]
    assert all(raw and "application/vnd.plotly.v1+json" in obj for _, obj, raw in calls)
    assert list(calls[-1][1]["application/vnd.plotly.v1+json"]["data"][0]["y"]) == [1.0, 0.5, 1 / 3]


def test_ellipsoids_surface_lies_at_nsigma():
    g = Gaussians.from_points(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), scale=0.1)
    g.log_scales[0] = torch.tensor([0.3, 0.1, 0.05]).log()
    g.quats[0] = torch.tensor([math.cos(0.4), 0.0, 0.0, math.sin(0.4)])
    fig = ellipsoids(g, nsigma=2.0, resolution=6)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Mesh3d)
    V = np.stack([fig.data[0].x, fig.data[0].y, fig.data[0].z], -1)
    assert len(V) == 2 * 7 * 12 and len(fig.data[0].i) == 2 * 6 * 12 * 2
    first = torch.from_numpy(V[: len(V) // 2]).float()
    # every vertex u of Gaussian 0 satisfies u^T Sigma^-1 u = nsigma^2
    m = torch.einsum("vi,ij,vj->v", first, torch.linalg.inv(g.covariances[0]), first)
    torch.testing.assert_close(m, torch.full_like(m, 4.0), rtol=1e-4, atol=1e-4)


def test_sh_sphere_colours_follow_the_view_direction():
    sh = torch.zeros(16, 3)
    fig = sh_sphere(sh, resolution=8)
    assert set(fig.data[0].vertexcolor) == {"rgb(128,128,128)"}  # DC 0 -> grey 0.5 everywhere
    sh[3] = torch.tensor([0.8, 0.0, -0.8])  # Y_11 = -0.489 x of the viewing direction
    trace = sh_sphere(sh, resolution=8).data[0]
    x = np.asarray(trace.x)
    rgb = np.array([[int(v) for v in c[4:-1].split(",")] for c in trace.vertexcolor])
    plus_x = rgb[np.argmax(x)]  # a camera at +x looks along -x: Y_11 = +0.489 -> more red, less blue
    assert plus_x[0] > 200 and plus_x[2] < 50


def test_splat_figure_draws_sigma_ellipses_boxes_and_tiles():
    img = torch.rand(20, 30, 3)
    mu = torch.tensor([[10.0, 8.0], [20.0, 12.0]])
    cov = torch.tensor([[[4.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 9.0]]])
    fig = splat_figure(img, mu, cov, nsigmas=(1, 3), radii=torch.tensor([[6, 5], [3, 9]]), tile_size=8,
                       tile_counts=torch.tensor([[1, 0, 2, 0], [0, 0, 0, 3], [0, 0, 0, 0]]), highlight_tiles=[(1, 1)])
    names = [t.name for t in fig.data[1:]]
    assert names == ["1 sigma", "3 sigma", "centre", "extent (radii)", "8px tiles", "Gaussians per tile"]
    one_sigma = np.stack([fig.data[1].x, fig.data[1].y], -1)
    first = torch.from_numpy(one_sigma[: np.argmax(np.isnan(one_sigma[:, 0]))]).float() - mu[0]
    m = torch.einsum("vi,ij,vj->v", first, torch.linalg.inv(cov[0]), first)
    torch.testing.assert_close(m, torch.ones_like(m), rtol=1e-4, atol=1e-4)
    assert list(fig.data[-1].text) == ["1", "2", "3"] and len(fig.layout.shapes) == 1
    with pytest.raises(ValueError, match="covars2d"):
        splat_figure(img, mu, cov[:1])


def test_setup_plotly_sets_the_renderer():
    import plotly.io as pio

    before = pio.renderers.default
    try:
        assert setup_plotly("cdn") == "plotly_mimetype+notebook_connected"
        with pytest.raises(ValueError, match="mode"):
            setup_plotly("svg")
    finally:
        pio.renderers.default = before


def test_images_orbit_and_the_report_load_without_plotly():
    """The image utilities, the orbit viewer and the run report need no plotly (nor ipywidgets): the CLI's report
    and the photo route import them in a plain Python process."""
    code = ("import sys, fastavatar_nb.images, fastavatar_nb.orbit, fastavatar_nb.report; "
            "print(sorted(m for m in ('plotly', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    from fastavatar_nb import images, orbit, plots, viewers

    for name in viewers.__all__:  # the notebooks' one import re-exports each concern module's names
        home = next((m for m in (images, plots, orbit) if name in m.__all__), None)
        assert name == "in_notebook_kernel" or getattr(viewers, name) is getattr(home, name), name
