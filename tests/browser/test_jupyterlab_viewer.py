"""Browser check: the orbit viewer works in a real JupyterLab, driven by headless Chromium.

The test starts ``jupyter lab`` from this Python environment on 127.0.0.1 (random token, free
port, a temporary root folder holding one generated notebook), opens the notebook in Chromium
through Playwright, runs every cell from JupyterLab's *Run* menu, waits for the
:class:`fastavatar_nb.viewers.OrbitViewer` widget to show its rendered head, drags the *yaw*
slider and asserts that the image the browser shows changed. Two screenshots (before and after
the drag) go to the artifact folders (see :func:`artifact_dirs`); a failure adds one of the page
as it was, and the JupyterLab server log.

The notebook builds a small scene on the CPU: 834 Gaussians at the corresponded points of the
packaged sample subject ``data_samples/synth_000``, each coloured from the view that faces it.

Requirements: see :mod:`labtools` (Chromium and playwright; skipped without them, except on CI).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import numpy as np
import pytest
from labtools import (
    Deadline,
    LabServer,
    cell_error,
    drive_lab_page,
    lab_server,
    open_and_run_all,
    png_pixels,
    require_browser,
    save_screenshot,
)

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SUBJECT = REPO / "data_samples" / "synth_000"
NOTEBOOK_NAME = "viewer_check.ipynb"

BROWSER_BUDGET_S = 70.0
"""Time the browser part gets: open the notebook, run it, drag, two screenshots. With the server
start (and at most 10 s to stop it) the whole check stays under two minutes."""

FRAME_W, FRAME_H = 192, 240
"""Size of the viewer's frames, in pixels."""

MIN_CHANGE = 8.0
"""Mean absolute difference (0-255 scale) the drag must cause between the two displayed images;
turning the head by tens of degrees gives several times this, re-encoding noise far less."""


