"""Fit quality on real NeRSemble subjects: whole-image PSNR/SSIM on the training views and on camera 8.

Fits each given NeRSemble/VHAP subject folder as notebook 02 fits the synthetic subjects
(``preset.fit``, batch 1) on ``K`` = the preset's corresponded points: its FLAME points
thinned to the head share plus bust points fitted to its masks
(:func:`fastavatar_nb.data.bust.with_bust`), so the model covers the whole foreground. Reports
the metrics of :class:`~fastavatar_nb.fitting.FitResult`: whole image on white first, then the
held-out camera's head region, and writes a picture (truth | render | error) of the held-out camera.

    .venv/bin/python benchmarks/fit_nersemble.py --preset smoke
    .venv/bin/python benchmarks/fit_nersemble.py --preset full                  # on a GPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_nersemble.py --preset full --allow-cpu --width 275  # ~40 min

Subjects default to every folder in ``$FASTAVATAR_NERSEMBLE_ROOT`` or
``../shared/data/nersemble_samples``. The fit is checkpointed under
``<run dir>/<preset>/<subject>-<config hash>/`` (``--run-dir``, default ``runs/bench/fit_nersemble``
of the checkout, which git ignores) so an interrupted run resumes. Writes the JSON to ``--out``
(default ``<run dir>/fit_nersemble_<preset>_<device>.json``) and the pictures beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from _record import provenance, save
from PIL import Image

from fastavatar_nb import presets
from fastavatar_nb.data import read_subject
from fastavatar_nb.data.bust import num_bust_points, with_bust
from fastavatar_nb.fitting import fit_subjects
from fastavatar_nb.objective import HOLDOUT_VIEW
from fastavatar_nb.render import render
from fastavatar_nb.render.gsplat_backend import gsplat_status


def default_root() -> Path:
    env = os.environ.get("FASTAVATAR_NERSEMBLE_ROOT")
    return Path(env) if env else presets.project_root().parent / "shared" / "data" / "nersemble_samples"


def picture(truth: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    """``truth | render | |error| x 4`` side by side (``[H, W, 3]`` each, in [0, 1]) as a PNG."""
    err = ((pred - truth).abs().mean(-1, keepdim=True) * 4).clamp(0, 1).expand_as(truth)
    row = torch.cat([truth, pred, err], 1).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((row * 255).round().astype(np.uint8)).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("subjects", nargs="*", type=Path, help="subject folders (default: every one in the samples root)")
    ap.add_argument("--preset", default="auto", help="image size, K and fit iterations from this preset")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full preset without CUDA (slow)")
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's fit iterations")
    ap.add_argument("--width", type=int, default=None,
                    help="image width (the height keeps the 550:802 aspect); default: the preset's")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="checkpoints, results and pictures (default: runs/bench/fit_nersemble of the checkout)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: in the run folder)")
    args = ap.parse_args(argv)
    preset = presets.get(args.preset, allow_cpu=args.allow_cpu or None)
    root = default_root()
    folders = args.subjects or (sorted(p for p in root.iterdir() if (p / "transforms.json").is_file())
                                if root.is_dir() else [])
    if not folders:
        ap.error(f"no NeRSemble subject folders given and none found in {default_root()}")
    if args.width is not None and args.width < 8:
        ap.error(f"--width must be at least 8 pixels, got {args.width}")
    run_dir = (args.run_dir or presets.project_root() / "runs" / "bench" / "fit_nersemble").resolve()
    device = preset.torch_device
    overrides = {"batch_size": 1} | ({} if args.iterations is None else {"iterations": args.iterations})
    config = preset.fit.replace(**overrides)
    K = preset.num_gaussians
    width, height = (args.width, None) if args.width is not None else (preset.image_width, preset.image_height)
    out = args.out or run_dir / f"fit_nersemble_{preset.name}_{device.type}.json"
    rows = []
    for folder in folders:
        subject = with_bust(read_subject(folder, width=width, height=height), K)
        print(f"{subject.subject_id}: K = {K} ({K - num_bust_points(K)} FLAME + {num_bust_points(K)} bust), "
              f"{subject.width}x{subject.height}, {config.iterations} steps, backend {preset.backend} on {device}",
              flush=True)
        tag = hashlib.sha256((config.to_json() + f"{subject.width}x{subject.height}").encode()).hexdigest()[:8]
        ckpt = run_dir / preset.name / f"{subject.subject_id}-{tag}"
        fit = fit_subjects([subject], config, backend=preset.backend, device=device, checkpoint=ckpt)
        row = {**fit.table()[0], "num_gaussians": K, "num_bust_points": num_bust_points(K),
               "image_size": [subject.width, subject.height], "iterations": config.iterations, "seconds": fit.seconds}
        with torch.no_grad():
            pred = render(fit.gaussians[0], subject.cameras[[HOLDOUT_VIEW]].to(device), background=1.0,
                          backend=preset.backend).colors[0].clamp(0, 1).cpu()
        png = picture(subject.images[HOLDOUT_VIEW], pred, out.with_name(f"{out.stem}_{subject.subject_id}_cam{HOLDOUT_VIEW}.png"))
        row["picture"] = png.name
        rows.append(row)
        print(f"  whole image: train {row['train_psnr']:.2f} dB, camera {HOLDOUT_VIEW} {row['heldout_psnr']:.2f} dB "
              f"(SSIM {row['heldout_ssim']:.3f}); camera {HOLDOUT_VIEW} head region {row['heldout_psnr_head']:.2f} dB; "
              f"drift {row['drift_mean_mm']:.2f} mm; {fit.seconds:.0f} s; picture {png}", flush=True)
    _, why = gsplat_status()
    record = {**provenance("fit_nersemble", device, why), "preset": preset.name, "backend": preset.backend,
              "config": dataclasses.asdict(config), "learning_rates": config.learning_rates(), "rows": rows}
    save(record, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
