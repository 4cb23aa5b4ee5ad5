"""Feed-forward from every input view with a face, on a run's test subjects, beside the template and render retrieval.

Notebook 07 refines one head per input photo, so the course preset scores two input photos per test subject
(``preset.evaluation.input_views``: camera 8 and a side camera). The feed-forward issue's goals name *every* input view
with a face; refinement aside, that is cheap. For each test subject and each view in which MTCNN finds a face: the
run's encoder (and, with ``--paper-encoder FILE``, a second encoder file, e.g. the paper's FaceNet-only encoder on
the same decoder) -> decoder -> head (and the cosine of its codes within and between subjects), the template,
and render retrieval (every decoded training head rendered at
the photo's camera, the nearest kept), each scored on the 15 other views, whole image on white (notebook 07's
``protocol_rows`` and ``summarize``). Nothing is chosen from these numbers.

    FASTAVATAR_RUN_DIR=runs/course python benchmarks/every_view.py --paper-encoder runs/course/encoder_paper_48ep.safetensors

Writes ``benchmarks/results/cpu-2core/every_view_course.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import torch
from _record import RESULTS, provenance, save
from decoder_capacity import retrieve_inputs

import fastavatar_nb as fa
import fastavatar_nb.presets  # noqa: F401
from fastavatar_nb import pipeline
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.decoder import DecoderResult
from fastavatar_nb.encoder import ENCODER_FILE, EncoderResult
from fastavatar_nb.evaluation import (
    cosine_within_between,
    input_views,
    protocol_rows,
    summarize,
)
from fastavatar_nb.gaussians import Gaussians


def load_encoder_file(path: Path, device) -> EncoderResult:
    """An encoder from a file of any name (``EncoderResult.load`` reads ``encoder.safetensors`` in a folder)."""
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(path, Path(d) / ENCODER_FILE)
        return EncoderResult.load(d, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="course")
    ap.add_argument("--paper-encoder", type=Path, default=None,
                    help="a second encoder file scored beside the run's (its row: 'feed-forward, <file name>')")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu-2core" / "every_view_course.json")
    args = ap.parse_args()

    preset = fa.presets.get(args.preset)
    run, dev, backend = preset.run_dir, preset.torch_device, preset.backend
    test = SubjectDataset(run / "dataset", "test")
    subjects = [test[t] for t in range(len(test))]
    emb, found = pipeline.ensure_embeddings(preset, test)
    avatars = DecoderResult.load(run, device=dev)
    encoders = {"feed-forward": EncoderResult.load(run, device=dev)}
    if args.paper_encoder is not None:
        encoders[f"feed-forward, {args.paper_encoder.name}"] = load_encoder_file(args.paper_encoder, dev)
    inputs = [(t, v) for t in range(len(test)) for v in input_views(found[t], None)]
    t0 = time.perf_counter()
    picked = retrieve_inputs(avatars, subjects, inputs, backend)
    retrieval_s = time.perf_counter() - t0
    cosines = {}
    for name, enc in encoders.items():  # the codes of one subject's photos against another's (every view with a face)
        codes = torch.zeros(*found.shape, avatars.codes.shape[1])
        for t, s in enumerate(subjects):
            vs = input_views(found[t], None)
            if vs:
                codes[t, vs] = enc.encode(emb[t, vs], s.images[vs]).cpu()
        within, between = cosine_within_between(codes, found.cpu())
        cosines[name] = {"within": within, "between": between}
    rows = []
    for t, s in enumerate(subjects):
        vs = input_views(found[t], None)
        if not vs:
            continue
        heads = {"template": Gaussians.stack([avatars.template] * len(vs)),
                 "render retrieval": avatars.decode(avatars.codes[torch.tensor([picked[(t, v)] for v in vs])])}
        for name, enc in encoders.items():
            heads[name] = avatars.decode(enc.encode(emb[t, vs], s.images[vs]))
        rows += protocol_rows(s, heads, vs, backend)
    table = summarize(rows)
    record = {**provenance("feed-forward from every input view", torch.device(dev), "not used"),
              "run": str(run), "test_subjects": len(test), "input_photos": len(inputs),
              "render_retrieval_seconds": round(retrieval_s, 1),
              "encoders": {name: enc.config.to_json() for name, enc in encoders.items()},
              "code_cosine": cosines,
              "table": {m: {k: v for k, v in r.items() if isinstance(v, (int, float))} for m, r in table.items()}}
    save(record, args.out)
    print(json.dumps({m: round(r["psnr"], 2) for m, r in table.items()}))


if __name__ == "__main__":
    main()