# ----------------------------------------------------------------------------- environment
# ----------------------------------------------------------------------------- the notebook
def viewer_notebook(subject_dir: Path) -> nbformat.NotebookNode:
    """A three-cell notebook: preset, a small coloured Gaussian head, the orbit viewer."""
    setup = (
        "import os\n"
        "\n"
        "import torch\n"
        "\n"
        "import fastavatar_nb as fa\n"
        "from fastavatar_nb.data import read_subject\n"
        "from fastavatar_nb.viewers import OrbitViewer\n"
        "\n"
        'preset = fa.presets.get(os.environ.get("FASTAVATAR_PRESET", "auto"))\n'
        "print(preset.name, preset.device, preset.backend)"
    )
    scene = (
        f"subject = read_subject({str(subject_dir)!r})\n"
        "subject = subject.thin_points(834)  # K = 834\n"
        "gaussians = subject.point_gaussians()  # each point coloured from the view that faces it\n"
        "gaussians = gaussians.to(preset.torch_device)\n"
        "gaussians.num_gaussians"
    )
    viewer = (
        f"viewer = OrbitViewer(gaussians, width={FRAME_W}, height={FRAME_H}, backend=preset.backend)\n"
        "viewer"
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (setup, scene, viewer)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


# ----------------------------------------------------------------------------- fixtures
# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def chromium_path() -> str:
    path = require_browser()
    if not SAMPLE_SUBJECT.is_dir():
        pytest.fail(f"the packaged sample subject {SAMPLE_SUBJECT} is missing")
    return path


@pytest.fixture
def lab(tmp_path: Path, chromium_path: str) -> Iterator[LabServer]:
    """JupyterLab with the viewer notebook."""
    with lab_server(tmp_path, {NOTEBOOK_NAME: viewer_notebook(SAMPLE_SUBJECT)}) as server:
        yield server


# ----------------------------------------------------------------------------- page helpers
def _viewer_state(image, label, readout) -> tuple[str, str, str]:
    """(image src, status label text, yaw readout text) as the page shows them now."""
    return image.get_attribute("src") or "", label.inner_text(), readout.inner_text()


def _wait_for_settled_frame(image, label, readout, deadline: Deadline, previous_src: str | None,
                            timeout_s: float = 30.0, stable_s: float = 1.0) -> tuple[str, str, str]:
    """Wait until the viewer shows a full-resolution frame (not a preview) that differs from
    ``previous_src`` (if given) and has not changed for ``stable_s`` seconds."""
    end = min(deadline.end, time.monotonic() + timeout_s)
    last, since = None, time.monotonic()
    while True:
        state = _viewer_state(image, label, readout)
        src, status, _ = state
        if state != last:
            last, since = state, time.monotonic()
        ready = src and "ms/frame" in status and "(preview)" not in status and src != previous_src
        if ready and time.monotonic() - since >= stable_s:
            loaded = image.evaluate("img => img.complete && img.naturalWidth > 0")
            if loaded:
                return state
        if time.monotonic() >= end:
            raise AssertionError(f"the viewer did not settle on a new frame within {timeout_s:.0f} s: "
                                 f"src={src[:60]!r} status={status!r}")
        time.sleep(0.1)


# ----------------------------------------------------------------------------- the test
def test_orbit_viewer_slider_changes_image_in_jupyterlab(lab: LabServer, chromium_path: str,
                                                          record_property) -> None:
    drive_lab_page(chromium_path, lab, _drive, "failure.png", record_property, BROWSER_BUDGET_S)


def _drive(page, server: LabServer, deadline: Deadline, record_property) -> None:
    t0 = time.monotonic()
    open_and_run_all(page, server, NOTEBOOK_NAME, deadline)
    t_open = time.monotonic()

    # the widget's image, an error output, or the viewer's static PNG (shown when no widget manager runs)
    image = page.locator(".jp-OutputArea-output img.widget-image")
    error = cell_error(page)
    static = page.locator(".jp-OutputArea-output[data-mime-type='image/png']")
    image.or_(error).or_(static).first.wait_for(state="visible", timeout=deadline.ms(90))
    if error.count():
        raise AssertionError(f"a notebook cell failed:\n{error.first.inner_text()}")
    if static.count() and not image.count():
        raise AssertionError("the viewer was shown as a static PNG: JupyterLab did not render the ipywidgets "
                             "view (is jupyterlab_widgets installed in this environment?)")
    viewer = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=page.locator("img.widget-image"))
    label = viewer.locator(".widget-label").filter(has_text="ms/frame")
    yaw = viewer.locator(".widget-slider").filter(has=page.locator("label:text-is('yaw')"))
    handle = yaw.locator(".noUi-handle")
    readout = yaw.locator(".widget-readout")
    yaw.scroll_into_view_if_needed(timeout=deadline.ms(10))

    src0, status0, yaw0 = _wait_for_settled_frame(image, label, readout, deadline, previous_src=None)
    t_run = time.monotonic()
    before = png_pixels(image.screenshot(timeout=deadline.ms(10)))
    assert before.std() > 10, f"the first frame looks empty (pixel std {before.std():.1f}); status {status0!r}"
    save_screenshot(page, "01_viewer_initial.png", record_property)

    # drag the yaw handle to the right
    box = handle.bounding_box(timeout=deadline.ms(10))
    assert box is not None, "the yaw slider handle has no box"
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 9):  # 24 px: about 70 degrees on the default slider
        page.mouse.move(x + 3 * i, y)
        time.sleep(0.05)
    page.mouse.up()
    t_drag = time.monotonic()

    src1, status1, yaw1 = _wait_for_settled_frame(image, label, readout, deadline, previous_src=src0)
    assert float(yaw1) != float(yaw0), f"the yaw readout did not move from {yaw0}"
    natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [FRAME_W, FRAME_H], f"the settled frame is {natural}, not the full {FRAME_W}x{FRAME_H}"
    t_settled = time.monotonic()
    after = png_pixels(image.screenshot(timeout=deadline.ms(10)))
    save_screenshot(page, "02_viewer_after_yaw.png", record_property)
    assert before.shape == after.shape, f"frame size changed: {before.shape} -> {after.shape}"
    change = float(np.abs(after - before).mean())
    timing = (f"open notebook and connect kernel {t_open - t0:.1f} s, run all to first frame {t_run - t_open:.1f} s, "
              f"drag to settled frame {t_settled - t_drag:.1f} s; yaw {yaw0} -> {yaw1}, mean abs change {change:.1f}")
    record_property("timing", timing)
    print(f"browser check: {timing}")
    assert change > MIN_CHANGE, (
        f"yaw {yaw0} -> {yaw1} changed the shown image by only {change:.2f} (mean abs, 0-255); "
        f"status before {status0!r}, after {status1!r}")
