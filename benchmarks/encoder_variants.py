"""Encoder variants on the validation subjects: does a regularised encoder generalise further?

Each variant is an :class:`~fastavatar_nb.encoder.EncoderConfig` switch over the paper's encoder (frozen
FaceNet + MLP with Eq. 9's loss, the course preset's weights): more dropout, weight decay, noise on the
embeddings, mixing two views of a subject, and the input photo's colours on a coarse grid beside the
embedding (``photo_grid``, ``photo_weight``; at weight 20 the embedding's share of the input is small). Each is distilled onto the codes of one decoder (a
snapshot of ``benchmarks/decoder_capacity.py``, or the run folder's ``decoder.safetensors``) and scored on
the course run's validation subjects exactly as ``decoder_capacity.py`` scores its snapshots: notebook 07's
protocol on their input photos, beside the template, the mean code, FaceNet nearest and render retrieval.

It also asks whether FaceNet's embedding is the limit: how often the nearest other photo of a validation
photo in FaceNet space shows the same subject (identification), and the cosine of one subject's views
against different subjects'.

    FASTAVATAR_RUN_DIR=runs/course python benchmarks/encoder_variants.py --snapshot runs/course/capacity_e48/snapshot_e48.safetensors

Writes ``benchmarks/results/cpu-2core/encoder_variants_course_e48.json`` (``--out`` to choose; the 6-epoch
snapshot's regularised variants are in ``encoder_variants_course.json``). The chosen variant (``--choose FILE``
applies the rule again): the fewest inputs within ``NOISE_DB`` of the best validation feed-forward PSNR; the
course preset ships it (``presets.COURSE_PHOTO_GRID``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import torch
from _record import RESULTS, provenance, save
from decoder_capacity import NOISE_DB, SCORED, score_validation, snapshot_result

import fastavatar_nb as fa
import fastavatar_nb.presets  # noqa: F401
from fastavatar_nb import pipeline
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.decoder import DecoderResult
from fastavatar_nb.encoder import dataset_photos, train_encoder, training_pairs
from fastavatar_nb.evaluation import cosine_within_between

VARIANTS: dict[str, dict] = {
    "paper (course preset)": {},
    "dropout 0.5": {"dropout": 0.5},
    "weight decay 0.05": {"weight_decay": 0.05},
    "embedding noise 0.02": {"input_noise": 0.02},
    "view mix 0.5": {"view_mix": 0.5},
    "all four": {"dropout": 0.5, "weight_decay": 0.05, "input_noise": 0.02, "view_mix": 0.5},
    "photo colours 25x17, weight 0.5": {"photo_grid": (25, 17), "photo_weight": 0.5},
    "photo colours 25x17, weight 1": {"photo_grid": (25, 17), "photo_weight": 1.0},
    "photo colours 25x17, weight 2": {"photo_grid": (25, 17), "photo_weight": 2.0},
    "photo colours 13x9, weight 1": {"photo_grid": (13, 9), "photo_weight": 1.0},
    "photo colours 50x35, weight 1": {"photo_grid": (50, 35), "photo_weight": 1.0},
    "photo colours 25x17, weight 20": {"photo_grid": (25, 17), "photo_weight": 20.0},
    "photo colours 25x17, weight 20, jitter 0.05": {"photo_grid": (25, 17), "photo_weight": 20.0, "photo_jitter": 0.05},
    "photo colours 25x17, weight 20, jitter 0.1": {"photo_grid": (25, 17), "photo_weight": 20.0, "photo_jitter": 0.1},
}
"""Variant name -> the EncoderConfig fields it changes over the preset's config."""


def inputs(row: dict) -> int:
    """How many numbers a variant's encoder reads: FaceNet's 512, plus 3 per cell of its photo grid."""
    rows, cols = row["changes"].get("photo_grid", (0, 0))
    return 512 + 3 * rows * cols


def choose(record: dict) -> str:
    """Set ``record["chosen"]`` (and ``chosen_by``): among the variants whose validation feed-forward PSNR is
    within :data:`NOISE_DB` of the best one's, the one that reads the fewest inputs, then the best of those. Where
    every row was also scored through the photo route (``--photo-route``), the PSNR is the mean of both routes."""
    both = all("val_photo_route_feed_forward_psnr" in r for r in record["rows"])
    ff = {r["variant"]: (r["val"]["feed-forward"]["psnr"] + r["val_photo_route_feed_forward_psnr"]) / 2 if both
          else r["val"]["feed-forward"]["psnr"] for r in record["rows"]}
    best = max(ff.values())
    near = [r for r in record["rows"] if ff[r["variant"]] >= best - NOISE_DB]
    record["chosen"] = min(near, key=lambda r: (inputs(r), -ff[r["variant"]]))["variant"]
    what = "the mean of the dataset route's and the photo route's" if both else "the"
    record["chosen_by"] = (f"the variant that reads the fewest inputs among those whose {what} validation feed-forward "
                           f"PSNR (whole image on white) is within {NOISE_DB} dB of the best ({best:.2f} dB)")
    return record["chosen"]


