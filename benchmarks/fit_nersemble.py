"""Fit quality on real NeRSemble subjects: PSNR/SSIM on the training views and on camera 8.

Fits each given NeRSemble/VHAP subject folder exactly as notebook 02 fits the synthetic
subjects (``FitConfig.for_preset``, batch 1, all its ``points3d.ply`` points), then reports
the metrics of :class:`~fastavatar_nb.fitting.FitResult`: over the support region (background
plus the foreground the points cover) and over every pixel.

    .venv/bin/python benchmarks/fit_nersemble.py --preset smoke
    .venv/bin/python benchmarks/fit_nersemble.py --preset full                  # on a GPU
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fit_nersemble.py --preset full --allow-cpu  # ~1 h

Subjects default to every folder in ``$FASTAVATAR_NERSEMBLE_ROOT`` or
``../shared/data/nersemble_samples``. The fit is checkpointed under
``runs/bench/fit_nersemble/<preset>/<subject>-<config hash>/`` so an interrupted run resumes. Writes JSON to
``benchmarks/results/local/fit_nersemble_<preset>_<device>.json`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from pathlib import Path

from _record import RESULTS, provenance, save

from fastavatar_nb import presets
from fastavatar_nb.data import read_subject
from fastavatar_nb.fitting import FitConfig, fit_subjects
from fastavatar_nb.render.gsplat_backend import gsplat_status


def default_root() -> Path:
    env = os.environ.get("FASTAVATAR_NERSEMBLE_ROOT")
    return Path(env) if env else presets.project_root().parent / "shared" / "data" / "nersemble_samples"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("subjects", nargs="*", type=Path, help="subject folders (default: every one in the samples root)")
    ap.add_argument("--preset", default="auto", help="image size, K cap and fit iterations from this preset")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full preset without CUDA (slow)")
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's fit iterations")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    args = ap.parse_args(argv)
    preset = presets.get(args.preset, allow_cpu=args.allow_cpu or None)
    root = default_root()
    folders = args.subjects or (sorted(p for p in root.iterdir() if (p / "transforms.json").is_file())
                                if root.is_dir() else [])
    if not folders:
        ap.error(f"no NeRSemble subject folders given and none found in {default_root()}")
    device = preset.torch_device
    overrides = {"batch_size": 1} | ({} if args.iterations is None else {"iterations": args.iterations})
    config = FitConfig.for_preset(preset, **overrides)
    rows = []
    for folder in folders:
        subject = read_subject(folder, width=preset.image_width, height=preset.image_height)
        subject = subject.thin_points(preset.num_gaussians)  # the smoke preset's K: an even subset
        print(f"{subject.subject_id}: K = {subject.num_points}, {subject.width}x{subject.height}, "
              f"{config.iterations} steps, backend {preset.backend} on {device}", flush=True)
        tag = hashlib.sha256(config.to_json().encode()).hexdigest()[:8]  # one checkpoint per config
        ckpt = presets.project_root() / "runs" / "bench" / "fit_nersemble" / preset.name / f"{subject.subject_id}-{tag}"
        fit = fit_subjects([subject], config, backend=preset.backend, device=device, checkpoint=ckpt)
        row = {**fit.table()[0], "num_gaussians": subject.num_points, "iterations": config.iterations,
               "seconds": fit.seconds}
        rows.append(row)
        print(f"  train {row['train_psnr']:.2f} dB, camera 8 {row['heldout_psnr']:.2f} dB (support region); "
              f"full image {row['train_psnr_image']:.2f} / {row['heldout_psnr_image']:.2f} dB; "
              f"drift {row['drift_mean_mm']:.2f} mm; {fit.seconds:.0f} s", flush=True)
    _, why = gsplat_status()
    record = {**provenance("fit_nersemble", device, why), "preset": preset.name,
              "image_size": [preset.image_width, preset.image_height], "backend": preset.backend,
              "config": dataclasses.asdict(config), "rows": rows}
    save(record, args.out or RESULTS / "local" / f"fit_nersemble_{preset.name}_{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
