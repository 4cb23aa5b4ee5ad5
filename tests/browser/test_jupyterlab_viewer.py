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

Requirements: Chromium (``/usr/bin/chromium`` from Debian's ``chromium`` package, or the path in
``FASTAVATAR_CHROMIUM``) and the ``playwright`` Python package (its own browser downloads are not
used). Without them the test is skipped, unless ``FASTAVATAR_REQUIRE_BROWSER=1`` (CI), which turns
the skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SUBJECT = REPO / "data_samples" / "synth_000"
NOTEBOOK_NAME = "viewer_check.ipynb"

SERVER_START_S = 45.0
"""Time JupyterLab gets to answer on its port."""
BROWSER_BUDGET_S = 70.0
"""Time the browser part gets: open the notebook, run it, drag, two screenshots. With the server
start (and at most 10 s to stop it) the whole check stays under two minutes."""

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
"""Flags for a container without a display or network: without the background-networking ones
Chromium keeps retrying connections that are refused."""

VIEWPORT = {"width": 1280, "height": 1200}
FRAME_W, FRAME_H = 192, 240
"""Size of the viewer's frames, in pixels."""

MIN_CHANGE = 8.0
"""Mean absolute difference (0-255 scale) the drag must cause between the two displayed images;
turning the head by tens of degrees gives several times this, re-encoding noise far less."""


