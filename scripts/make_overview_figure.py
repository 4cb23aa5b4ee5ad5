"""Make ``docs/overview.png``, the README figure, from a run folder's artifacts.

Row 1: ground-truth images of four training subjects from NeRSemble camera 8 (the view held out
during fitting).
Row 2: their fitted 3DGS heads rendered by the pure-PyTorch rasterizer from that camera.
Row 3: the averaged template head from four of the 16 rig cameras.

    python scripts/make_overview_figure.py [--run-dir runs/smoke] [--out docs/overview.png]

Needs ``dataset/``, ``fits.safetensors`` and ``template.safetensors`` in the run folder: run
notebooks 00-02 first (``make run``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data import read_subject
from fastavatar_nb.fitting import FitResult
from fastavatar_nb.render import render
from fastavatar_nb.template import load_template
from fastavatar_nb.viewers import image_grid

VIEW = 8  # NeRSemble's validation camera, held out during fitting


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=root / "runs" / "smoke")
    ap.add_argument("--out", type=Path, default=root / "docs" / "overview.png")
    ap.add_argument("--scale", type=int, default=2, help="render at this multiple of the dataset resolution")
    args = ap.parse_args(argv)
    run = args.run_dir
    missing = [p for p in ("dataset", "fits.safetensors", "template.safetensors") if not (run / p).exists()]
    if missing:
        print(f"{run} lacks {missing}: run notebooks 00-02 first (make run)", file=sys.stderr)
        return 1
    fits = FitResult.load(run / "fits.safetensors")
    template = load_template(run)
    ids = fits.subject_ids[:4]
    gts, renders, titles = [], [], []
    for i, sid in enumerate(ids):
        subject = read_subject(run / "dataset" / sid)
        W, H = subject.width * args.scale, subject.height * args.scale
        gt = read_subject(run / "dataset" / sid).resize(W, H)  # for the figure only: upsampled ground truth
        cam = gt.cameras[VIEW]
        gts.append(gt.images[VIEW])
        renders.append(render(fits.gaussians[i], cam, backend="torch").colors[0])
        titles.append(sid)
    cams = Cameras.nersemble_rig(width=renders[0].shape[1])
    cams = Cameras.cat([cams[v] for v in (0, 4, 11, 15)])
    cams = cams.resize(renders[0].shape[1], renders[0].shape[0])
    tmpl = render(template, cams, backend="torch").colors
    with torch.no_grad():
        grid = image_grid(
            [*gts, *renders, *tmpl],
            titles=[*(f"{t} data" for t in titles), *(f"{s} fit" for s in ids),
                    *(f"template cam {v}" for v in (0, 4, 11, 15))],
            cols=4,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
