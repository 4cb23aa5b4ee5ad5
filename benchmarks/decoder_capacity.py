"""The course decoder trained longer, with its number of epochs chosen on the validation subjects.

One decoder run of the course preset's config at ``--epochs`` epochs, in a course run folder that
notebooks 00-02 made (``fastavatar-nb run --preset course --only 00..02``: the dataset, the fits and the
template). At each epoch of ``--snapshots`` (the first decoder checkpoint at or after it) the training
pauses and the snapshot is scored:

* **training subjects**: their decoded heads at the held-out camera 8, whole image on white (issue 30's
  goal: >= 25 dB; the shipped 4-epoch decoder: 20.4 dB);
* **validation subjects** (never trained on, never test subjects): an encoder distilled onto the snapshot's
  codes with the preset's :class:`~fastavatar_nb.encoder.EncoderConfig`, then notebook 07's protocol on
  their input photos (every other view, whole image on white), beside the template, the mean code,
  FaceNet nearest and render retrieval; and the encoded codes' cosine within and between subjects.

The epochs to ship (:func:`choose`): the most epochs whose validation feed-forward PSNR is within
:data:`NOISE_DB` of the best snapshot's, so that longer training, which the decoder's own subjects (and
refinement, retrieval and editing, which start from them) gain from, is never paid for with generalisation.
A snapshot is a point on one learning-rate schedule (decaying over ``--epochs``): a count below ``--epochs``
is then trained on its own schedule. ``--choose FILE`` applies the rule to a results file again. With ``--checkpoint-into-run`` the run trains into the run folder's ``decoder_checkpoint/``, so
that notebook 03 at ``decoder.epochs = --epochs`` reuses it instead of training again.

    FASTAVATAR_RUN_DIR=runs/course python benchmarks/decoder_capacity.py --epochs 40 --snapshots 4,8,16,24,32,40

``--preset NAME`` runs another preset's config in its run folder, ``--decoder JSON`` changes DecoderConfig fields
(e.g. ``'{"hidden_dim": 128}'``), and ``--refine`` adds the refined head from each validation photo (the preset's
RefineConfig) to the scored rows.

Writes ``benchmarks/results/cpu-2core/decoder_capacity_<preset>.json`` (``--out`` to choose), rewritten after
every snapshot so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import torch
from _record import RESULTS, provenance, save
from safetensors.torch import load_file

import fastavatar_nb as fa
import fastavatar_nb.presets  # noqa: F401
from fastavatar_nb import Gaussians, pipeline
from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.decoder import (
    CHECKPOINT_FILE,
    DecoderConfig,
    DecoderResult,
    step_items,
    train_decoder,
    train_views,
)
from fastavatar_nb.encoder import dataset_photos, train_encoder, training_pairs
from fastavatar_nb.evaluation import (
    cosine_within_between,
    facenet_nearest,
    input_views,
    protocol_rows,
    render_retrieval,
    summarize,
)
from fastavatar_nb.objective import HOLDOUT_VIEW, evaluate_views
from fastavatar_nb.refine import RefineConfig, refine_views

NOISE_DB = 0.5
"""Differences of validation feed-forward PSNR below this are not told apart: 16 validation subjects x 2 photos
(a second seed of the smoke preset moved the feed-forward row by 0.25 dB, ``ablations_smoke.json``)."""
SCORED = ("template", "mean code", "FaceNet nearest", "render retrieval", "feed-forward", "refined")


def choose(record: dict) -> float:
    """Set ``record["chosen_epochs"]`` (and ``chosen_by``): the most epochs among the snapshots whose validation
    feed-forward PSNR is within :data:`NOISE_DB` of the best one's."""
    ff = {s["epoch"]: s["val"]["feed-forward"]["psnr"] for s in record["snapshots"]}
    best = max(ff.values())
    record["chosen_epochs"] = max(e for e, p in ff.items() if p >= best - NOISE_DB)
    record["chosen_by"] = (f"the most epochs whose validation feed-forward PSNR (whole image on white) is within "
                           f"{NOISE_DB} dB of the best snapshot's ({best:.2f} dB)")
    return record["chosen_epochs"]


def snapshot_result(path: Path, config: DecoderConfig, template, ids: list[str], device) -> DecoderResult:
    """A :class:`DecoderResult` of the weights, codes and embeddings in a decoder checkpoint file."""
    t = load_file(str(path), device=str(device))
    decoder = config.make_decoder(device)
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in t.items() if k.startswith("decoder.")})
    decoder.eval()
    nan = torch.full((len(ids),), float("nan"))
    return DecoderResult(decoder=decoder, embeddings=t["embeddings"], template=template, codes=t["codes"], subject_ids=ids,
                         train_psnr=nan.clone(), train_ssim=nan.clone(), heldout_psnr=nan.clone(),
                         heldout_ssim=nan.clone(), heldout_psnr_head=nan.clone(), loss_history=t["hist.loss"],
                         psnr_history=t["hist.psnr"], config=config)