PHOTO_ROUTE_VIEWS = (8, 3)
"""Views of each validation subject that :func:`photo_route_psnr` treats as a user's photo (frontal, side)."""


def photo_route_psnr(avatars: DecoderResult, encoder, val: SubjectDataset, backend: str) -> float:
    """Feed-forward PSNR (whole image on white, the 15 other views) when each validation subject's
    :data:`PHOTO_ROUTE_VIEWS` photos go through ``photo.reconstruct`` as a user's photo would: MTCNN on the photo,
    the PnP camera, and the working view (framed like camera 8 from the landmarks, not the rig's own framing)
    as the photo the encoder reads."""
    from fastavatar_nb import faces
    from fastavatar_nb import photo as ph
    from fastavatar_nb.evaluation import novel_view_metrics
    from fastavatar_nb.gaussians import Gaussians

    net, mtcnn = faces.load_facenet(), faces.make_mtcnn()
    w, h = val[0].width, val[0].height
    lm = ph.template_landmarks(avatars.template, w, h, mtcnn, backend)[0]
    out = []
    for i in range(len(val)):
        s = val[i]
        for v in PHOTO_ROUTE_VIEWS:
            try:
                r = ph.reconstruct(s.images[v], avatars, encoder, w, h, landmarks3d=lm, net=net, mtcnn=mtcnn,
                                   backend=backend, progress=False)
            except ph.NoFaceError:
                continue
            out.append(float(novel_view_metrics(s, Gaussians.stack([r.feed_forward]), [v], backend)["psnr"][0]))
    return sum(out) / len(out)


