"""Why the compiled CPU backend uses numba: its blend kernel against the same loop in C, side by side.

The forward blend kernel (``fastavatar_nb.render._numba_kernels.blend_forward``, front to back over each
tile's overlaps, each overlap reaching only the pixels of its ellipse) is written once more in C below,
line for line, compiled with ``gcc -O3 -march=native -fno-math-errno`` (what a C++/OpenMP torch extension
built on first use would get; ``-ffast-math`` is left out because it changes the results), and both run on
the same inputs: the packed overlaps of real renders (``benchmarks/render.py``'s head scene), one thread
each, median of ``--repeats``. The images must agree to float rounding.

    python benchmarks/numba_vs_c.py            # writes benchmarks/results/cpu-2core/numba_vs_c.json

Needs ``gcc`` on PATH (the comparison only; the package never compiles C).
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import numpy as np
import torch
from _record import RESULTS, provenance, save
from render import head_scene

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.render import numba_rasterizer as nr
from fastavatar_nb.render import render

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#define PW 16
static void span(double lo_f, double hi_f, int64_t x0, int64_t x1, double margin, int64_t *lo, int64_t *hi) {
    double first = ceil(lo_f - margin), last = floor(hi_f + margin) + 1.0;
    *lo = first < x0 ? x0 : (first > x1 ? x1 : (int64_t)first);
    *hi = last > x1 ? x1 : (last < x0 ? x0 : (int64_t)last);
}
void blend_forward(const int64_t *offsets, const float *tp, const float *centres, int64_t width, int64_t height,
                   int64_t ts, const float *consts, float *out, float *alpha_out, float *t_final, int64_t *last,
                   int64_t n_total, double margin) {
    float a_min = consts[0], a_max = consts[1], t_min = consts[2], m_half = consts[3];
    int64_t tiles_x = (width + ts - 1) / ts, n_tiles = tiles_x * ((height + ts - 1) / ts);
    float *T = malloc(sizeof(float) * ts * ts), *acc = malloc(sizeof(float) * ts * ts * 5);
    int64_t *stop = malloc(sizeof(int64_t) * ts * ts); char *done = malloc(ts * ts);
    for (int64_t tile = 0; tile < n_total; tile++) {
        int64_t start = offsets[tile], end = offsets[tile + 1];
        if (start == end) continue;
        int64_t i = tile / n_tiles, y0 = ((tile % n_tiles) / tiles_x) * ts, x0 = ((tile % n_tiles) % tiles_x) * ts;
        int64_t x1 = x0 + ts < width ? x0 + ts : width, y1 = y0 + ts < height ? y0 + ts : height, nx = x1 - x0;
        int64_t n_pixels = nx * (y1 - y0), n_done = 0;
        for (int64_t p = 0; p < n_pixels; p++) { T[p] = 1.0f; for (int f = 0; f < 5; f++) acc[p * 5 + f] = 0.0f;
                                                 stop[p] = end; done[p] = 0; }
        for (int64_t k = start; k < end; k++) {
            const float *r = tp + k * PW;
            float mx = r[0], my = r[1], ca = r[2], cb = r[3], cc = r[4], op = r[5], th = r[10];
            int64_t row_lo, row_hi;
            span((double)my - 0.5 - r[14], (double)my - 0.5 + r[14], y0, y1, margin, &row_lo, &row_hi);
            for (int64_t py = row_lo; py < row_hi; py++) {
                float cy = centres[py];
                double dy64 = (double)cy - (double)my, hw2 = (double)r[12] * dy64 * dy64 + (double)r[13];
                double hw = sqrt(hw2 > 0.0 ? hw2 : 0.0), mid = (double)mx - 0.5 + (double)r[11] * dy64;
                int64_t s_lo, s_hi;
                span(mid - hw, mid + hw, x0, x1, margin, &s_lo, &s_hi);
                int64_t row = (py - y0) * nx - x0;
                float dy = cy - my, sy = m_half * cc * dy * dy, by = cb * dy;
                for (int64_t px = s_lo; px < s_hi; px++) {
                    int64_t p = row + px;
                    if (done[p]) continue;
                    float dx = centres[px] - mx;
                    float ns = (m_half * ca * dx * dx) + sy - by * dx;
                    if (ns < th) continue;
                    float alpha = op * expf(ns);
                    if (alpha > a_max) alpha = a_max;
                    if (alpha < a_min) continue;
                    float t_next = T[p] * (1.0f - alpha);
                    if (t_next <= t_min) { stop[p] = k; done[p] = 1; n_done++; continue; }
                    float w = alpha * T[p];
                    acc[p * 5 + 0] += w * r[6]; acc[p * 5 + 1] += w * r[7]; acc[p * 5 + 2] += w * r[8];
                    acc[p * 5 + 3] += w * r[9]; acc[p * 5 + 4] += w;
                    T[p] = t_next;
                }
            }
            if (n_done == n_pixels) break;
        }
        for (int64_t py = y0; py < y1; py++) for (int64_t px = x0; px < x1; px++) {
            int64_t p = (py - y0) * nx + px - x0, o = (i * height + py) * width + px;
            for (int f = 0; f < 4; f++) out[o * 4 + f] = acc[p * 5 + f];
            alpha_out[o] = acc[p * 5 + 4]; t_final[o] = T[p]; last[o] = stop[p];
        }
    }
    free(T); free(acc); free(stop); free(done);
}
"""


