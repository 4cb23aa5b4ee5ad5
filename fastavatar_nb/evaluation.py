"""The paper's single-image protocol (section 4): one view in, the other views scored.

For a test subject with C views, a method predicts a head from **one** input view; the head is
rendered at the remaining C - 1 views and compared with the ground truth; this is repeated with
each view as the input. :func:`novel_view_metrics` scores a batch of such predictions of one
subject over the **whole image on white**, as the authors score them (PSNR, SSIM, MAE, LPIPS where
its weights exist), then over the head alone (the foreground above the collar line,
:func:`~fastavatar_nb.objective.head_region`; a secondary score named ``*_head``), and, where asked,
by **identity similarity**: the cosine between FaceNet embeddings of each rendered view and of the
photo of that view (:func:`fastavatar_nb.faces.identity_similarity`). Ground truth is used here
only: the methods scored never see it.

Several methods (the template, the feed-forward prediction, the refined one, and the trivial
baselines of :data:`BASELINES` that every learned head is reported beside) are scored
together with :func:`protocol_rows` (one row per method and input view), averaged with
:func:`summarize` and kept per subject in the run folder's ``eval/`` as JSON
(:func:`save_rows` / :func:`load_rows`), so an interrupted evaluation resumes subject by subject.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_write_text
from .cameras import Cameras
from .data.subject import MultiViewSubject
from .gaussians import Gaussians
from .objective import HOLDOUT_VIEW, evaluate_views, head_region
from .render import Backend, render

__all__ = ["EVAL_DIR", "PAPER_TABLE1", "BASELINES", "LEARNED", "results_markdown", "input_views", "cosine_within_between",
           "identity_scorer", "novel_view_metrics", "protocol_rows", "summarize", "save_rows", "load_rows", "file_digest",
           "protocol_dir", "facenet_nearest", "render_retrieval", "baseline_losses", "metric_key", "quality_vs_time",
           "FACENET_METHODS", "PAPER_FIG4", "group_scores"]

EVAL_DIR = "eval"
"""Folder of evaluation results in a run folder."""
_FORMAT = "fastavatar-nb protocol rows"

BASELINES: tuple[str, ...] = ("template", "mean code", "FaceNet nearest", "render retrieval")
"""The protocol's trivial baselines, reported beside every learned head (:func:`run_protocol`):

- ``template``: the average head of notebook 02, whoever is in the photo;
- ``mean code``: the decoder at the mean of the training subjects' codes ``w``;
- ``FaceNet nearest``: the code of the training subject whose photo from the same camera is nearest
  to the input photo in FaceNet space (:func:`facenet_nearest`);
