"""What the decoder's bfloat16 MLP costs in quality and buys in time (``DecoderConfig.mlp_dtype``).

Trains the decoder of a finished run folder (its dataset, training subjects and template: the folder
``make run`` writes) once per MLP dtype and seed, everything else the preset's, and records each
run's seconds and the decoded training subjects' scores: the mean PSNR over their training views and
on the held-out camera 8, whole image on white (the numbers notebook 03 reports). Two seeds (codes'
initialisation and schedule) give the noise floor the dtype's difference is compared with.

    make run PRESET=smoke                       # once: the run folder
    python benchmarks/decoder_dtype.py --run runs/smoke --out benchmarks/results/cpu-2core/decoder_dtype_smoke.json

Nothing in the run folder is written: the decoders are trained in memory and dropped.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
from _record import RESULTS, provenance, save

from fastavatar_nb import presets
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.decoder import resolve_mlp_dtype, train_decoder
from fastavatar_nb.render.gsplat_backend import gsplat_status
from fastavatar_nb.template import load_template


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (dataset/, template.safetensors)")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for need in (args.run / "dataset" / "split.json", args.run / "template.safetensors"):
        if not need.is_file():
            ap.error(f"--run {args.run}: {need.name} is missing; run `make run PRESET={args.preset}` first "
                     "(or pass the run folder it wrote)")
    preset = presets.get(args.preset, run_dir=args.run)
    device = preset.torch_device
    if "bfloat16" in args.dtypes and resolve_mlp_dtype("auto", device) != "bfloat16":
        print("note: this CPU has no native bfloat16 products: the bfloat16 rows will be slow")
    train = SubjectDataset(args.run / "dataset", "train", cache_size=preset.num_subjects)
    subjects = [train[i] for i in range(len(train))]
    template = load_template(args.run, device=device)
    rows = []
    for seed in args.seeds:
        for dtype in args.dtypes:
            cfg = preset.decoder.replace(mlp_dtype=dtype, seed=seed)
            res = train_decoder(subjects, template, cfg, backend=preset.backend, device=device, progress=False)
            row = {"mlp_dtype": dtype, "seed": seed, "seconds": res.seconds, "steps": len(res.loss_history),
                   "train_psnr": float(res.train_psnr.mean()), "heldout_psnr": float(res.heldout_psnr.mean()),
                   "train_ssim": float(res.train_ssim.mean())}
            rows.append(row)
            print(f"seed {seed} {dtype:8s} {row['seconds']:6.1f} s: training views {row['train_psnr']:.2f} dB, "
                  f"camera 8 {row['heldout_psnr']:.2f} dB", flush=True)
    summary = {}
    for dtype in args.dtypes:
        mine = [r for r in rows if r["mlp_dtype"] == dtype]
        summary[dtype] = {k: statistics.fmean(r[k] for r in mine) for k in ("seconds", "train_psnr", "heldout_psnr")}
    if len(args.seeds) > 1 and "float32" in summary:
        f32 = [r for r in rows if r["mlp_dtype"] == "float32"]
        summary["seed_spread_train_psnr_float32"] = max(r["train_psnr"] for r in f32) - min(r["train_psnr"] for r in f32)
    _, why = gsplat_status()
    record = {**provenance("decoder_dtype", device, why), "preset": preset.to_dict(), "rows": rows,
              "summary": summary}
    save(record, args.out or RESULTS / "local" / f"decoder_dtype_{preset.name}_{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
