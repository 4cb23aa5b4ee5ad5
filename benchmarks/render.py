"""Render benchmark: the backends side by side, forward and forward+backward, in one run.

Scenes (each rendered by every backend available on the device, runs interleaved, median of
``--repeats`` after one warm-up):

- ``benchmark``: K Gaussians on a head-sized ellipsoid (0.16 x 0.22 x 0.19 m), scales from the point
  spacing, flattened along the surface normal, random colours and small higher-order SH; one frontal
  NeRSemble camera (8) resized to each image size. K = 2,500 (the smoke and course presets) and
  K = 12,680 (the full preset: FLAME's 10,144 + the bust) at 275x401.
- ``course``: the shipped course checkpoint's decoder (``data_samples/course``), four training subjects'
  heads (K = 2,500 with the bust) from four rig cameras each: 16 images, one decoder step's renders.

Beside each row: the ratio of the torch backend's time to each backend's, and an arithmetic floor:
the (Gaussian, pixel) pairs inside the ellipses where a Gaussian reaches alpha 1/255 (what any exact
rasterizer must evaluate), at ``FLOOR_NS_PER_PAIR`` per pair per pass spread over the threads (one pass
forward, two for forward+backward's extra work).

    python benchmarks/render.py                       # everything, writes benchmarks/results/cpu-2core/render_cpu.json
    python benchmarks/render.py --scenes benchmark --sizes 69x100 --repeats 3 --out /tmp/r.json
    python benchmarks/render.py --tile-sizes 8 16 32  # the numba backend's tile sweep

Writes a table to stdout and JSON (device, commit, command, torch version, thread count, every row).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import torch
from _record import RESULTS, provenance, save

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.render import flat_inputs, render
from fastavatar_nb.render.gsplat_backend import gsplat_status
from fastavatar_nb.render.numba_rasterizer import numba_status
from fastavatar_nb.render.torch_rasterizer import ALPHA_MIN, project

SIZES = [(69, 100), (138, 200), (275, 401)]
BENCH_K = 2_500
FULL_K = 12_680
"""The full preset's K (FLAME's 10,144 + 2,536 bust points)."""
COURSE_SUBJECTS, COURSE_VIEWS = 4, (0, 5, 8, 13)
FLOOR_NS_PER_PAIR = 1.0
"""Nanoseconds of one core per (Gaussian, pixel) pair and pass: about 20 floating-point operations and
an exponential, at a few per nanosecond. A rough floor, not a promise."""
DEFAULT_OUT = RESULTS / "cpu-2core" / "render_cpu.json"


def head_scene(K: int, seed: int = 0) -> Gaussians:
    """K Gaussians covering a head-sized ellipsoid surface (the scale of a fitted head)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(K, 3, generator=gen), dim=-1)
    g = Gaussians.from_points(d * torch.tensor([0.08, 0.11, 0.095]), colors=torch.rand(K, 3, generator=gen),
                              normals=d, opacity=0.8)
    g.sh[:, 1:] = torch.randn(K, 15, 3, generator=gen) * 0.05
    return g


def course_heads() -> Gaussians:
    """``[4, 2500]`` heads decoded by the shipped course checkpoint from its first four training codes."""
    from fastavatar_nb import checkpoints

    ckpt = checkpoints.load("course")
    return ckpt.avatars.decode(ckpt.avatars.codes[:COURSE_SUBJECTS])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def pixel_pairs(g: Gaussians, cams: Cameras) -> int:
    """(Gaussian, pixel) pairs inside each projected Gaussian's alpha >= 1/255 ellipse, summed over the images
    (the ellipse ``x^T X x <= 2 log(o / alpha_min)`` has area ``2 pi log(o / alpha_min) / sqrt(det X)``)."""
    means, quats, scales, opacities, _, viewmats, Ks = flat_inputs(
        g, cams, torch.broadcast_shapes(g.batch_shape, cams.viewmats.shape[:-3]))
    _, conics, _, op, radii = project(means, quats, scales, opacities, viewmats, Ks, cams.width, cams.height)
    det = (conics[..., 0] * conics[..., 2] - conics[..., 1] ** 2).clamp_min(1e-12)
    area = 2 * math.pi * torch.log((op / ALPHA_MIN).clamp_min(1.0)) / det.sqrt()
    return int(area[radii[..., 0] > 0].sum())


def time_backend(g: Gaussians, cams: Cameras, backend: str, tile_size: int | None) -> tuple[float, float]:
    """One forward and one forward+backward, in seconds."""
    dev = g.device
    p = g.clone().requires_grad_()
    sync(dev)
    t0 = time.perf_counter()
    out = render(p, cams, backend=backend, tile_size=tile_size)
    sync(dev)
    t1 = time.perf_counter()
    (out.colors.sum() + out.alphas.sum()).backward()
    sync(dev)
    return t1 - t0, time.perf_counter() - t0