- ``render retrieval``: every training subject's decoded head rendered at the input camera, and the one
  whose render is nearest to the photo kept (:func:`render_retrieval`; it uses the photo and its
  camera, as refinement does)."""
LEARNED: tuple[str, ...] = ("feed-forward", "refined")
"""FastAvatar's own heads in the protocol: the encoder's single pass and its test-time refinement."""
FACENET_METHODS: tuple[str, ...] = ("FaceNet nearest", "feed-forward", "refined")
"""Methods that start from the photo's FaceNet embedding: their time per head includes MTCNN and FaceNet
(the paper's encoder g includes the face network g_FR). So does every ``"refined (N steps)"`` variant."""


def input_views(found: Tensor, limit: int | None = None, first: int = HOLDOUT_VIEW) -> list[int]:
    """The input views of one test subject in the protocol: every view with a detected face, or at most
    ``limit`` of them: ``first`` (the frontal camera 8) when it has a face, then views spread evenly
    over the rest of the rig.

    Args:
        found: ``[C]`` bool, whether MTCNN found the face in each view.
        limit: at most this many views (``None``: all of them); a preset's ``evaluation.input_views``.
    """
    ok = [v for v in range(len(found)) if bool(found[v])]
    if limit is None or len(ok) <= limit:
        return ok
    if limit < 1:
        raise ValueError(f"input_views: limit must be >= 1 or None, got {limit}")
    head = [first] if first in ok else []
    rest = [v for v in ok if v != first]
    k = limit - len(head)
    picks = [rest[round(i * (len(rest) - 1) / max(1, k - 1))] for i in range(k)] if k > 1 else rest[:k]
    return sorted(head + picks)


def cosine_within_between(vectors: Tensor, found: Tensor) -> tuple[float, float]:
    """Mean cosine similarity of the vectors of one subject's views (pairs of different views) and of
    different subjects (every pair across subjects): does a code or embedding say *who*, whatever the view?

    Args:
        vectors: ``[S, C, D]`` one vector per subject and view (FaceNet embeddings, encoder codes).
        found: ``[S, C]`` bool, the views to use (e.g. where a face was found).

    Returns:
        ``(within, between)``; ``between`` is NaN with one subject, ``within`` with one view each.
    """
    if vectors.ndim != 3 or found.shape != vectors.shape[:2]:
        raise ValueError(f"cosine_within_between: need vectors [S, C, D] and found [S, C], got "
                         f"{tuple(vectors.shape)} and {tuple(found.shape)}")
    found = found.to(vectors.device).bool()
    v = torch.nn.functional.normalize(vectors[found], dim=-1)
    who = torch.arange(vectors.shape[0], device=vectors.device)[:, None].expand_as(found)[found]
    cos = v @ v.T
    same = who[:, None] == who[None, :]
    within = cos[same & ~torch.eye(len(who), dtype=torch.bool, device=cos.device)]
    between = cos[~same]
    return (float(within.mean()) if within.numel() else float("nan"),
            float(between.mean()) if between.numel() else float("nan"))


def identity_scorer(subject: MultiViewSubject, net: torch.nn.Module,
                    mtcnn=None) -> Callable[[Tensor, list[int]], Tensor]:
    """Identity similarity against one subject's photos, for :func:`novel_view_metrics`.

    MTCNN and FaceNet run on the subject's photos once (:func:`fastavatar_nb.faces.truth_faces`);
    the returned ``score(renders [1, v, H, W, 3], views) -> [1, v]`` then embeds only the renders, at
    the photos' face boxes (:func:`fastavatar_nb.faces.identity_similarity`): NaN where MTCNN found
    no face in a photo.
    """
    from . import faces

    truth = faces.truth_faces(subject.images, net, mtcnn)

    def score(renders: Tensor, views: list[int]) -> Tensor:
        if renders.shape[0] != 1:
            raise ValueError(f"identity_scorer: renders of one head [1, v, H, W, 3], got {tuple(renders.shape)}")
        idx = torch.tensor(views)
        sub = dataclasses.replace(truth, boxes=truth.boxes[idx], embeddings=truth.embeddings[idx],
                                  found=truth.found[idx])
        return faces.identity_similarity(renders[0], net=net, truth_faces=sub)[None]

    return score


@torch.no_grad()
def novel_view_metrics(subject: MultiViewSubject, heads: Gaussians, input_views: Sequence[int],
                       backend: Backend = "auto", with_lpips: bool = False,
                       identity: Callable[[Tensor, list[int]], Tensor] | None = None) -> dict[str, Tensor]:
    """Score heads predicted from single views of one subject on all of its other views.

    Args:
        subject: the subject (its images, masks and cameras, on the heads' device).
        heads: ``[V, K, ...]``: head ``j`` was predicted from view ``input_views[j]``.
        input_views: ``V`` view indices.
        backend: renderer backend.
        with_lpips: also LPIPS (whole image); raises
            :class:`~fastavatar_nb.metrics.LpipsUnavailableError` where its weights are missing
            (check :func:`~fastavatar_nb.metrics.lpips_available` first).
        identity: :func:`identity_scorer` of ``subject`` for an ``"identity"`` entry.

    Returns:
        ``{"psnr", "ssim", "mae"}`` (whole image on white), ``{"psnr_head", "ssim_head", "mae_head"}``
        (the head region) and, if asked, ``"lpips"`` and ``"identity"``: each ``[V]``, for each head
        the mean over the ``C - 1`` views other than its input view (identity: over those of them
        whose photo has a detected face).
    """
    views = _check_views(subject, heads, input_views, "novel_view_metrics")
    cams = Cameras(subject.cameras.viewmats[None], subject.cameras.Ks[None], subject.width, subject.height)  # [1, C]
    head = head_region(subject.masks, subject.cameras)[None]
    out: dict[str, list[Tensor]] = {}
    for j, v in enumerate(views):
        others = [c for c in range(subject.num_views) if c != v]
        m = evaluate_views(heads[j:j + 1], subject.images[None], cams, others, head, backend, with_lpips=with_lpips,
                           identity=identity)
        for k, x in m.items():
            out.setdefault(k, []).append(x.nanmean() if k == "identity" else x.mean())
    return {k: torch.stack(v) for k, v in out.items()}


def _check_views(subject: MultiViewSubject, heads: Gaussians, input_views: Sequence[int], caller: str) -> list[int]:
    views = [int(v) for v in input_views]
    if heads.batch_shape != (len(views),):
        raise ValueError(f"{caller}: need heads [V, K] for V={len(views)} input views, got batch shape "
                         f"{tuple(heads.batch_shape)}")
    bad = [v for v in views if not 0 <= v < subject.num_views]
    if bad:
        raise ValueError(f"{caller}: input views {bad} do not exist ({subject.subject_id} has "
                         f"{subject.num_views} views)")
    return views


def protocol_rows(subject: MultiViewSubject, heads: Mapping[str, Gaussians], input_views: Sequence[int],
                  backend: Backend = "auto", seconds: Mapping[str, Tensor | Sequence[float]] | None = None,
                  with_lpips: bool = False,
                  identity: Callable[[Tensor, list[int]], Tensor] | None = None) -> list[dict[str, Any]]:
    """Score several methods' heads of one subject with the protocol: one row per method and input view.

    Args:
        subject: the subject; heads: ``{method: Gaussians [V, K]}``, head ``j`` predicted from
            view ``input_views[j]`` (a method that ignores the input, like the template, repeats
            one head).
        seconds: optional ``{method: [V]}`` time each head took to make.
        with_lpips, identity: see :func:`novel_view_metrics`.

    Returns:
        Rows ``{"subject", "method", "input_view", "psnr", "ssim", "mae", "psnr_head", "ssim_head",
        "mae_head"[, "lpips"][, "identity"][, "seconds"]}`` (floats), method-major; ``identity`` is left
        out of a row where none of its views' photos has a detected face.
    """
    views = list(input_views)
    rows = []
    for method, h in heads.items():
        m = novel_view_metrics(subject, h, views, backend, with_lpips=with_lpips, identity=identity)
        t = None if seconds is None or method not in seconds else [float(x) for x in seconds[method]]
        if t is not None and len(t) != len(views):
            raise ValueError(f"protocol_rows: seconds[{method!r}] has {len(t)} entries for {len(views)} input views")
        for j, v in enumerate(views):
            row: dict[str, Any] = {"subject": subject.subject_id, "method": method, "input_view": int(v),
                                   **{k: float(x[j]) for k, x in m.items() if math.isfinite(float(x[j]))}}
            if t is not None:
                row["seconds"] = t[j]
            rows.append(row)
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of every numeric column per method (methods in order of appearance).

    Each subject weighs the same, whatever its number of input views: the mean over a subject's
    input views first, then over subjects (as the paper averages over test identities). A column
    a method lacks (e.g. ``seconds`` of the template) is left out of its entry; ``n`` counts rows.
    """
    out: dict[str, dict[str, float]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        keys = [k for k, v in mine[0].items() if isinstance(v, (int, float)) and k != "input_view"]
        per_subject: dict[str, list[Mapping[str, Any]]] = {}
        for r in mine:
            per_subject.setdefault(r["subject"], []).append(r)
        entry = {}
        for k in keys:
            means = [sum(float(r[k]) for r in rs) / len(rs) for rs in per_subject.values() if all(k in r for r in rs)]
            if means:
                entry[k] = sum(means) / len(means)
        entry["n"] = float(len(mine))
        out[method] = entry
    return out


PAPER_FIG4: dict[str, tuple[float, float]] = {
    "FastAvatar, single pass": (0.010, 21.26),
    "FastAvatar, full": (3.0, 24.09),
    "GAGAvatar": (0.015, 12.85),
    "GaussianAvatars": (3600.0, 16.39),
}
"""Points of the paper's Fig. 4 that its text gives as numbers: ``{method: (seconds per head, PSNR)}``
(section 4.2 and the caption: 21.26 dB "in 10ms", 24.09 dB "in 3 seconds" (the text says "roughly 10
seconds"), GAGAvatar 12.85 dB "at 15 ms", GaussianAvatars 16.39 dB "at 1 hour"; one A100, 550x802)."""

PAPER_TABLE1: dict[str, dict[str, float]] = {
    "feed-forward": {"psnr": 21.26, "ssim": 0.90, "lpips": 0.20, "mae": 0.03},
    "refined": {"psnr": 24.09, "ssim": 0.92, "lpips": 0.18, "mae": 0.02},
}
"""The paper's Table 1 for FastAvatar (single-pass and full): whole image on white, NeRSemble test subjects."""


def results_markdown(table: Mapping[str, Mapping[str, float]],
                     paper: Mapping[str, Mapping[str, float]] = PAPER_TABLE1) -> str:
    """A Markdown table of :func:`summarize`'s ``table``: whole-image PSNR, SSIM, MAE, LPIPS, identity,
    head-region PSNR, time per head, and the paper's PSNR / SSIM for the methods it reports. A learned
    method that scores below a baseline says so in its row (:func:`baseline_losses`).

    A column a method lacks reads "not measured" (LPIPS), "-" (time) or "nan" (identity)."""
    lines = ["| method | PSNR (dB) | SSIM | MAE | LPIPS | identity | head PSNR (dB) | time per head | paper PSNR / SSIM |",
             "|---|---|---|---|---|---|---|---|---|"]
    losses = baseline_losses(table)
    for method, m in table.items():
        secs = m.get("seconds")
        when = "-" if secs is None else (f"{secs * 1000:.1f} ms" if secs < 1 else f"{secs:.1f} s")
        lpips = f"{m['lpips']:.3f}" if "lpips" in m else "not measured"
        ref = paper.get(method)
        ref_s = f"{ref['psnr']:.2f} / {ref['ssim']:.2f}" if ref else "-"
        name = method + (f" (**loses to** {'; '.join(losses[method])})" if losses.get(method) else "")
        lines.append(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['mae']:.4f} | {lpips} | "
                     f"{m.get('identity', float('nan')):.3f} | {m['psnr_head']:.2f} | {when} | {ref_s} |")
    return "\n".join(lines)


def metric_key(method: str) -> str:
    """A method's name as a metric-name prefix: ``"FaceNet nearest"`` -> ``"facenet_nearest"``."""
    return re.sub(r"[^0-9a-z]+", "_", method.lower()).strip("_")


def baseline_losses(table: Mapping[str, Mapping[str, float]], learned: Sequence[str] = LEARNED) -> dict[str, list[str]]:
    """For each learned method of ``table`` (:func:`summarize`'s), the baselines (every other method) it
    scores below on whole-image PSNR or SSIM, with the margins: ``{"feed-forward": ["render retrieval
    (PSNR -1.69 dB)"]}``; an empty list where it beats them all."""
    out: dict[str, list[str]] = {}
    baselines = [b for b in table if b not in learned]
    for method in (m for m in table if m in learned):
        r, losses = table[method], []
        for b in baselines:
            worse = []
            for key, unit, fmt in (("psnr", " dB", "+.2f"), ("ssim", "", "+.3f")):
                mine, theirs = r.get(key), table[b].get(key)
                if mine is not None and theirs is not None and mine < theirs:
                    worse.append(f"{key.upper()} {mine - theirs:{fmt}}{unit}")
            if worse:
                losses.append(f"{b} ({', '.join(worse)})")
        out[method] = losses
    return out


@torch.no_grad()
def facenet_nearest(embeddings: Tensor, views: Sequence[int], train_embeddings: Tensor, train_found: Tensor) -> Tensor:
    """The ``FaceNet nearest`` baseline: for each input photo, the training subject whose photo from the
    same camera is nearest in FaceNet space (largest cosine).

    Args:
        embeddings: ``[V, 512]`` FaceNet embeddings of the input photos, taken at cameras ``views``.
        train_embeddings, train_found: ``[N, C, 512]`` and ``[N, C]`` of the training subjects' views.

    Returns:
        ``[V]`` training-subject indices. A training subject without a face at that camera is compared
        by the mean of its embeddings over the views with one; a subject without any face is never picked.

    Raises:
        ValueError: no training subject has a face in any view, or the shapes disagree.
    """
    if embeddings.ndim != 2 or train_embeddings.ndim != 3 or train_found.shape != train_embeddings.shape[:2] \
            or len(views) != len(embeddings) or embeddings.shape[-1] != train_embeddings.shape[-1]:
        raise ValueError(f"facenet_nearest: need embeddings [V, D] for V views, train_embeddings [N, C, D] and "
                         f"train_found [N, C]; got {tuple(embeddings.shape)}, {len(views)} views, "
                         f"{tuple(train_embeddings.shape)} and {tuple(train_found.shape)}")
    found = train_found.to(train_embeddings.device).bool()
    if not found.any():
        raise ValueError("facenet_nearest: no training subject has a detected face in any view")
    # views without a face hold NaN (encoder.dataset_embeddings): zero them before anything sums or compares them
    unit = torch.nn.functional.normalize(train_embeddings.float().nan_to_num(0.0), dim=-1) * found[..., None]
    mean = torch.nn.functional.normalize(unit.sum(1), dim=-1)                                  # [N, D]
    picks = []
    for e, v in zip(embeddings, views, strict=True):
        at_v = torch.where(found[:, v, None], unit[:, v], mean)                                # [N, D]
        cos = at_v @ torch.nn.functional.normalize(e.float().to(unit.device), dim=-1)
        picks.append(int(cos.nan_to_num(-math.inf).masked_fill(~found.any(1), -math.inf).argmax()))
    return torch.tensor(picks, dtype=torch.long)


@torch.no_grad()
def render_retrieval(avatars, photos: Tensor, cameras: Cameras, backend: Backend = "auto",
                     chunk: int = 32) -> tuple[Tensor, Tensor]:
    """The ``render retrieval`` baseline: every training subject's decoded head rendered at each input
    camera (on white), and the subject whose render is nearest to the input photo (mean squared error over
    the whole image) kept. It sees what refinement sees: the photo and its camera.

    Args:
        avatars: the trained decoder (:class:`~fastavatar_nb.decoder.DecoderResult`): its ``codes`` are the
            candidates, decoded ``chunk`` at a time.
        photos: ``[V, H, W, 3]`` the input photos; cameras: their ``V`` cameras.

    Returns:
        ``(indices [V], mse [V])``: the nearest training subject per photo and its error.
    """
    if photos.ndim != 4 or cameras.batch_shape != (len(photos),):
        raise ValueError(f"render_retrieval: need photos [V, H, W, 3] and V cameras, got {tuple(photos.shape)} "
                         f"and cameras of batch shape {tuple(cameras.batch_shape)}")
    cams = Cameras(cameras.viewmats[None], cameras.Ks[None], cameras.width, cameras.height)   # [1, V]
    errors = []
    for i in range(0, len(avatars.codes), chunk):
        heads = avatars.decode(avatars.codes[i:i + chunk])                                     # [n, K]
        out = render(heads, cams, background=1.0, backend=backend).colors.clamp(0, 1)         # [n, V, H, W, 3]
        errors.append(((out - photos[None].to(out.device)) ** 2).mean((-3, -2, -1)))          # [n, V]
    err = torch.cat(errors)                                                                    # [N, V]
    best = err.min(0)
    return best.indices.cpu(), best.values.cpu()


def quality_vs_time(rows: Sequence[Mapping[str, Any]], face_seconds: float,
                    view: int = HOLDOUT_VIEW) -> dict[str, tuple[float, float]]:
    """The points of the paper's Fig. 4: ``{method: (seconds per head, whole-image PSNR)}`` over the protocol
    rows whose input photo is camera ``view`` (means over subjects, :func:`summarize`).

    A method's time is its rows' ``seconds`` (0 where it records none: the template and the mean code do no
    work per photo), plus ``face_seconds`` (MTCNN and FaceNet on one photo) for the :data:`FACENET_METHODS`
    and every method whose name starts with ``"refined"``.

    Raises:
        ValueError: no row has camera ``view`` as its input.
    """
    mine = [r for r in rows if r["input_view"] == view]
    if not mine:
        raise ValueError(f"quality_vs_time: no protocol row has camera {view} as its input photo")
    out = {}
    for method, entry in summarize(mine).items():
        face = face_seconds if method in FACENET_METHODS or method.startswith("refined") else 0.0
        out[method] = (entry.get("seconds", 0.0) + face, entry["psnr"])
    return out


def group_scores(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str], methods: Sequence[str],
                 key: str = "psnr", interval: float = 0.9, resamples: int = 2000,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """Scores per group of test subjects, with a bootstrap interval over the subjects of each group.

    Args:
        rows: protocol rows (:func:`protocol_rows`); labels: ``{subject id: group label}`` (a subject
            without a label is left out); methods: the methods to score; key: the column (``"psnr"``).
        interval: the central fraction of the bootstrap distribution reported (0.9: the 5th to 95th
            percentile of the group mean, resampling its subjects with replacement ``resamples`` times).

    Returns:
        ``{label: {"subjects": n, method: mean, method + "_interval": (low, high)}}``, labels sorted; each
        subject weighs the same (its mean over its input photos first, as :func:`summarize`).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, Any]] = {}
    for label in sorted(set(labels.values())):
        subjects = sorted(s for s, lab in labels.items() if lab == label)
        entry: dict[str, Any] = {"subjects": len(subjects)}
        for method in methods:
            per = [[float(r[key]) for r in rows if r["subject"] == s and r["method"] == method and key in r]
                   for s in subjects]
            means = torch.tensor([sum(v) / len(v) for v in per if v], dtype=torch.float64)
            if not len(means):
                continue
            boot = means[torch.randint(len(means), (resamples, len(means)), generator=gen)].mean(1)
            lo, hi = torch.quantile(boot, torch.tensor([(1 - interval) / 2, (1 + interval) / 2], dtype=torch.float64))
            entry[method], entry[f"{method}_interval"] = float(means.mean()), (float(lo), float(hi))
        out[label] = entry
    return out


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (to tell which model made a result)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def protocol_dir(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """``run_dir/eval/protocol-<key>``: where the protocol results of the models and settings in
    ``meta`` (JSON-serialisable: model digests, configs) go; ``key`` is a hash of ``meta``, so
    results of other models never collide or get overwritten."""
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    return Path(run_dir) / EVAL_DIR / f"protocol-{key}"


def save_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
              overwrite: bool = False) -> Path:
    """Write protocol rows and what made them (``meta``: configs, model digests, ...) as JSON."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    for r in rows:
        bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"save_rows: row {dict(r)} has non-finite {bad}")
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps({"format": _FORMAT, "meta": dict(meta), "rows": [dict(r) for r in rows]},
                                    indent=1))
    return p