def heldout_psnr(avatars: DecoderResult, train: SubjectDataset, backend: str, chunk: int = 16) -> float:
    """Mean whole-image PSNR of the decoded training subjects at the held-out camera 8."""
    out = []
    for i in range(0, len(train), chunk):
        subs = [train[j] for j in range(i, min(len(train), i + chunk))]
        ims = torch.stack([s.images for s in subs])
        cams = Cameras(torch.stack([s.cameras.viewmats for s in subs]), torch.stack([s.cameras.Ks for s in subs]),
                       subs[0].width, subs[0].height)
        g = avatars.decode(avatars.codes[i:i + len(subs)])
        out.append(evaluate_views(g, ims, cams, [HOLDOUT_VIEW], backend=backend)["psnr"][:, 0])
    return float(torch.cat(out).mean())


def retrieve_inputs(avatars: DecoderResult, subjects: list, inputs: list[tuple[int, int]], backend: str) -> dict:
    """Render retrieval for many input photos at once (each training head decoded once): ``{(subject index,
    view): index of the training subject picked}`` for ``inputs`` of ``(subject index, view)``."""
    photos = torch.stack([subjects[i].images[v] for i, v in inputs])
    cams = Cameras(torch.stack([subjects[i].cameras.viewmats[v] for i, v in inputs]),
                   torch.stack([subjects[i].cameras.Ks[v] for i, v in inputs]), subjects[0].width, subjects[0].height)
    return dict(zip(inputs, render_retrieval(avatars, photos, cams, backend=backend)[0].tolist(), strict=True))


