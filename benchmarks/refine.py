"""Refinement sweep: which schedule and learning rates make test-time refinement help most.

For every **validation** subject of the preset's run folder (never a test subject: the defaults
chosen from this sweep are then scored on the test subjects by notebook 07) and each of
``--views`` as the input photo,
the encoder's code is refined on that one view with each configuration below, and the refined
head is scored on the input view and on the subject's other views (the paper's protocol,
:func:`fastavatar_nb.evaluation.novel_view_metrics`). Rows: the mean over subjects and input
views, with the feed-forward head's numbers for reference and the time per step.

The run folder must hold (or the script makes, as the notebooks would) the dataset, the
decoder and the encoder:

    python benchmarks/refine.py --preset smoke              # ~6 min on 2 CPU cores
    python benchmarks/refine.py --preset smoke --steps 300

Writes ``benchmarks/results/local/refine_sweep_<preset>_<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _record import RESULTS, provenance, save

from fastavatar_nb import faces, pipeline, presets, runtime
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.encoder import dataset_embeddings, dataset_photos, encode_faces
from fastavatar_nb.evaluation import novel_view_metrics
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.refine import input_view, refine
from fastavatar_nb.render.gsplat_backend import gsplat_status

# every row names its schedule and both learning rates, so it does not depend on RefineConfig's defaults
CONFIGS: list[dict] = [
    {"schedule": sched, "code_lr": code_lr, "decoder_lr": dec_lr}
    for sched, code_lr, dec_lr in [
        ("code_then_decoder", 1e-2, 1e-4),
        ("joint", 1e-2, 1e-4),
        ("code", 1e-2, 1e-4),
        ("decoder", 1e-2, 1e-4),
        ("code_then_decoder", 1e-2, 3e-4),
        ("code_then_decoder", 1e-2, 1e-3),
        ("joint", 1e-2, 3e-4),
        ("joint", 1e-2, 1e-3),
        ("joint", 3e-2, 3e-4),
    ]
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--steps", type=int, default=None, help="refinement steps (default: the preset's)")
    ap.add_argument("--views", default="0,4,8,12", help="input views, comma-separated")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    preset = presets.get(args.preset)
    runtime.setup(preset, save=False)
    dev, backend = preset.torch_device, preset.backend
    views = [int(v) for v in args.views.split(",")]

    root = pipeline.prepare_dataset(preset, progress=False)
    train, val = SubjectDataset(root, "train"), SubjectDataset(root, "val")
    if len(val) == 0:
        raise SystemExit(f"{root} has no validation subjects (split.json without 'val'); the sweep chooses settings "
                         "on validation subjects only: make the dataset again with the current preset")
    avatars = pipeline.ensure_decoder(preset, train)
    encoder = pipeline.ensure_encoder(preset, train, avatars)
    emb, found = dataset_embeddings(val, faces.load_facenet(device=dev), progress=False)
    codes = encode_faces(emb.flatten(0, 1), encoder, dataset_photos(val).flatten(0, 1)).unflatten(0, emb.shape[:2])

    cases = []  # (subject, view, code, input view tensors, feed-forward numbers)
    for t in range(len(val)):
        s = val[t].to(dev)
        for v in views:
            if not bool(found[t, v]):
                print(f"{s.subject_id} view {v}: no face found, skipped")
                continue
            image, cam = input_view(s, v)  # the photo and its camera: all that refinement sees
            ff = novel_view_metrics(s, avatars.decode(codes[t, v][None]), [v], backend)
            cases.append((s, v, codes[t, v], (image, cam), float(ff["psnr"][0])))

    rows = []
    for overrides in CONFIGS:
        cfg = preset.refine.replace(**overrides, **({"steps": args.steps} if args.steps else {}))
        acc = {"input_before": [], "input_after": [], "novel_before": [], "novel_after": [], "ms_per_step": []}
        for s, v, code, (image, cam), ff_novel in cases:
            r = refine(avatars, code, image, cam, None, cfg, backend, progress=False)
            nv = novel_view_metrics(s, Gaussians.stack([r.head]), [v], backend)
            acc["input_before"].append(float(r.psnr_history[0]))
            acc["input_after"].append(r.final_psnr)
            acc["novel_before"].append(ff_novel)
            acc["novel_after"].append(float(nv["psnr"][0]))
            acc["ms_per_step"].append(1000 * r.seconds / max(1, cfg.steps))
        row = {"config": overrides, "steps": cfg.steps, "cases": len(cases),
               **{k: sum(x) / len(x) for k, x in acc.items()},
               "novel_after_per_case": acc["novel_after"]}
        rows.append(row)
        print(f"{str(overrides):60s} input {row['input_before']:.2f} -> {row['input_after']:.2f} dB, "
              f"novel {row['novel_before']:.2f} -> {row['novel_after']:.2f} dB, {row['ms_per_step']:.0f} ms/step",
              flush=True)

    record = {**provenance("refine_sweep", dev, gsplat_status()[1]), "preset": preset.to_dict(),
              "input_views": views, "split": "val", "subjects": val.subject_ids,
              "metric": "PSNR (dB) over the whole image on white; novel = mean over the views other than the input",
              "rows": rows}
    out = args.out or RESULTS / "local" / f"refine_sweep_{preset.name}_{dev.type}.json"
    save(record, out)


if __name__ == "__main__":
    main()