def load_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, meta)`` of a file :func:`save_rows` wrote.

    Raises:
        FileNotFoundError: no such file; ValueError: not a file of protocol rows.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no protocol results at {p}; notebook 07 (evaluation) writes them")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not readable JSON ({e}); delete it to evaluate again") from e
    if not isinstance(d, dict) or d.get("format") != _FORMAT:
        raise ValueError(f"{p} is not a file of protocol rows (format {d.get('format') if isinstance(d, dict) else d!r})")
    return d["rows"], d["meta"]


def feed_forward(encoder, avatars, embeddings: Tensor, photos: Tensor | None = None) -> tuple[Tensor, Gaussians, Tensor]:
    """One photo's face embedding -> code -> Gaussians, for each of ``embeddings [V, 512]``, timed one by one
    (``photos [V, H, W, 3]``: the photos themselves, for an encoder that reads them).

    Returns ``(codes [V, L], heads [V, K], seconds [V])``; the time covers the encoder and the decoder
    (synchronised on CUDA), not FaceNet's crop and embedding, which notebook 07 times on its own.
    """
    codes, heads, secs = [], [], []
    for j, e in enumerate(embeddings):
        t0 = time.perf_counter()
        codes.append(encoder.encode(e[None], None if photos is None else photos[j:j + 1])[0])
        heads.append(avatars.decode(codes[-1]))
        if codes[-1].device.type == "cuda":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
    return torch.stack(codes), Gaussians.stack(heads), torch.tensor(secs)