def facenet_identification(emb: torch.Tensor, found: torch.Tensor) -> float:
    """Share of photos whose nearest other photo (FaceNet cosine, any subject, any view) shows the same subject."""
    x = torch.nn.functional.normalize(emb[found], dim=-1)
    who = torch.arange(emb.shape[0])[:, None].expand_as(found)[found]
    cos = x @ x.T
    cos.fill_diagonal_(-2.0)
    return float((who[cos.argmax(1)] == who).float().mean())


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``y ~ x W + b`` (dual form: fewer samples than features); returns ``(W, b)``."""
    xm, ym = x.mean(0), y.mean(0)
    xc = (x - xm).double()
    k = xc @ xc.T
    a = torch.linalg.solve(k + alpha * torch.eye(len(k), dtype=k.dtype), (y - ym).double())
    w = (xc.T @ a).float()
    return w, ym - xm @ w


def camera8_probes(avatars: DecoderResult, train: SubjectDataset, val: SubjectDataset, train_emb, train_found,
                   val_emb, val_found, encoder, backend: str) -> dict:
    """What the camera-8 photo carries about the code, by input: ridge regressions to the training codes from
    FaceNet's embedding, from FaceNet's own input (the MTCNN face crop, pooled to 20x20x3) and from the whole
    photo's pixels (69x100x3), each with the ridge weight that scores best on these validation subjects (a
    diagnostic, not a method), beside the MLP encoder on the same photos."""
    from fastavatar_nb.evaluation import novel_view_metrics
    from fastavatar_nb.objective import HOLDOUT_VIEW as V8

    tr = [i for i in range(len(train)) if bool(train_found[i, V8])]
    va = [i for i in range(len(val)) if bool(val_found[i, V8])]
    from fastavatar_nb import faces

    photos_t = torch.stack([train[i].images[V8] for i in tr])
    photos_v = torch.stack([val[i].images[V8] for i in va])

    def crops(photos: torch.Tensor) -> torch.Tensor:  # FaceNet's input (MTCNN crop, 160 px) at 20x20
        boxes, found = faces.detect_faces(photos)
        assert bool(found.all()), "a camera-8 photo that FaceNet embedded has no MTCNN box"
        return torch.nn.functional.avg_pool2d(faces.crop_boxes(photos, boxes), 8).flatten(1)

    inputs = {"FaceNet embedding": (torch.nn.functional.normalize(train_emb[tr, V8], dim=-1),
                                    torch.nn.functional.normalize(val_emb[va, V8], dim=-1)),
              "face-crop pixels (FaceNet's input, 20x20)": (crops(photos_t), crops(photos_v)),
              "photo pixels (69x100)": (photos_t.flatten(1), photos_v.flatten(1))}
    subjects = [val[i] for i in va]

    def score(codes: torch.Tensor) -> float:
        return float(torch.stack([novel_view_metrics(s, avatars.decode(c[None]), [V8], backend)["psnr"][0]
                                  for s, c in zip(subjects, codes, strict=True)]).mean())

    out = {"val_photos": len(va), "MLP encoder (this run's paper variant)": score(encoder.encode(val_emb[va, V8]))}
    for name, (xt, xv) in inputs.items():
        best = None
        for alpha in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0):
            scale = float(xt.var(0).sum())  # alpha relative to the inputs' total variance
            w, b = ridge(xt, avatars.codes[tr], alpha * scale)
            p = score(xv @ w + b)
            if best is None or p > best[1]:
                best = (alpha, p)
        out[f"ridge on {name}"] = {"psnr": best[1], "alpha_over_variance": best[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot", type=Path, default=None,
                    help="a decoder snapshot of decoder_capacity.py (default: the run folder's decoder.safetensors)")
    ap.add_argument("--epochs", type=int, default=None, help="with --snapshot: the decoder run's epochs (its config)")
    ap.add_argument("--only", default=None, help="variant names, separated by semicolons (default: all; '' for none)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu-2core" / "encoder_variants_course_e48.json")
    ap.add_argument("--photo-route", action="store_true",
                    help="also score each variant through photo.reconstruct (photo_route_psnr)")
    ap.add_argument("--no-probes", action="store_true", help="skip the camera-8 ridge probes")
    ap.add_argument("--choose", type=Path, default=None,
                    help="apply the choice rule to this results file again (rewritten in place) and exit")
    args = ap.parse_args()
    if args.choose is not None:
        record = json.loads(args.choose.read_text())
        print(f"chosen: {choose(record)} ({record['chosen_by']})")
        save(record, args.choose)
        return

    preset = fa.presets.get("course")
    run, dev, backend = preset.run_dir, preset.torch_device, preset.backend
    train = SubjectDataset(run / "dataset", "train", cache_size=preset.num_subjects)
    val = pipeline.validation_subjects(preset, run / "dataset")
    if args.snapshot is not None:
        config = preset.decoder.replace(**({"epochs": args.epochs} if args.epochs else {}))
        avatars = snapshot_result(args.snapshot, config, pipeline.ensure_template(preset, train, progress=False),
                                  list(train.subject_ids), dev)
    else:
        avatars = DecoderResult.load(run, device=dev)
    train_emb, train_found = pipeline.ensure_embeddings(preset, train)
    val_emb, val_found = pipeline.ensure_embeddings(preset, val)
    x, y = training_pairs(train_emb, train_found, avatars.codes)
    photos = dataset_photos(train)[train_found]
    # the paper's encoder (no photo colours), whatever the preset ships
    base = dataclasses.replace(preset.encoder, photo_grid=(0, 0), photo_weight=1.0)
    within, between = cosine_within_between(val_emb, val_found)
    record = {**provenance("encoder variants (course)", torch.device(dev), "not used"),
              "decoder": str(args.snapshot or run / "decoder.safetensors"), "base_encoder_config": base.to_json(),
              "val_subjects": len(val), "facenet": {
                  "val_identification_nearest_photo": facenet_identification(val_emb, val_found),
                  "val_cosine_within": within, "val_cosine_between": between},
              "rows": []}
    print(f"FaceNet on the validation photos: nearest other photo shows the same subject "
          f"{record['facenet']['val_identification_nearest_photo']:.1%}; cosine within {within:.3f}, "
          f"between {between:.3f}", flush=True)
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(";") if n.strip()]
    if unknown := [n for n in names if n not in VARIANTS]:
        ap.error(f"--only names unknown variants {unknown}; variants are {list(VARIANTS)}")
    encoders = {}
    for name in names:
        cfg = dataclasses.replace(base, **VARIANTS[name]).validate()
        t0 = time.perf_counter()
        encoder = encoders[name] = train_encoder(x, y, cfg, progress=False, photos=photos)
        secs = time.perf_counter() - t0
        table, c_within, c_between = score_validation(avatars, encoder, val, val_emb, val_found, train_emb,
                                                      train_found, preset.evaluation.input_views, backend)
        train_cos = float(torch.nn.functional.cosine_similarity(encoder.encode(x, photos), y, dim=-1).mean())
        route = photo_route_psnr(avatars, encoder, val, backend) if args.photo_route else None
        row = {"variant": name, "changes": VARIANTS[name], "encoder_seconds": round(secs, 1),
               **({"val_photo_route_feed_forward_psnr": route} if route is not None else {}),
               "train_code_cosine": train_cos, "val": {m: table[m] for m in SCORED if m in table},
               "val_code_cosine_within": c_within, "val_code_cosine_between": c_between}
        record["rows"].append(row)
        print(f"{name}: val feed-forward {table['feed-forward']['psnr']:.2f} dB"
              + (f", photo route {route:.2f} dB" if route is not None else "") + " (render retrieval "
              f"{table['render retrieval']['psnr']:.2f}); code cosine train {train_cos:.3f}, val within "
              f"{c_within:.3f} between {c_between:.3f} ({secs:.0f} s)", flush=True)
        save(record, args.out)
    if not args.no_probes:
        paper = encoders.get(next(iter(VARIANTS))) or train_encoder(x, y, base, progress=False)
        record["camera8_probes"] = camera8_probes(avatars, train, val, train_emb, train_found, val_emb, val_found,
                                                  paper, backend)
        print("camera-8 photos of the validation subjects:", json.dumps(record["camera8_probes"]), flush=True)
    if record["rows"]:
        record["best"] = max(record["rows"], key=lambda r: r["val"]["feed-forward"]["psnr"])["variant"]
        print(f"chosen: {choose(record)} ({record['chosen_by']})")
    save(record, args.out)
    print(json.dumps({r["variant"]: round(r["val"]["feed-forward"]["psnr"], 2) for r in record["rows"]}))


if __name__ == "__main__":
    main()
