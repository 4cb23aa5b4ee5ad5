"""Fitting throughput: subject-iterations per second of ``fit_subjects`` for several batch sizes.

One optimiser step renders one view of every subject in the batch and back-propagates, so
throughput = batch size x steps / time. The subjects are copies of one known Gaussian head
(K Gaussians on a head-sized ellipsoid rendered from the 16 NeRSemble cameras at the preset's
image size): the cost of a step does not depend on the picture. Timing starts at the end of
the first (warm-up) step and stops at the end of the last one, read through ``fit_subjects``'s
per-step callback, so initialisation and evaluation are not counted.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fit.py --preset smoke --steps 4
    .venv/bin/python benchmarks/fit.py --preset full --batch-sizes 1 8 32   # on a GPU

Prints a table and writes JSON to ``benchmarks/results/local/fit_<device>.json`` (device,
commit, command, preset, rows).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import torch
from _record import RESULTS, provenance, save

from fastavatar_nb import presets
from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data.subject import MultiViewSubject
from fastavatar_nb.fitting import FitConfig, fit_subjects
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.render import render
from fastavatar_nb.render.gsplat_backend import gsplat_status
from fastavatar_nb.render.numba_rasterizer import numba_status


def head_subject(K: int, width: int, height: int, device: torch.device, seed: int = 0) -> MultiViewSubject:
    """A subject whose ground truth is K known Gaussians on a head-sized ellipsoid."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(K, 3, generator=gen), dim=-1)
    pts = d * torch.tensor([0.08, 0.11, 0.095])
    truth = Gaussians.from_points(pts, colors=torch.rand(K, 3, generator=gen), normals=d, opacity=0.9).to(device)
    cams = Cameras.nersemble_rig(width, height).to(device)
    with torch.no_grad():
        out = render(truth, cams, background=1.0, backend="auto")
    noisy = (pts + 0.002 * torch.randn(pts.shape, generator=gen)).to(device)
    return MultiViewSubject("bench", out.colors.clamp(0, 1).contiguous(), out.alphas.clamp(0, 1).contiguous(),
                            cams, noisy)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="auto", help="sizes (K, image size) from this preset")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=5, help="optimiser steps timed per batch size (after 1 warm-up)")
    ap.add_argument("--tile-size", type=int, default=None, help="rasterizer tile size (default FitConfig's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/local/fit_<device>.json)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    preset = presets.get(args.preset)
    device = preset.torch_device
    backends = ["torch"]
    ok, why = gsplat_status()
    if device.type == "cuda" and ok:
        backends.append("gsplat")
    if device.type == "cpu" and numba_status()[0]:
        backends.append("numba")
    subject = head_subject(preset.num_gaussians, preset.image_width, preset.image_height, device)
    rows = []
    print(f"preset {preset.name}: K={preset.num_gaussians}, {preset.image_width}x{preset.image_height}, "
          f"device {device}, backends {backends}", flush=True)
    for backend in backends:
        for bs in args.batch_sizes:
            subjects = [subject._replace(subject_id=f"bench_{i:03d}") for i in range(bs)]
            cfg = FitConfig(iterations=args.steps + 1, batch_size=bs, evaluate=False,
                            **({} if args.tile_size is None else {"tile_size": args.tile_size}))
            stamps: list[float] = []

            def tick(info: dict, stamps: list[float] = stamps) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            fit_subjects(subjects, cfg, backend=backend, device=device, progress=False, callback=tick)
            seconds = stamps[-1] - stamps[0]
            its = bs * args.steps / seconds
            rows.append({"backend": backend, "batch_size": bs, "steps": args.steps, "seconds": seconds,
                         "subject_iterations_per_s": its, "ms_per_step": 1e3 * seconds / args.steps,
                         "tile_size": cfg.tile_size})
            print(f"{backend:7s} batch {bs:>3}  {its:8.2f} subject-it/s   {1e3 * seconds / args.steps:9.1f} ms/step",
                  flush=True)
    record = {
        **provenance("fit", device, why), "preset": preset.name, "num_gaussians": preset.num_gaussians,
        "image_size": [preset.image_width, preset.image_height], "rows": rows,
    }
    save(record, args.out or RESULTS / "local" / f"fit_{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