def measure(g: Gaussians, cams: Cameras, configs: list[tuple[str, int | None]], repeats: int) -> dict:
    """Median times of every (backend, tile size), their runs interleaved so that drift hits all alike."""
    times: dict[tuple[str, int | None], list[tuple[float, float]]] = {c: [] for c in configs}
    for i in range(repeats + 1):
        for c in configs:
            t = time_backend(g, cams, *c)
            if i:  # the first round is a warm-up
                times[c].append(t)
    return {c: (statistics.median(f for f, _ in v), statistics.median(b for _, b in v)) for c, v in times.items()}


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 69x100")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scenes", nargs="+", choices=("benchmark", "course"), default=["benchmark", "course"])
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=SIZES, help="WIDTHxHEIGHT (default: all three)")
    ap.add_argument("--tile-sizes", type=int, nargs="*", default=None,
                    help="numba-backend tile sizes to compare (default: the backend's default)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(RESULTS.parent.parent)} "
                                                           "on a CPU, benchmarks/results/render_<device>.json otherwise)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    configs: list[tuple[str, int | None]] = [("torch", None)]
    ok_gsplat, why_gsplat = gsplat_status()
    ok_numba, why_numba = numba_status()
    if device.type == "cuda" and ok_gsplat:
        configs.append(("gsplat", None))
    if device.type == "cpu" and ok_numba:
        configs += [("numba", ts) for ts in (args.tile_sizes or [None])]
    scenes = []
    for name in args.scenes:
        for W, H in args.sizes:
            if name == "benchmark":
                cams = Cameras.nersemble_rig()[8].resize(W, H)
                Ks = [BENCH_K] + ([FULL_K] if (W, H) == (275, 401) else [])
                scenes += [(name, head_scene(K), cams) for K in Ks]
            else:
                scenes.append((name, course_heads(), Cameras.nersemble_rig()[list(COURSE_VIEWS)].resize(W, H)))
    rows = []
    print(f"{threads} thread(s); floor: {FLOOR_NS_PER_PAIR} ns per (Gaussian, pixel) pair and pass over the threads")
    for name, g, cams in scenes:
        g, cams = g.to(device), cams.to(device)
        n_images = int(torch.Size(torch.broadcast_shapes(g.batch_shape, cams.viewmats.shape[:-3])).numel()) * len(cams)
        pairs = pixel_pairs(g, cams)
        floor_fwd = pairs * FLOOR_NS_PER_PAIR * 1e-6 / threads
        res = measure(g, cams, configs, args.repeats)
        ref_f, ref_b = res[("torch", None)]
        for (backend, ts), (f, b) in res.items():
            row = {"scene": name, "K": g.num_gaussians, "width": cams.width, "height": cams.height, "images": n_images,
                   "backend": backend, "tile_size": ts, "forward_ms": round(f * 1e3, 2),
                   "forward_backward_ms": round(b * 1e3, 2), "speedup_forward": round(ref_f / f, 2),
                   "speedup_forward_backward": round(ref_b / b, 2), "pixel_pairs": pairs,
                   "floor_forward_ms": round(floor_fwd, 3), "floor_forward_backward_ms": round(3 * floor_fwd, 3)}
            rows.append(row)
            print(f"{name:9s} K={g.num_gaussians:>6,} {cams.width:>3}x{cams.height:<3} x{n_images:<2} "
                  f"{backend:6s} tile={ts or 'default':>7}  fwd {f * 1e3:8.1f} ms ({ref_f / f:5.1f}x)   "
                  f"fwd+bwd {b * 1e3:8.1f} ms ({ref_b / b:5.1f}x)   floor {floor_fwd:6.2f} / {3 * floor_fwd:6.2f} ms",
                  flush=True)
    record = {
        **provenance("render", device, why_gsplat), "numba": why_numba, "threads": threads,
        "floor_ns_per_pair": FLOOR_NS_PER_PAIR, "scenes": {"benchmark": head_scene.__doc__, "course": course_heads.__doc__},
        "benchmark_camera": "NeRSemble camera 8 (frontal), one view per call",
        "course_cameras": f"NeRSemble cameras {list(COURSE_VIEWS)} for each of {COURSE_SUBJECTS} subjects", "rows": rows,
    }
    out = args.out or (DEFAULT_OUT if device.type == "cpu" else RESULTS / f"render_{device.type}.json")
    save(record, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
