"""Render benchmark: forward and forward+backward time of each available backend.

Scene: K Gaussians on a head-sized ellipsoid (0.16 x 0.22 x 0.19 m), scales from the
point spacing, flattened along the surface normal, random colours and small higher-order
SH; one frontal NeRSemble camera (camera 8) resized to each image size. Times are the
median of ``--repeats`` runs after one warm-up.

    python benchmarks/render.py                      # all sizes, all available backends
    python benchmarks/render.py --tile-sizes 4 8 16  # compare torch tile sizes

Writes a table to stdout and JSON to ``benchmarks/results/render_<device>.json``
(with the device, commit, command, torch version and thread count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _record import RESULTS, provenance, save

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.render import render
from fastavatar_nb.render.gsplat_backend import gsplat_status

SIZES = [(69, 100), (138, 200), (275, 401)]
KS = [2_500, 10_000]


def head_scene(K: int, seed: int = 0) -> Gaussians:
    """K Gaussians covering a head-sized ellipsoid surface (the scale of a fitted head)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(K, 3, generator=gen), dim=-1)
    g = Gaussians.from_points(d * torch.tensor([0.08, 0.11, 0.095]), colors=torch.rand(K, 3, generator=gen),
                              normals=d, opacity=0.8)
    g.sh[:, 1:] = torch.randn(K, 15, 3, generator=gen) * 0.05
    return g


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_backend(g: Gaussians, cams: Cameras, backend: str, repeats: int, tile_size: int | None) -> dict:
    dev = g.device
    kw = {} if tile_size is None else {"tile_size": tile_size}
    fwd, both = [], []
    for i in range(repeats + 1):
        p = g.clone().requires_grad_()
        sync(dev)
        t0 = time.perf_counter()
        out = render(p, cams, backend=backend, **kw)
        sync(dev)
        t1 = time.perf_counter()
        (out.colors.sum() + out.alphas.sum()).backward()
        sync(dev)
        t2 = time.perf_counter()
        if i:  # first run is warm-up
            fwd.append(t1 - t0)
            both.append(t2 - t0)
    return {"forward_s": statistics.median(fwd), "forward_backward_s": statistics.median(both)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tile-sizes", type=int, nargs="*", default=None,
                    help="torch-backend tile sizes to compare (default: the backend default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/render_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backends = ["torch"]
    ok, why = gsplat_status()
    if device.type == "cuda" and ok:
        backends.append("gsplat")
    rows = []
    for K in KS:
        g = head_scene(K).to(device)
        for W, H in SIZES:
            cams = Cameras.nersemble_rig()[8].resize(W, H).to(device)
            for backend in backends:
                for ts in (args.tile_sizes or [None]) if backend == "torch" else [None]:
                    r = time_backend(g, cams, backend, args.repeats, ts)
                    rows.append({"backend": backend, "K": K, "width": W, "height": H, "tile_size": ts, **r})
                    print(f"{backend:7s} tile={ts or 'default':>7} K={K:>6} {W:>3}x{H:<3} "
                          f"fwd {r['forward_s'] * 1e3:8.1f} ms   fwd+bwd {r['forward_backward_s'] * 1e3:8.1f} ms",
                          flush=True)
    record = {
        **provenance("render", device, why), "scene": head_scene.__doc__,
        "camera": "NeRSemble camera 8 (frontal), one view per call", "rows": rows,
    }
    save(record, args.out or RESULTS / f"render_{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
