"""Browser checks of the WebGL viewer (fastavatar_nb.webviewer) and the latent explorer, in headless Chromium.

1. a ``write_html`` page, opened from disk with the network blocked: the canvas shows the head,
   and it matches the kernel's own render of the same camera (SH degree 0, as the browser draws);
   a mouse drag turns it.
2. A notebook executed by ``fastavatar-nb run``'s executor and exported with ``nbconvert --to html``,
   opened offline: both linked panels of a ``HeadViewer`` show their head.
3. The latent explorer in a real JupyterLab: the widget loads, the ``t`` slider re-decodes the head
   in the kernel and the canvas changes, a drag on the canvas turns it. Screenshots of the explorer at
   t = 0 and t = 1 go to the artifact folders (``docs/latent_explorer_t*.png`` are copies).

Chromium draws WebGL2 with SwiftShader here (no GPU): the flags are in :data:`labtools.CHROMIUM_ARGS`.
The heads come from the shipped course checkpoint (``data_samples/course``, K = 2,500).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from labtools import (
    CHROMIUM_ARGS,
    Deadline,
    LabServer,
    cell_error,
    drive_lab_page,
    lab_server,
    offline_page,
    open_and_run_all,
    png_pixels,
    require_browser,
    save_screenshot,
)

pytestmark = pytest.mark.browser

W, H = 160, 224
"""Panel size in pixels."""

MATCH_MAD = 8.0
"""Largest mean absolute difference (0-255) between the browser's and the kernel's render of one view.
Measured: 2.5 (8-bit colours and opacities, and the two rasterizers' cut-offs differ slightly)."""

MIN_CHANGE = 6.0
"""Mean absolute difference a drag or a slider move must cause; a few times the noise-free zero."""

NOT_WHITE = 0.2
"""Fraction of a panel's pixels the head must cover (not white); the course heads cover about 0.45."""

EXPLORER_NOTEBOOK = "explorer_check.ipynb"


@pytest.fixture(scope="module")
def course():
    import fastavatar_nb as fa

    return fa.checkpoints.load("course")


@pytest.fixture
def chromium_path() -> str:
    return require_browser()


def _wait_drawn(frame, deadline: Deadline, at_least: int = 1, index: int = 0) -> None:
    """Until viewer ``index`` in ``frame`` has settled (drawn with a complete depth order) ``at_least`` times."""
    frame.wait_for_function(
        f"(() => {{ const v = document.querySelectorAll('.fa-splat-viewer')[{index}];"
        f" return v && Number(v.dataset.drawn || 0) >= {at_least}; }})()", timeout=deadline.ms(60))


def _drawn(frame, index: int = 0) -> int:
    return int(frame.evaluate(f"Number(document.querySelectorAll('.fa-splat-viewer')[{index}].dataset.drawn || 0)"))


def _canvas_pixels(canvas) -> np.ndarray:
    return png_pixels(canvas.screenshot())[:H, :W]


def _not_white(pixels: np.ndarray) -> float:
    return float((pixels.min(-1) < 245).mean())


def _drag(page, canvas, dx: float, dy: float = 0.0) -> None:
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 9):
        page.mouse.move(x + dx * i / 8, y + dy * i / 8)
        time.sleep(0.03)
    page.mouse.up()