def compile_c(folder: Path) -> ctypes.CDLL:
    src, lib = folder / "blend.c", folder / "blend.so"
    src.write_text(C_SOURCE)
    subprocess.run(["gcc", "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", str(src), "-o", str(lib),
                    "-lm"], check=True)
    return ctypes.CDLL(str(lib))


def captured_inputs(K: int, n_cams: int, W: int, H: int) -> tuple:
    """The arguments one render passes to the numba blend kernel (float32)."""
    from fastavatar_nb.render import _numba_kernels as kernels

    g, cams = head_scene(K), Cameras.nersemble_rig()[:n_cams].resize(W, H)
    nr.numba_status()
    seen = {}
    original = kernels.blend_forward
    kernels.blend_forward = lambda *a: (seen.setdefault("args", a), original(*a))[1]
    try:
        with torch.no_grad():
            render(g, cams, backend="numba")
    finally:
        kernels.blend_forward = original
    args = list(seen["args"])
    args[-3:] = [0, args[0].shape[0] - 1, 1]  # every tile, one thread
    return tuple(args)


def run_c(lib: ctypes.CDLL, args: tuple) -> tuple[np.ndarray, ...]:
    offsets, tp, centres, width, height, ts, consts, out, alpha, t_final, last = args[:11]
    outs = [np.zeros_like(a) for a in (out, alpha, t_final, last)]
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lib.blend_forward(p(offsets), p(tp), p(centres), ctypes.c_int64(width), ctypes.c_int64(height), ctypes.c_int64(ts),
                      p(consts), *(p(o) for o in outs), ctypes.c_int64(offsets.shape[0] - 1),
                      ctypes.c_double(nr._K.SPAN_MARGIN_PX))
    return tuple(outs)


def run_numba(args: tuple) -> tuple[np.ndarray, ...]:
    out, alpha, t_final, last = (np.zeros_like(a) for a in args[7:11])
    nr._K.blend_forward(*args[:7], out, alpha, t_final, last, *args[11:])
    return out, alpha, t_final, last


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu-2core" / "numba_vs_c.json")
    args = ap.parse_args(argv)
    if shutil.which("gcc") is None:
        raise SystemExit("numba_vs_c: needs gcc on PATH (apt-get install gcc)")
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = compile_c(Path(tmp))
        for K, n_cams, W, H in [(2_500, 16, 69, 100), (2_500, 16, 138, 200), (12_680, 1, 275, 401)]:
            inputs = captured_inputs(K, n_cams, W, H)
            c_out, nb_out = run_c(lib, inputs), run_numba(inputs)
            diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(c_out[:3], nb_out[:3], strict=True))
            c_ms = median_ms(lambda: run_c(lib, inputs), args.repeats)  # noqa: B023
            nb_ms = median_ms(lambda: run_numba(inputs), args.repeats)  # noqa: B023
            rows.append({"K": K, "images": n_cams, "width": W, "height": H, "overlaps": int(inputs[1].shape[0]),
                         "c_ms": round(c_ms, 2), "numba_ms": round(nb_ms, 2), "numba_over_c": round(nb_ms / c_ms, 3),
                         "max_abs_difference": diff})
            print(f"K={K:>6,} {W}x{H} x{n_cams:<2}: C {c_ms:7.2f} ms, numba {nb_ms:7.2f} ms "
                  f"(numba/C {nb_ms / c_ms:.2f}); images differ by at most {diff:.1e}", flush=True)
    record = {**provenance("numba_vs_c", torch.device("cpu"), "n/a"), "compiler": version,
              "flags": "-O3 -march=native -fno-math-errno", "threads": 1, "rows": rows}
    save(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
