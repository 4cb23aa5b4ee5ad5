"""The browser viewer's frame rate and payload: how interactive is a head of K Gaussians in WebGL?

For each case a self-contained page (``fastavatar_nb.webviewer.write_html``) is opened from disk in
headless Chromium with the network blocked; once the head is drawn, the page's benchmark hook orbits
the camera by 0.2 degrees per animation frame for ``--seconds`` and counts the frames drawn (each frame
also sends the new camera to gsplat.js's depth-sort worker), at full resolution and at the half
resolution the viewer draws while the mouse drags. Frames per second are capped by the browser's
animation rate (60 Hz). Cases:

- ``K = 2,500``: a decoded head of the shipped course checkpoint (the smoke and course presets' K);
- ``K = 10,144``: NeRSemble's FLAME points (the paper's K): the sample subject's points coloured from
  its views (``MultiViewSubject.point_gaussians``) when ``../shared/data/nersemble_samples`` is
  there, else the synthetic generator's surface at that K;
- 4 linked panels of K = 2,500 (notebooks 06 and 07 show four heads side by side).

Payload: bytes per head as the widget sends it (44 per Gaussian) and the page's size.

Chromium without a GPU draws WebGL2 with SwiftShader (software, on the CPU): the GL renderer string is
recorded. A GPU browser is much faster; this is the floor a student's laptop without one would see.

Run: ``.venv/bin/python benchmarks/webviewer.py [--seconds 4] [--out FILE]`` (one heavy job at a time).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))

from _record import RESULTS, provenance, save  # noqa: E402
from labtools import CHROMIUM_ARGS, find_chromium  # noqa: E402

import fastavatar_nb as fa  # noqa: E402
from fastavatar_nb.webviewer import BYTES_PER_GAUSSIAN, write_html  # noqa: E402

NERSEMBLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nersemble_samples"
PAPER_K = 10_144


def paper_k_head() -> tuple[fa.Gaussians, str]:
    if NERSEMBLE.is_dir():
        from fastavatar_nb.data.nersemble import read_subject

        folder = sorted(p for p in NERSEMBLE.iterdir() if p.is_dir())[0]
        s = read_subject(folder, width=275, height=401)
        return s.point_gaussians(), f"NeRSemble {folder.name}: its {s.num_points:,} points coloured from its views"
    from fastavatar_nb.data.synthetic import sample_head_params, surface_points

    points = surface_points(sample_head_params(0), PAPER_K)
    return fa.Gaussians.from_points(points, opacity=0.95), f"synthetic surface, {PAPER_K:,} points"


def measure(page_path: Path, chromium: str, seconds: float) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()
            page.goto(page_path.as_uri())
            page.wait_for_function("Number(document.querySelector('.fa-splat-viewer')?.dataset.drawn || 0) >= 1",
                                   timeout=60_000)
            gl = page.evaluate("""(() => { const gl = document.createElement('canvas').getContext('webgl2');
                const info = gl.getExtension('WEBGL_debug_renderer_info');
                return info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER); })()""")
            bench = "document.querySelector('.fa-splat-viewer').fastavatarBenchmark"
            result = {scale: page.evaluate(f"{bench}({1000 * seconds}, {scale})") for scale in (1.0, 0.5)}
            version = browser.version
        finally:
            browser.close()
    return {"full": result[1.0], "preview": result[0.5], "gl_renderer": gl, "browser": f"Chromium {version}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="orbiting time per case")
    parser.add_argument("--out", type=Path, default=RESULTS / "local" / "webviewer.json")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found (install Debian's `chromium` or set FASTAVATAR_CHROMIUM)", file=sys.stderr)
        return 2
    course = fa.checkpoints.load("course")
    decoded = course.avatars.decode(course.avatars.codes[:4])
    big, big_source = paper_k_head()
    cases = [
        ("K = 2,500, one panel", [decoded[0]], "course checkpoint, decoded training subject"),
        (f"K = {big.num_gaussians:,}, one panel", [big], big_source),
        ("K = 2,500, 4 linked panels", [decoded[i] for i in range(4)], "course checkpoint, 4 decoded subjects"),
    ]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fastavatar-webviewer-bench-"))
    try:
        for name, heads, source in cases:
            page = write_html(tmp / "page.html", heads, title=name, width=192, height=256, pitch_deg=5.0, overwrite=True)
            m = measure(page, chromium, args.seconds)
            row = {"case": name, "source": source, "K": heads[0].num_gaussians, "panels": len(heads),
                   "panel_px": "192x256", "fps": round(m["full"]["fps"], 1), "frames": m["full"]["frames"],
                   "fps_while_dragging": round(m["preview"]["fps"], 1), "frames_while_dragging": m["preview"]["frames"],
                   "seconds": round(m["full"]["seconds"], 2),
                   "payload_bytes_per_head": heads[0].num_gaussians * BYTES_PER_GAUSSIAN,
                   "page_bytes": page.stat().st_size, "gl_renderer": m["gl_renderer"], "browser": m["browser"]}
            rows.append(row)
            print(f"{name:>28}: {row['fps']:5.1f} fps at full resolution ({row['frames']} frames in {row['seconds']} s), "
                  f"{row['fps_while_dragging']:5.1f} fps while dragging (half resolution), "
                  f"{row['payload_bytes_per_head'] / 1e3:.0f} kB per head, page {row['page_bytes'] / 1e3:.0f} kB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    record = {**provenance("webviewer", torch.device("cpu"), "not used (the browser draws)"),
              "cpu_cores": cpu, "note": "headless Chromium, no GPU: WebGL2 through SwiftShader on the CPU; "
              "frames per second are capped at the 60 Hz animation rate", "rows": rows}
    save(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