# ----------------------------------------------------------------------------- environment
def _unavailable(reason: str) -> None:
    """Skip (or fail under ``FASTAVATAR_REQUIRE_BROWSER=1``) because a requirement is missing."""
    if os.environ.get("FASTAVATAR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser check required (FASTAVATAR_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


def find_chromium() -> str | None:
    """``$FASTAVATAR_CHROMIUM``, else the first of chromium, chromium-browser, google-chrome on PATH."""
    explicit = os.environ.get("FASTAVATAR_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def artifact_dirs() -> list[Path]:
    """Folders that receive the screenshots (created).

    ``$FASTAVATAR_ARTIFACTS_DIR/browser`` (default ``<repo>/runs/ci-artifacts/browser``, inside the
    gitignored ``runs/``), and also ``$FASTAVATAR_RUN_DIR/browser`` when that is set (``make test``
    sets it to a temporary run folder that is kept, and named, only when something fails).
    """
    root = Path(os.environ.get("FASTAVATAR_ARTIFACTS_DIR") or REPO / "runs" / "ci-artifacts")
    dirs = [root / "browser"]
    run_dir = os.environ.get("FASTAVATAR_RUN_DIR")
    if run_dir:
        dirs.append(Path(run_dir) / "browser")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    """Time left of the test's budget, in milliseconds for Playwright timeouts."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left_s(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"browser check exceeded its {BROWSER_BUDGET_S:.0f} s budget")
        return left

    def ms(self, cap_s: float | None = None) -> float:
        left = self.left_s()
        return 1000.0 * (left if cap_s is None else min(left, cap_s))


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
        "points = subject.points[::3]  # [K, 3], K = 834\n"
        "uv, _ = subject.cameras.project(points)  # [C, K, 2]\n"
        "outward = torch.nn.functional.normalize(points - points.mean(0), dim=-1)\n"
        "to_cam = torch.nn.functional.normalize(subject.cameras.centers[:, None] - points, dim=-1)  # [C, K, 3]\n"
        "cam = (to_cam * outward).sum(-1).argmax(0)  # the view facing each point most directly\n"
        "k = torch.arange(len(points))\n"
        "u = uv[cam, k, 0].long().clamp(0, subject.width - 1)\n"
        "v = uv[cam, k, 1].long().clamp(0, subject.height - 1)\n"
        "gaussians = fa.Gaussians.from_points(points, subject.images[cam, v, u], scale=0.007, opacity=0.95)\n"
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
@dataclass
class LabServer:
    url: str
    """``http://127.0.0.1:<port>``"""
    token: str
    log: Path
    """The server's (and its kernels') stdout and stderr."""


@pytest.fixture
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        where = os.environ.get("FASTAVATAR_CHROMIUM") or "chromium, chromium-browser, google-chrome on PATH"
        _unavailable(f"no Chromium found ({where}); install Debian's `chromium` or set FASTAVATAR_CHROMIUM")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the `playwright` Python package is not installed (pip install playwright)")
    if not SAMPLE_SUBJECT.is_dir():
        pytest.fail(f"the packaged sample subject {SAMPLE_SUBJECT} is missing")
    return path


@pytest.fixture
def lab_server(tmp_path: Path, chromium_path: str) -> Iterator[LabServer]:
    """``jupyter lab`` on 127.0.0.1 in a temporary root with the viewer notebook; stopped on teardown."""
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(viewer_notebook(SAMPLE_SUBJECT), root / NOTEBOOK_NAME)
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(os.environ)
    env.update({
        "FASTAVATAR_PRESET": "smoke",
        "PYTHONUNBUFFERED": "1",
        # user-level Jupyter state (kernelspecs, settings, workspaces) from the temporary folder only
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter" / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter" / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter" / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "jupyter" / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "jupyter" / "lab-workspaces"),
    })
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    _write_lab_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
    log = tmp_path / "jupyter-lab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        # no requests to the internet: no update check, no news feed
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=",
        "--LabApp.extension_manager=readonly",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", token, log)
    try:
        _wait_for_server(proc, server, timeout_s=SERVER_START_S)
        yield server
    finally:
        _stop(proc, server)


LAB_SETTINGS = {
    # start the notebook's kernel without the "Select Kernel" dialog
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
    # no "Would you like to get notified about official Jupyter news?" toast over the page
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}
"""User settings written for the test's JupyterLab (``JUPYTERLAB_SETTINGS_DIR``)."""


def _write_lab_settings(settings_dir: Path) -> None:
    for name, values in LAB_SETTINGS.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_for_server(proc: subprocess.Popen, server: LabServer, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    status_url = f"{server.url}/api/status?token={server.token}"
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode} before answering:\n{_tail(server.log)}")
        try:
            with urllib.request.urlopen(status_url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer on {server.url} within {timeout_s:.0f} s:\n{_tail(server.log)}")


def _stop(proc: subprocess.Popen, server: LabServer) -> None:
    """Shut the kernels down through the REST API (they run in sessions of their own), then SIGTERM
    the server's process group, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    api = f"{server.url}/api/kernels"
    headers = {"Authorization": f"token {server.token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=5) as r:
            kernels = json.load(r)
        for kernel in kernels:
            request = urllib.request.Request(f"{api}/{kernel['id']}", headers=headers, method="DELETE")
            urllib.request.urlopen(request, timeout=5).close()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass  # the server is not answering: the signals below still stop it
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------- page helpers
def _png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


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


def _save_screenshot(page, name: str, record_property) -> list[Path]:
    png = page.screenshot(full_page=False)
    paths = []
    for d in artifact_dirs():
        path = d / name
        path.write_bytes(png)
        paths.append(path)
        record_property("screenshot", f"{name}: {path}")
    print(f"browser check screenshot: {', '.join(map(str, paths))}")
    return paths


# ----------------------------------------------------------------------------- the test
def test_orbit_viewer_slider_changes_image_in_jupyterlab(lab_server: LabServer, chromium_path: str,
                                                          record_property) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    deadline = Deadline(BROWSER_BUDGET_S)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            _drive(page, lab_server, deadline, record_property)
        except (AssertionError, TimeoutError, PlaywrightError) as err:
            try:
                _save_screenshot(page, "failure.png", record_property)
            except PlaywrightError:
                pass  # the page itself is gone; the original error says why
            for d in artifact_dirs():
                shutil.copy(lab_server.log, d / "jupyter-lab.log")
            raise AssertionError(f"{err}\n--- jupyter lab log (tail) ---\n{_tail(lab_server.log)}") from err
        finally:
            browser.close()


def _drive(page, server: LabServer, deadline: Deadline, record_property) -> None:
    t0 = time.monotonic()
    page.goto(f"{server.url}/lab/tree/{NOTEBOOK_NAME}?token={server.token}", timeout=deadline.ms(60))
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=deadline.ms(60))
    # The status bar says "Python 3 (ipykernel) | Idle" once the kernel's websocket is connected and
    # the kernel answered; "Run All" before that is dropped ("No Kernel | Initializing").
    page.locator(".jp-StatusBar-Widget").get_by_text(re.compile(r"\(ipykernel\) \| Idle$")).wait_for(
        state="visible", timeout=deadline.ms(60))
    # Run > Run All Cells, as a reader would
    t_open = time.monotonic()
    page.get_by_role("menuitem", name="Run", exact=True).click(timeout=deadline.ms(20))
    page.locator(".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('Run All Cells'))").click(timeout=deadline.ms(10))

    # the widget's image, an error output, or the viewer's static PNG (shown when no widget manager runs)
    image = page.locator(".jp-OutputArea-output img.widget-image")
    # JupyterLab renders error outputs (tracebacks) with the stderr mime type
    error = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").filter(
        has_text=re.compile(r"Traceback|\w*Error\b"))
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
    before = _png_pixels(image.screenshot(timeout=deadline.ms(10)))
    assert before.std() > 10, f"the first frame looks empty (pixel std {before.std():.1f}); status {status0!r}"
    _save_screenshot(page, "01_viewer_initial.png", record_property)

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
    after = _png_pixels(image.screenshot(timeout=deadline.ms(10)))
    _save_screenshot(page, "02_viewer_after_yaw.png", record_property)
    assert before.shape == after.shape, f"frame size changed: {before.shape} -> {after.shape}"
    change = float(np.abs(after - before).mean())
    timing = (f"open notebook and connect kernel {t_open - t0:.1f} s, run all to first frame {t_run - t_open:.1f} s, "
              f"drag to settled frame {t_settled - t_drag:.1f} s; yaw {yaw0} -> {yaw1}, mean abs change {change:.1f}")
    record_property("timing", timing)
    print(f"browser check: {timing}")
    assert change > MIN_CHANGE, (
        f"yaw {yaw0} -> {yaw1} changed the shown image by only {change:.2f} (mean abs, 0-255); "
        f"status before {status0!r}, after {status1!r}")
