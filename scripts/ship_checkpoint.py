"""Ship a finished run's models as a checkpoint folder (``data_samples/course`` by default).

    fastavatar-nb run --preset course              # about 80 minutes on a 2-core CPU
    python scripts/ship_checkpoint.py runs/course  # -> data_samples/course (<= 15 MB)

(``make course`` does both.) The folder gets the decoder, codes, encoder, directions, split, preset,
the run's metrics in one ``metrics.json`` and ``provenance.json``: the commands, the commit the run
was made at, every notebook's time, library versions, the machine, and a *check*: feed-forward and
template PSNR of a few validation subjects, computed here from the run's own data, which
``tests/test_checkpoints.py`` reproduces from the loaded checkpoint and regenerated subjects.
An existing folder is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastavatar_nb import checkpoints, report
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.decoder import DECODER_FILE
from fastavatar_nb.encoder import ENCODER_FILE, EncoderResult
from fastavatar_nb.evaluation import file_digest, load_rows, novel_view_metrics
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.objective import HOLDOUT_VIEW
from fastavatar_nb.presets import Preset, project_root
from fastavatar_nb.runtime import package_version

CHECK_SUBJECTS = 2
"""Validation subjects whose feed-forward numbers the test reproduces."""
CHECK_TOLERANCE_DB = 0.05
"""How far a reproduced PSNR may be from the recorded one (the same code on another CPU: float noise)."""
LIBRARIES = ("torch", "torchvision", "numpy", "scikit-learn", "facenet-pytorch", "safetensors", "fastavatar-nb")


def check_numbers(ckpt: checkpoints.Checkpoint, subjects: list, net=None, mtcnn=None) -> dict:
    """Feed-forward (camera-8 photo -> encoder -> decoder) and template PSNR on the 15 other views,
    whole image on white, for each subject: what the shipped check records and the test recomputes."""
    from fastavatar_nb import faces

    net = net if net is not None else faces.load_facenet()
    mtcnn = mtcnn if mtcnn is not None else faces.make_mtcnn()
    out = {"subjects": [], "input_view": HOLDOUT_VIEW, "feed_forward_psnr": [], "template_psnr": []}
    for s in subjects:
        photo = s.images[HOLDOUT_VIEW:HOLDOUT_VIEW + 1]
        head = ckpt.avatars.decode(ckpt.encoder.encode(faces.embed_faces(photo, net, mtcnn=mtcnn), photo))
        heads = Gaussians.stack([head[0], ckpt.template])
        psnr = novel_view_metrics(s, heads, [HOLDOUT_VIEW, HOLDOUT_VIEW], "torch")["psnr"]
        out["subjects"].append(s.subject_id)
        out["feed_forward_psnr"].append(round(float(psnr[0]), 4))
        out["template_psnr"].append(round(float(psnr[1]), 4))
    return out


def _git(*args: str, where: Path | None = None) -> str:
    try:
        return subprocess.run(["git", *args], cwd=project_root(where), capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def protocol_rows(run_dir: Path, preset: Preset) -> dict:
    """Notebook 07's rows of this run's models: the protocol folder (``eval/protocol-*``) whose meta names the
    run's decoder and encoder files and the preset's refinement, with a file for every test subject."""
    want = {"decoder": file_digest(run_dir / DECODER_FILE), "encoder": file_digest(run_dir / ENCODER_FILE),
            "refine": json.loads(preset.refine.to_json())}
    test = json.loads((run_dir / "dataset" / checkpoints.SPLIT_FILE).read_text())["test"]
    for folder in sorted((run_dir / "eval").glob("protocol-*")):
        files = [folder / f"{sid}.json" for sid in test]
        if not files or not all(f.is_file() for f in files):
            continue
        meta = load_rows(files[0])[1]  # one folder's files share their meta: read the rest only for a match
        if all(meta.get(k) == v for k, v in want.items()):
            return {"meta": meta, "rows": [r for f in files for r in load_rows(f)[0]]}
    sys.exit(f"ship_checkpoint: {run_dir / 'eval'} holds no protocol rows of this run's decoder, encoder and "
             "refinement for every test subject: run notebook 07 of the run again")


def ship(run_dir: Path, out: Path, name: str = "course", overwrite: bool = False, notes: list[str] | None = None
         ) -> Path:
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    sources = {
        "decoder.safetensors": run_dir / "decoder.safetensors",
        "latents.safetensors": run_dir / "latents.safetensors",
        "encoder.safetensors": run_dir / "encoder.safetensors",
        "directions.json": run_dir / "directions.json",
        checkpoints.SPLIT_FILE: run_dir / "dataset" / "split.json",
        checkpoints.PRESET_FILE: run_dir / "preset.json",
    }
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        sys.exit(f"ship_checkpoint: {run_dir} is not a finished run: missing {missing}; run "
                 f"`fastavatar-nb run --preset {name}` first")
    status = json.loads((run_dir / "run_status.json").read_text()) if (run_dir / "run_status.json").is_file() else {}
    failed = [k for k, v in status.get("notebooks", {}).items() if v.get("status") != "ok"]
    if failed:
        sys.exit(f"ship_checkpoint: notebooks {failed} did not finish in {run_dir} (run_status.json); "
                 "ship a run whose every notebook passed")
    if out.exists() and any(out.iterdir()) and not overwrite:
        sys.exit(f"ship_checkpoint: {out} exists; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".tmp")  # the shipped folder is replaced only once this one passes every check
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for dest, src in sources.items():
        shutil.copyfile(src, tmp / dest)
    # the encoder's weights in float16: half the size (an encoder that reads the photo's colours has a wider first layer)
    EncoderResult.load(tmp).save(tmp, overwrite=True, weights_dtype=torch.float16)
    (tmp / checkpoints.METRICS_FILE).write_text(json.dumps(report.collect_metrics(run_dir), indent=1, sort_keys=True)
                                                + "\n")
    preset = Preset.load(run_dir / "preset.json")
    notebooks = status.get("notebooks", {})
    provenance = {
        "name": name,
        "commands": [f"fastavatar-nb run --preset {preset.name}",
                     f"python scripts/ship_checkpoint.py {os.path.relpath(run_dir, project_root())}"],
        "run_commit": _git("rev-parse", "HEAD", where=run_dir),
        "run_checkout_clean": _git("status", "--porcelain", "--untracked-files=no", where=run_dir) == "",
        "ship_commit": _git("rev-parse", "HEAD"),
        "shipped": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "preset": preset.to_dict(),
        "notebook_seconds": {k: v.get("seconds") for k, v in notebooks.items()},
        "total_seconds": round(sum(float(v.get("seconds") or 0) for v in notebooks.values()), 1),
        "libraries": {d: package_version(d) for d in LIBRARIES},
        "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "notes": list(notes or []),
    }
    (tmp / checkpoints.PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    (tmp / checkpoints.PROTOCOL_FILE).write_text(json.dumps(protocol_rows(run_dir, preset), indent=1) + "\n")
    ckpt = checkpoints.load(name, folder=tmp)
    val = SubjectDataset(run_dir / "dataset", "val")
    subjects = [val[i] for i in range(min(CHECK_SUBJECTS, len(val)))]
    provenance["check"] = {**check_numbers(ckpt, subjects), "tolerance_db": CHECK_TOLERANCE_DB}
    (tmp / checkpoints.PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    size_mb = sum(p.stat().st_size for p in tmp.iterdir()) / 1e6
    if size_mb > checkpoints.MAX_SHIPPED_MB:
        shutil.rmtree(tmp)
        sys.exit(f"ship_checkpoint: {size_mb:.1f} MB is over the {checkpoints.MAX_SHIPPED_MB} MB limit")
    for p in tmp.iterdir():
        p.chmod(0o644)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    print(f"wrote {out} ({size_mb:.1f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"check: {provenance['check']}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished run folder (e.g. runs/course)")
    ap.add_argument("--name", default="course", choices=checkpoints.SHIPPED)
    ap.add_argument("--out", type=Path, default=None, help="default: data_samples/<name>")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    ap.add_argument("--note", action="append", default=[], help="a line for provenance.json (repeatable)")
    args = ap.parse_args(argv)
    ship(args.run_dir, args.out if args.out is not None else checkpoints.shipped_dir(args.name), args.name,
         args.overwrite, args.note)


if __name__ == "__main__":
    main()