def run_protocol(subjects: Sequence[MultiViewSubject], embeddings: Tensor, found: Tensor, avatars, encoder,
                 refine_config, folder: str | os.PathLike, meta: Mapping[str, Any], *, backend: Backend = "auto",
                 input_view_limit: int | None = None, with_lpips: bool = False, net: torch.nn.Module | None = None,
                 mtcnn=None, train_embeddings: tuple[Tensor, Tensor] | None = None,
                 log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict]:
    """The paper's protocol over test subjects, for the feed-forward and the refined head beside the
    :data:`BASELINES`.

    For each subject: its input views (:func:`input_views` of the views with a face), the feed-forward
    heads (:func:`feed_forward`), one refinement per input view
    (:func:`fastavatar_nb.refine.refine_views`), the baselines' heads, then :func:`protocol_rows` on the
    other views; the rows are saved to ``folder/<subject>.json`` with ``meta``, and a subject whose file
    exists is read back instead of being run again (an interrupted evaluation resumes). The rows of the
    two nearest-subject baselines name the training subject they picked (``"picked"``).

    Args:
        subjects: the test subjects (moved to the decoder's device here).
        embeddings, found: ``[T, C, 512]`` face embeddings of their views and ``[T, C]`` whether a face was found.
        avatars, encoder, refine_config: the trained decoder and encoder, the refinement settings.
        folder, meta: where rows go (:func:`protocol_dir`) and what made them.
        input_view_limit: at most this many input views per subject (``None``: every view with a face).
        net, mtcnn: FaceNet and MTCNN for the identity column (``net=None``: no identity column).
        train_embeddings: ``([N, C, 512], [N, C])`` FaceNet embeddings of the training subjects' views (in
            the order of ``avatars.subject_ids``) and where a face was found, for the ``FaceNet nearest``
            baseline (``None``: no such row).
        log: where the "reusing ..." lines go.

    Returns:
        ``(rows, refined_heads)``: every row, and ``{(subject_id, input view): refined head}`` of the
        subjects run now (not of those read back).
    """
    from .refine import refine_views

    device = avatars.template.means.device
    if train_embeddings is not None and train_embeddings[0].shape[0] != len(avatars.subject_ids):
        raise ValueError(f"run_protocol: train_embeddings has {train_embeddings[0].shape[0]} subjects, the decoder "
                         f"{len(avatars.subject_ids)} training subjects")
    mean_code_head = avatars.decode(avatars.codes.mean(0))
    rows: list[dict[str, Any]] = []
    refined_heads: dict = {}
    for t, subject in enumerate(subjects):
        s = subject.to(device)
        path = Path(folder) / f"{s.subject_id}.json"
        if path.exists():
            rows += load_rows(path)[0]
            log(f"{s.subject_id}: reusing {path}")
            continue
        views = input_views(found[t], input_view_limit)
        codes, ff_heads, ff_secs = feed_forward(encoder, avatars, embeddings[t, views], s.images[views])
        ref_heads, ref_secs = refine_views(avatars, s, codes, views, refine_config, backend)
        refined_heads.update({(s.subject_id, v): ref_heads[j] for j, v in enumerate(views)})
        heads = {"template": Gaussians.stack([avatars.template] * len(views)),
                 "mean code": Gaussians.stack([mean_code_head] * len(views))}
        seconds = {"feed-forward": ff_secs, "refined": ff_secs + ref_secs}
        picked: dict[str, Tensor] = {}
        if train_embeddings is not None:
            picked["FaceNet nearest"] = facenet_nearest(embeddings[t, views], views, *train_embeddings)
        t0 = time.perf_counter()
        picked["render retrieval"] = render_retrieval(avatars, s.images[views], s.cameras[views], backend)[0]
        seconds["render retrieval"] = torch.full((len(views),), (time.perf_counter() - t0) / len(views))
        for name, idx in picked.items():
            heads[name] = avatars.decode(avatars.codes[idx.to(avatars.codes.device)])
        heads.update({"feed-forward": ff_heads, "refined": ref_heads})
        subject_rows = protocol_rows(s, heads, views, backend, seconds=seconds, with_lpips=with_lpips,
                                     identity=None if net is None else identity_scorer(s, net, mtcnn))
        for row in subject_rows:
            if row["method"] in picked:
                row["picked"] = avatars.subject_ids[int(picked[row["method"]][views.index(row["input_view"])])]
        save_rows(path, subject_rows, meta)
        rows += subject_rows
    return rows, refined_heads