def score_validation(avatars: DecoderResult, encoder, val: SubjectDataset, val_emb, val_found, train_emb,
                     train_found, limit: int | None, backend: str,
                     refine_config: RefineConfig | None = None) -> tuple[dict, float, float]:
    """Notebook 07's rows on the validation subjects: ``(summary table, cosine within, cosine between)``; with
    ``refine_config``, the refined head from each input photo too (row ``"refined"``)."""
    rows, codes_all = [], torch.zeros_like(val_emb[..., :avatars.codes.shape[1]])
    mean_head = avatars.decode(avatars.codes.mean(0))
    photos = dataset_photos(val, val_emb.device)[val_found] if encoder.reads_photos else None
    with torch.no_grad():
        codes_all[val_found] = encoder.encode(val_emb[val_found], photos)
    subjects = [val[i] for i in range(len(val))]
    views = [input_views(val_found[i], limit) for i in range(len(val))]
    inputs = [(i, v) for i in range(len(val)) for v in views[i]]
    retrieved = retrieve_inputs(avatars, subjects, inputs, backend)
    for i, s in enumerate(subjects):
        vs = views[i]
        if not vs:
            continue
        near = facenet_nearest(val_emb[i, vs], vs, train_emb, train_found)
        picked = torch.tensor([retrieved[(i, v)] for v in vs])
        heads = {"template": Gaussians.stack([avatars.template] * len(vs)),
                 "mean code": Gaussians.stack([mean_head] * len(vs)),
                 "FaceNet nearest": avatars.decode(avatars.codes[near]),
                 "render retrieval": avatars.decode(avatars.codes[picked]),
                 "feed-forward": avatars.decode(codes_all[i, vs])}
        if refine_config is not None:
            heads["refined"] = refine_views(avatars, s, codes_all[i, vs], vs, refine_config, backend, progress=False)[0]
        rows += protocol_rows(s, heads, vs, backend)
    within, between = cosine_within_between(codes_all, val_found)
    return summarize(rows), within, between


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the decoder run (required unless --choose)")
    ap.add_argument("--choose", type=Path, default=None,
                    help="apply the choice rule to this results file again (rewritten in place) and exit")
    ap.add_argument("--snapshots", default="", help="epochs to score at, comma-separated (the last is always scored)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder of this run's checkpoint and snapshots (default: <run>/capacity_e<E>)")
    ap.add_argument("--checkpoint-into-run", action="store_true",
                    help="train into the run folder's decoder_checkpoint/ (notebook 03 then reuses it)")
    ap.add_argument("--preset", default="course", help="the preset whose run folder and configs are used (default course)")
    ap.add_argument("--decoder", type=json.loads, default={}, metavar="JSON",
                    help='DecoderConfig fields over the preset\'s, e.g. \'{"hidden_dim": 128}\'')
    ap.add_argument("--refine", action="store_true",
                    help="also score the refined head from each validation photo (the preset's RefineConfig)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: benchmarks/results/cpu-2core/decoder_capacity_<preset>.json)")
    args = ap.parse_args()
    args.out = args.out or RESULTS / "cpu-2core" / f"decoder_capacity_{args.preset}.json"
    if args.choose is not None:
        record = json.loads(args.choose.read_text())
        print(f"chosen: {choose(record):g} epochs ({record['chosen_by']})")
        save(record, args.choose)
        return
    if args.epochs is None:
        ap.error("--epochs is required (or --choose FILE)")

    preset = fa.presets.get(args.preset)
    run, dev, backend = preset.run_dir, preset.torch_device, preset.backend
    if not (run / "dataset").is_dir():
        raise SystemExit(f"{run} has no dataset: run `fastavatar-nb run --preset {preset.name} --only 00..02` first "
                         "(FASTAVATAR_RUN_DIR names the run folder)")
    train = SubjectDataset(run / "dataset", "train", cache_size=preset.num_subjects)
    val = pipeline.validation_subjects(preset, run / "dataset")
    template = pipeline.ensure_template(preset, train, progress=False)
    config = preset.decoder.replace(**{"epochs": args.epochs, **args.decoder})
    enc_config = preset.encoder
    train_emb, train_found = pipeline.ensure_embeddings(preset, train)
    val_emb, val_found = pipeline.ensure_embeddings(preset, val)
    ids = list(train.subject_ids)

    n_items = len(step_items(config.seed, 0, len(train), len(train_views(train[0].num_views, config.holdout_view)),
                             config.views_per_step))
    per_epoch = math.ceil(n_items / config.subjects_per_step)
    wanted = sorted({float(e) for e in args.snapshots.split(",") if e} | {float(args.epochs)})
    snap_steps = {min(per_epoch * args.epochs, math.ceil(per_epoch * e / config.checkpoint_every)
                      * config.checkpoint_every): e for e in wanted}
    snaps = args.work or run / f"capacity_e{args.epochs}"
    work = run / pipeline.DECODER_CHECKPOINT if args.checkpoint_into_run else snaps
    snaps.mkdir(parents=True, exist_ok=True)
    record = {**provenance(f"decoder capacity ({preset.name})", torch.device(dev), "not used"),
              "preset": preset.name, "run_dir": str(run), "decoder_overrides": args.decoder, "decoder_config": config.to_json(),
              "encoder_config": enc_config.to_json(), "steps_per_epoch": per_epoch,
              "train_subjects": len(train), "val_subjects": len(val), "input_views_per_val_subject":
              preset.evaluation.input_views, "snapshots": []}
    t_train = [time.perf_counter(), 0.0]

    def on_step(info: dict) -> None:
        step = info["step"]
        if step not in snap_steps:
            return
        t_train[1] += time.perf_counter() - t_train[0]
        t0 = time.perf_counter()
        snap_file = snaps / f"snapshot_e{snap_steps[step]:g}.safetensors"
        shutil.copyfile(work / CHECKPOINT_FILE, snap_file)  # kept for later experiments (e.g. encoder variants)
        avatars = snapshot_result(snap_file, config, template, ids, dev)
        photos = dataset_photos(train)[train_found] if enc_config.reads_photos else None
        encoder = train_encoder(*training_pairs(train_emb, train_found, avatars.codes), enc_config, progress=False,
                                photos=photos)
        t_enc = time.perf_counter() - t0
        table, within, between = score_validation(avatars, encoder, val, val_emb, val_found, train_emb, train_found,
                                                  preset.evaluation.input_views, backend,
                                                  preset.refine if args.refine else None)
        snap = {"epoch": snap_steps[step], "step": step, "epochs_done": round(step / per_epoch, 3),
                "train_seconds": round(t_train[1], 1), "train_step_psnr_last_epoch":
                float(avatars.psnr_history[max(0, step - per_epoch):step].mean()),
                "train_heldout_psnr": heldout_psnr(avatars, train, backend),
                "val": {m: {k: table[m][k] for k in ("psnr", "ssim", "psnr_head") if k in table[m]}
                        for m in SCORED if m in table},
                "val_code_cosine_within": within, "val_code_cosine_between": between,
                "encoder_seconds": round(t_enc, 1), "score_seconds": round(time.perf_counter() - t0, 1)}
        record["snapshots"].append(snap)
        v = snap["val"]
        print(f"epoch {snap['epochs_done']:.2f}: train held-out {snap['train_heldout_psnr']:.2f} dB; val "
              + ", ".join(f"{m} {v[m]['psnr']:.2f}" for m in v)
              + f"; cos within {within:.3f} between {between:.3f} ({snap['score_seconds']:.0f} s)", flush=True)
        save(record, args.out)
        t_train[0] = time.perf_counter()

    result = train_decoder(train, template, config, backend=backend, device=dev, checkpoint=work, callback=on_step)
    record["train_seconds"] = round(result.seconds, 1)
    record["final"] = {"train_psnr": float(result.train_psnr.mean()), "heldout_psnr": float(result.heldout_psnr.mean())}
    choose(record)
    if args.checkpoint_into_run:
        result.save(run)
    save(record, args.out)


if __name__ == "__main__":
    main()
