"""Shared by the browser checks: finding Chromium, a JupyterLab server in a temporary root, artifacts.

Requirements: Chromium (``/usr/bin/chromium`` from Debian's ``chromium`` package, or the path in
``FASTAVATAR_CHROMIUM``) and the ``playwright`` Python package (its own browser downloads are not
used). Without them a check is skipped, unless ``FASTAVATAR_REQUIRE_BROWSER=1`` (CI), which turns
the skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

SERVER_START_S = 45.0
"""Time JupyterLab gets to answer on its port."""

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
    # WebGL2 without a GPU: Chromium's software renderer (SwiftShader), which it no longer picks by itself
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
]
"""Flags for a container without a display, GPU or network: without the background-networking ones
Chromium keeps retrying connections that are refused."""

VIEWPORT = {"width": 1280, "height": 1200}


# ----------------------------------------------------------------------------- environment
def unavailable(reason: str) -> None:
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
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left_s(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"browser check exceeded its {self.seconds:.0f} s budget")
        return left

    def ms(self, cap_s: float | None = None) -> float:
        left = self.left_s()
        return 1000.0 * (left if cap_s is None else min(left, cap_s))



@dataclass
class LabServer:
    url: str
    """``http://127.0.0.1:<port>``"""
    token: str
    log: Path
    """The server's (and its kernels') stdout and stderr."""



def require_browser() -> str:
    """The Chromium path, after checking playwright is importable (else skip, or fail on CI)."""
    path = find_chromium()
    if path is None:
        where = os.environ.get("FASTAVATAR_CHROMIUM") or "chromium, chromium-browser, google-chrome on PATH"
        unavailable(f"no Chromium found ({where}); install Debian's `chromium` or set FASTAVATAR_CHROMIUM")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the `playwright` Python package is not installed (pip install playwright)")
    return path



@contextmanager
def lab_server(tmp_path: Path, notebooks: dict[str, nbformat.NotebookNode]) -> Iterator[LabServer]:
    """``jupyter lab`` on 127.0.0.1 in a temporary root holding ``notebooks`` (name -> notebook);
    stopped (kernels first) on exit."""
    root = tmp_path / "root"
    root.mkdir()
    for name, nb in notebooks.items():
        nbformat.write(nb, root / name)
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
        stop_server(proc, server)


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
            pytest.fail(f"jupyter lab exited with {proc.returncode} before answering:\n{tail(server.log)}")
        try:
            with urllib.request.urlopen(status_url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer on {server.url} within {timeout_s:.0f} s:\n{tail(server.log)}")


def stop_server(proc: subprocess.Popen, server: LabServer) -> None:
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


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------- page helpers
def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)



def save_screenshot(page, name: str, record_property, element=None) -> list[Path]:
    """Screenshot the page (or only ``element``, a locator) into every artifact folder."""
    png = page.screenshot(full_page=False) if element is None else element.screenshot()
    paths = []
    for d in artifact_dirs():
        path = d / name
        path.write_bytes(png)
        paths.append(path)
        record_property("screenshot", f"{name}: {path}")
    print(f"browser check screenshot: {', '.join(map(str, paths))}")
    return paths




def open_and_run_all(page, server: LabServer, notebook: str, deadline: Deadline) -> None:
    """Open ``notebook`` in JupyterLab, wait for its kernel, then Run > Run All Cells as a reader would."""
    import re

    page.goto(f"{server.url}/lab/tree/{notebook}?token={server.token}", timeout=deadline.ms(60))
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=deadline.ms(60))
    # The status bar says "Python 3 (ipykernel) | Idle" once the kernel's websocket is connected and
    # the kernel answered; "Run All" before that is dropped ("No Kernel | Initializing").
    page.locator(".jp-StatusBar-Widget").get_by_text(re.compile(r"\(ipykernel\) \| Idle$")).wait_for(
        state="visible", timeout=deadline.ms(60))
    page.get_by_role("menuitem", name="Run", exact=True).click(timeout=deadline.ms(20))
    page.locator(".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('Run All Cells'))").click(timeout=deadline.ms(10))


def cell_error(page):
    """A locator for error outputs (tracebacks), which JupyterLab renders with the stderr mime type."""
    import re

    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").filter(
        has_text=re.compile(r"Traceback|\w*Error\b"))


def drive_lab_page(chromium_path: str, server: LabServer, drive, failure_name: str, record_property,
                   budget_s: float) -> None:
    """Open a Chromium page and call ``drive(page, server, deadline, record_property)``; on a failure, save
    a screenshot (``failure_name``) and the JupyterLab log to the artifact folders and add the log's tail
    to the error."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    deadline = Deadline(budget_s)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            drive(page, server, deadline, record_property)
        except (AssertionError, TimeoutError, PlaywrightError) as err:
            try:
                save_screenshot(page, failure_name, record_property)
            except PlaywrightError:
                pass  # the page itself is gone; the original error says why
            for d in artifact_dirs():
                shutil.copy(server.log, d / "jupyter-lab.log")
            raise AssertionError(f"{err}\n--- jupyter lab log (tail) ---\n{tail(server.log)}") from err
        finally:
            browser.close()


@contextmanager
def offline_page(chromium_path: str, url: str, deadline: Deadline) -> Iterator[tuple]:
    """A Chromium page at ``url`` with the network blocked: yields ``(page, errors, blocked)``, the page's
    uncaught errors and the URLs it asked for other than file:, data: and blob: (each aborted)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    blocked: list[str] = []

    def route(r) -> None:
        if r.request.url.split(":")[0] in ("file", "data", "blob"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport=VIEWPORT, offline=True)
            context.route("**/*", route)
            page = context.new_page()
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url, timeout=deadline.ms(30))
            yield page, errors, blocked
        finally:
            browser.close()