# ----------------------------------------------------------------------------- 1. write_html, offline
def test_write_html_page_offline_matches_kernel_render_and_turns(course, chromium_path: str, tmp_path: Path,
                                                              record_property) -> None:
    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render
    from fastavatar_nb.webviewer import viewer_state, write_html

    head = course.avatars.decode(course.avatars.codes[0])
    view = dict(width=W, height=H, yaw_deg=30.0, pitch_deg=10.0)
    path = write_html(tmp_path / "viewer.html", head, title="write_html check", **view)
    state = viewer_state(head, **view)
    cam = Cameras.from_spherical(torch.tensor([np.radians(30.0)]), torch.tensor([np.radians(10.0)]), state["distance"],
                                 W, H, state["fov_y_deg"], tuple(state["target"]))
    with torch.no_grad():
        kernel = render(head, cam, background=1.0, sh_degree=0).colors[0].clamp(0, 1).numpy() * 255

    deadline = Deadline(60)
    with offline_page(chromium_path, path.as_uri(), deadline) as (page, errors, blocked):
        _wait_drawn(page, deadline)
        canvas = page.locator(".fa-splat-canvas").first
        before = _canvas_pixels(canvas)
        save_screenshot(page, "webviewer_to_html.png", record_property)
        status = page.locator(".fa-splat-status").inner_text()
        # mouse down: the panel draws at half resolution (a preview) until the mouse is released
        box = canvas.bounding_box()
        n = _drawn(page)
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        _wait_drawn(page, deadline, at_least=n + 1)
        buffer = canvas.evaluate("c => [c.width, c.height]")
        preview = _canvas_pixels(canvas)
        page.mouse.up()
        n = _drawn(page)
        _drag(page, canvas, dx=60)
        _wait_drawn(page, deadline, at_least=n + 1)
        after = _canvas_pixels(canvas)
    assert not errors, f"the page raised: {errors}"
    assert not blocked, f"the page asked the network for {blocked}"
    assert "K = 2500" in status and "SH degree 0" in status, status
    mad = float(np.abs(before - kernel).mean())
    record_property("timing", f"to_html page: browser vs kernel render mean abs difference {mad:.2f} (0-255), "
                              f"preview vs full frame {float(np.abs(preview - before).mean()):.2f}")
    assert _not_white(before) > NOT_WHITE, f"the page's canvas shows no head ({_not_white(before):.2f} not white)"
    assert mad < MATCH_MAD, f"the browser's view differs from the kernel's render of the same camera by {mad:.1f}"
    assert buffer == [W // 2, H // 2], f"the preview drew at {buffer}, not half of {W}x{H}"
    preview_mad = float(np.abs(preview - before).mean())
    assert preview_mad < 2 * MATCH_MAD, f"the half-resolution preview differs from the full frame by {preview_mad:.1f}"
    change = float(np.abs(after - before).mean())
    assert change > MIN_CHANGE, f"a 60 px drag changed the canvas by only {change:.2f}"


# ----------------------------------------------------------------------------- 2. nbconvert export, offline
def _export_notebook(tmp_path: Path) -> Path:
    import os

    from nbconvert import HTMLExporter

    from fastavatar_nb.cli import execute_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import fastavatar_nb as fa\n"
        "from fastavatar_nb.webviewer import HeadViewer\n"
        "ck = fa.checkpoints.load('course')\n"
        f"HeadViewer({{'template': ck.template, 'decoded': ck.avatars.decode(ck.avatars.codes[1])}}, width={W}, height={H})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source, executed = tmp_path / "export_check.ipynb", tmp_path / "executed.ipynb"
    nbformat.write(nb, source)
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTAVATAR_HEADLESS="1")
    result = execute_notebook(source, executed, env, timeout=120)
    assert result.status == "ok", result.error
    body, _ = HTMLExporter().from_filename(str(executed))
    html_path = tmp_path / "export_check.html"
    html_path.write_text(body, encoding="utf-8")
    return html_path


def test_nbconvert_export_shows_linked_heads_offline(chromium_path: str, tmp_path: Path, record_property) -> None:
    html_path = _export_notebook(tmp_path)
    deadline = Deadline(60)
    with offline_page(chromium_path, html_path.as_uri(), deadline) as (page, errors, _):
        page.locator("iframe").first.wait_for(timeout=deadline.ms(20))
        canvases = page.frame_locator("iframe").first.locator(".fa-splat-canvas")
        canvases.nth(1).wait_for(timeout=deadline.ms(30))
        _wait_drawn(next(f for f in page.frames if f != page.main_frame), deadline)
        pixels = [_canvas_pixels(canvases.nth(i)) for i in range(2)]
        save_screenshot(page, "webviewer_nbconvert.png", record_property)
    # the page may try the widget manager's CDN script (blocked here); what matters is what it shows
    assert not errors, f"the exported page raised: {errors}"
    for name, p in zip(("template", "decoded"), pixels, strict=True):
        assert _not_white(p) > NOT_WHITE, f"the exported page's {name} panel shows no head"
    assert float(np.abs(pixels[0] - pixels[1]).mean()) > MIN_CHANGE, "the two panels show the same head"


# ----------------------------------------------------------------------------- 3. latent explorer in JupyterLab
def explorer_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "import fastavatar_nb as fa\n"
        "from fastavatar_nb.explorer import LatentExplorer\n"
        "ck = fa.checkpoints.load('course')\n"
        "a = ck.avatars",
        # the two training subjects whose codes are farthest apart: t visibly changes the head
        "import torch\n"
        "i, j = divmod(int(torch.cdist(a.codes, a.codes).argmax()), len(a.codes))\n"
        f"explorer = LatentExplorer(a.decode, a.codes[i], a.codes[j], ck.directions, names=(a.subject_ids[i], "
        f"a.subject_ids[j]), reference={{'template': ck.template}}, width={W}, height={H}, pitch_deg=5.0)\n"
        "explorer",
    )]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture
def lab(tmp_path: Path, chromium_path: str) -> Iterator[LabServer]:
    with lab_server(tmp_path, {EXPLORER_NOTEBOOK: explorer_notebook()}) as server:
        yield server


def test_latent_explorer_in_jupyterlab(lab: LabServer, chromium_path: str, record_property) -> None:
    drive_lab_page(chromium_path, lab, _drive_explorer, "explorer_failure.png", record_property, budget_s=100)


def _drive_explorer(page, server: LabServer, deadline: Deadline, record_property) -> None:
    t0 = time.monotonic()
    open_and_run_all(page, server, EXPLORER_NOTEBOOK, deadline)
    viewer = page.locator(".fa-splat-viewer")
    error = cell_error(page)
    viewer.or_(error).first.wait_for(state="visible", timeout=deadline.ms(90))
    if error.count():
        raise AssertionError(f"a notebook cell failed:\n{error.first.inner_text()}")
    _wait_drawn(page, deadline)
    t_shown = time.monotonic()
    canvas = page.locator(".fa-splat-canvas").first
    canvas.scroll_into_view_if_needed(timeout=deadline.ms(10))
    start = _canvas_pixels(canvas)
    assert _not_white(start) > NOT_WHITE, "the explorer's head is not drawn"
    explorer = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=viewer).first  # the outermost
    save_screenshot(page, "latent_explorer_t0.png", record_property, element=explorer)

    # t: drag the slider's handle to the far right (t = 1): the kernel decodes the other subject
    t_slider = explorer.locator(".widget-slider").filter(has=page.locator("label:text-is('t')"))
    handle, readout = t_slider.locator(".noUi-handle"), t_slider.locator(".widget-readout")
    n = _drawn(page)
    box = handle.bounding_box(timeout=deadline.ms(10))
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x + 40 * i, y)
        time.sleep(0.05)
    page.mouse.up()
    page.wait_for_function("(el) => el.textContent.trim() === '1.00'", arg=readout.element_handle(),
                           timeout=deadline.ms(20))
    page.get_by_text("t = 1.00").first.wait_for(timeout=deadline.ms(30))  # the panel's title: decoded anew
    _wait_drawn(page, deadline, at_least=n + 1)
    t_slid = time.monotonic()
    at_one = _canvas_pixels(canvas)
    save_screenshot(page, "latent_explorer_t1.png", record_property, element=explorer)
    slider_change = float(np.abs(at_one - start).mean())
    assert slider_change > MIN_CHANGE, f"t 0 -> 1 changed the canvas by only {slider_change:.2f}"

    # a drag on the canvas orbits both panels in the browser
    n = _drawn(page)
    _drag(page, canvas, dx=70)
    _wait_drawn(page, deadline, at_least=n + 1)
    turned = _canvas_pixels(canvas)
    drag_change = float(np.abs(turned - at_one).mean())
    status = page.locator(".fa-splat-status").first.inner_text()
    timing = (f"explorer: open and run to drawn head {t_shown - t0:.1f} s, t slider to redrawn head "
              f"{t_slid - t_shown:.1f} s; change by t {slider_change:.1f}, by a drag {drag_change:.1f}; {status}")
    record_property("timing", timing)
    assert drag_change > MIN_CHANGE, f"a 70 px drag changed the canvas by only {drag_change:.2f}"
    assert "yaw 0°" not in status, f"the status line did not follow the drag: {status}"


# ----------------------------------------------------------------------------- 4. no WebGL2
def test_page_without_webgl_says_so(course, chromium_path: str, tmp_path: Path) -> None:
    """A browser without WebGL (here Chromium with its 3D APIs switched off) gets a sentence, not a blank
    canvas; in a notebook the kernel then swaps in the OrbitViewer (tests/test_webviewer.py)."""
    from playwright.sync_api import sync_playwright

    from fastavatar_nb.webviewer import write_html

    path = write_html(tmp_path / "head.html", course.template)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=[*CHROMIUM_ARGS, "--disable-3d-apis"],
                                     headless=True)
        try:
            page = browser.new_page()
            page.goto(path.as_uri(), timeout=30_000)
            page.get_by_text("WebGL2 is not available in this browser").wait_for(timeout=30_000)
            canvases = page.locator("canvas").count()
        finally:
            browser.close()
    assert canvases == 0
