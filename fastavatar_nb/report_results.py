"""What a run found, read from its metrics: the headline table, one outcome per stage, figure captions.

:func:`fastavatar_nb.report.write_report` lays these out; this module only computes them, from the
plain data of a run folder (``metrics/*.json`` as ``{notebook stem: {name: number}}`` and
``preset.json`` as a dict), so each piece is tested on a few numbers.

- :func:`headline_rows`: the whole-image scores on white of notebook 07 (the paper's protocol on the
  test subjects) for the template, any other baseline the run recorded, the feed-forward and the
  refined head; the paper's Table 1 (:data:`fastavatar_nb.evaluation.PAPER_TABLE1`); and the shipped
  course checkpoint's run (:mod:`fastavatar_nb.checkpoints`). A learned method that scores below a
  baseline of the same run is marked.
- :func:`stage_outcomes`: one sentence per notebook, e.g. ``"fits: 30.7 dB on the held-out camera
  (10 subjects) ..."``.
- :func:`scale_note` and :func:`real_data_note`: what a run of this size can and cannot show.
- :func:`metric_unit` / :func:`format_metric`: a metric's unit, from its name, and its value rounded to
  what it means.
- :func:`figure_caption`: the caption of a figure a notebook saves (by its file stem).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from .checkpoints import METRICS_FILE, PRESET_FILE, shipped_dir
from .evaluation import BASELINES, PAPER_TABLE1, baseline_losses, metric_key
from .evaluation import LEARNED as LEARNED_METHODS
from .presets import base

__all__ = ["Score", "Course", "STAGE_TITLES", "FIGURE_CAPTIONS", "EVALUATION", "LEARNED", "GENERALISES_FROM",
           "load_course", "headline_rows", "source_label", "train_subjects", "baselines_note", "stage_outcomes",
           "scale_note", "real_data_note", "metric_unit", "format_metric", "figure_caption", "stage_title"]

Metrics = Mapping[str, Mapping[str, float]]
"""``{notebook stem: {metric name: number}}``, as :func:`fastavatar_nb.report.collect_metrics` returns."""

EVALUATION = "07_evaluation"
"""The notebook whose metrics make the headline table (``<method>_psnr``, ``<method>_ssim``, ...)."""

LEARNED: tuple[str, ...] = tuple(metric_key(m) for m in LEARNED_METHODS)
"""Method prefixes of notebook 07's metric names that are FastAvatar's learned heads; every other method
it records (``template``, ``mean_code``, ``facenet_nearest``, ``render_retrieval``) is a baseline."""

_BASELINE_ORDER = ("template", "mean_code", "facenet_nearest", "render_retrieval")

STAGE_TITLES: dict[str, str] = {
    "00": "Data",
    "01": "3D Gaussian splatting basics",
    "02": "Per-subject fits and the template",
    "03": "Auto-decoder",
    "04": "Encoder: the feed-forward head",
    "05": "Latent editing",
    "06": "Test-time refinement",
    "07": "Evaluation on unseen test subjects",
    "08": "Your photo",
}
"""Section titles of the report, by notebook number."""

FIGURE_CAPTIONS: dict[str, str] = {
    "00_views": "One training subject's 16 camera views with their masks, on white: what every later stage sees.",
    "01_image_fit": "A set of Gaussians fitted to one image: start, after the fit, target and the error (0 to 0.1).",
    "01_head_views": "A head of Gaussians made from a subject's 3D points (fitted to the photos only on a GPU), "
                     "rendered from five cameras (top) beside the subject's photos (bottom).",
    "01_orbit_view": "The orbit viewer's first frame of the head.",
    "02_before_after": "Per-subject fits at the held-out camera 8: ground truth, the initial Gaussians, the fit "
                       "(its PSNR) and the error.",
    "02_template_vs_subjects": "The template (the average head) against training subjects at camera 8: "
                               "how far the template is from each, and how far each subject's own fit is.",
    "03_decoded_subjects": "The decoder's heads of its training subjects at the held-out camera 8, beside the "
                           "photo, the template and the subject's own fit.",
    "03_interpolation": "Decoded heads along the straight line between two training subjects' codes.",
    "04_feed_forward": "Feed-forward heads of unseen validation subjects: one photo in (camera 8), three other "
                       "cameras predicted (bottom) against their photos (top).",
    "05_interpolation": "Latent interpolation between two subjects, from two cameras.",
    "05_attribute_edits": "Attribute edits: a subject's code moved along each attribute direction (in standard "
                          "deviations of the training codes).",
    "06_refinement": "Test-time refinement of a validation subject: photos, the feed-forward head and the refined "
                     "head at the input camera and three others.",
    "06_refinement_curves": "Refinement curves: PSNR on the input photo and on the other views, step by step.",
    "07_methods": "Unseen test subjects: the input photo (camera 8), the photo at camera 2, and camera 2 rendered "
                  "from the template, the feed-forward head and the refined head.",
}
"""Captions of the figures the notebooks save (``<run>/figures/<stem>.png``), by stem."""


def stage_title(number: str) -> str:
    """``"02"`` -> ``"Per-subject fits and the template"`` (``"Notebook NN"`` for an unknown number)."""
    return STAGE_TITLES.get(number, f"Notebook {number}")


def figure_caption(stem: str) -> str:
    """The caption of the figure ``<stem>.png``; a figure no notebook is known to save gets its name,
    in words, and the stage it belongs to."""
    if stem in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[stem]
    number, _, rest = stem.partition("_")
    words = (rest if number.isdigit() and rest else stem).replace("_", " ").replace("-", " ")
    where = f" (notebook {number}: {stage_title(number).lower()})" if number.isdigit() and rest else ""
    return f"{words[:1].upper()}{words[1:]}{where}."


# ----------------------------------------------------------------------------- metric names and units
Kind = Literal["psnr", "ssim", "lpips", "mae", "cosine", "percent", "ms", "s", "mm", "deg", "px", "ratio", "flag",
               "count", "number"]

_UNITS: dict[str, str] = {"psnr": "dB", "percent": "%", "ms": "ms", "s": "s", "mm": "mm", "deg": "degrees",
                          "px": "px", "ratio": "x", "cosine": "cosine", "ssim": "0-1", "lpips": "lower is better",
                          "mae": "0-1"}

_RULES: tuple[tuple[str, Kind], ...] = (
    (r"psnr", "psnr"),
    (r"(^|_)ssim", "ssim"),
    (r"(^|_)lpips(_|$)", "lpips"),
    (r"(^|_)mae(_|$)", "mae"),
    (r"(^|_)(available|is_train|real_data)$|_rises$", "flag"),
    (r"identity|(^|_)cos(_|$)", "cosine"),
    (r"accuracy|_rate$|coverage", "percent"),
    (r"speedup", "ratio"),
    (r"(^|_)ms(_|$)", "ms"),
    (r"seconds", "s"),
    (r"(^|_)mm(_|$)", "mm"),
    (r"(^|_)deg(_|$)", "deg"),
    (r"(^|_)px(_|$)", "px"),
    (r"subjects|steps|iterations|epochs|parameters|directions|per_method|faces_found|(^|_)views?$", "count"),
)


def _kind(name: str) -> Kind:
    for pattern, kind in _RULES:
        if re.search(pattern, name):
            return kind
    return "number"


def metric_unit(name: str) -> str:
    """The unit of the metric ``name``, from its name: ``"dB"`` for ``heldout_psnr_mean``, ``"s"`` for
    ``fit_seconds``, ``"%"`` for ``face_detection_rate`` (:func:`format_metric` scales it), ``"0-1"`` for SSIM
    and MAE; ``""`` for counts, yes/no flags and names it does not know."""
    return _UNITS.get(_kind(name), "")


def _significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, without an exponent: 1689.7 -> "1,690", 0.04467 -> "0.0447"."""
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    rounded = round(value, digits - 1 - magnitude)
    return f"{rounded:,.{max(0, digits - 1 - magnitude)}f}"


def _trim(text: str) -> str:
    """Trailing zeros of a rounded decimal dropped (``"21.50"`` -> ``"21.5"``, ``"100.0"`` -> ``"100"``)."""
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_metric(name: str, value: float) -> str:
    """``value`` rounded to what the metric ``name`` means, in the unit :func:`metric_unit` gives: PSNR to
    0.01 dB, SSIM and cosines to 0.001, MAE to 0.0001, rates in per cent to 0.1, counts as integers, flags as
    yes/no, times and any other number to three significant digits; trailing zeros dropped."""
    kind = _kind(name)
    v = float(value)
    if kind == "flag" and v in (0.0, 1.0):
        return "yes" if v else "no"
    if kind == "count" and v == round(v):
        return f"{int(round(v)):,}"
    if isinstance(value, int) and kind not in ("percent", "flag"):
        return f"{value:,}"
    decimals = {"psnr": 2, "ssim": 3, "cosine": 3, "lpips": 3, "mae": 4, "percent": 1, "ratio": 1}
    if kind in decimals:
        return _trim(f"{100 * v if kind == 'percent' else v:.{decimals[kind]}f}")
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return _trim(_significant(v, 3))
    return f"{v:.2e}"


# ----------------------------------------------------------------------------- the headline table
@dataclass(frozen=True)
class Score:
    """One row of the headline table: a method's whole-image scores on white, averaged over test subjects.

    Attributes:
        method: ``"template"``, ``"feed-forward"``, ``"refined"``, or another baseline's name in words.
        source: where the numbers come from: ``"this run"``, ``"course checkpoint"`` or ``"paper"``.
        learned: a FastAvatar head (:data:`LEARNED`) rather than a baseline.
        psnr, ssim, mae, lpips, identity: the scores (``None``: not recorded); identity is the FaceNet
            cosine of the rendered views to their photos.
        seconds: time per head on the machine that made it (``None`` where not recorded).
        loses_to: for a learned method, the baselines of the same source it scores below, with the margin
            (``"template (PSNR -0.42 dB)"``); empty when it beats them all.
    """

    method: str
    source: str
    learned: bool
    psnr: float | None = None
    ssim: float | None = None
    mae: float | None = None
    lpips: float | None = None
    identity: float | None = None
    seconds: float | None = None
    loses_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class Course:
    """The shipped course checkpoint's numbers: its metrics and its preset (as recorded, plain dicts)."""

    folder: Path
    metrics: dict[str, dict[str, float]]
    preset: dict[str, Any]

    @property
    def train_subjects(self) -> int | None:
        return train_subjects(self.preset)


def load_course(folder: Path | None = None) -> Course | None:
    """The course checkpoint's ``metrics.json`` and ``preset.json`` (``data_samples/course`` unless
    ``folder``); ``None`` when the folder or a file is missing or not JSON (a pip install without the
    checkout). Only these two small files are read, not the models."""
    where = Path(folder) if folder is not None else shipped_dir("course")
    try:
        metrics = json.loads((where / METRICS_FILE).read_text(encoding="utf-8"))
        preset = json.loads((where / PRESET_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not isinstance(preset, dict):
        return None
    return Course(where, {str(k): v for k, v in metrics.items() if isinstance(v, dict)}, preset)


def _methods(evaluation: Mapping[str, float]) -> list[str]:
    """Method prefixes of notebook 07's ``<method>_psnr`` metrics: baselines first, then the learned heads."""
    found = [k[: -len("_psnr")] for k in evaluation if k.endswith("_psnr") and len(k) > len("_psnr")]
    baselines = sorted((m for m in found if m not in LEARNED),
                       key=lambda m: (_BASELINE_ORDER.index(m) if m in _BASELINE_ORDER else len(_BASELINE_ORDER), m))
    return baselines + [m for m in LEARNED if m in found]


def _number(values: Mapping[str, Any], key: str) -> float | None:
    v = values.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _rows_of(evaluation: Mapping[str, float], source: str) -> list[Score]:
    names = {metric_key(m): m for m in (*BASELINES, *LEARNED_METHODS)}
    rows = [Score(method=names.get(m, m.replace("_", " ")), source=source,
                  learned=m in LEARNED, **{k: _number(evaluation, f"{m}_{k}")
                                           for k in ("psnr", "ssim", "mae", "lpips", "identity", "seconds")})
            for m in _methods(evaluation)]
    return _mark(rows)


def _mark(rows: list[Score]) -> list[Score]:
    """Each learned row with the baselines (of the same source) it scores below on PSNR or SSIM
    (:func:`fastavatar_nb.evaluation.baseline_losses`)."""
    table = {r.method: {k: v for k, v in (("psnr", r.psnr), ("ssim", r.ssim)) if v is not None} for r in rows}
    losses = baseline_losses(table, learned=[r.method for r in rows if r.learned])
    return [replace(r, loses_to=tuple(losses[r.method])) if r.learned else r for r in rows]


def headline_rows(metrics: Metrics, course: Course | None = None,
                  paper: Mapping[str, Mapping[str, float]] = PAPER_TABLE1) -> list[Score]:
    """The headline table: this run's notebook-07 methods (baselines first, then feed-forward and refined),
    the paper's rows, then the course checkpoint's rows. A source that recorded nothing has no rows."""
    rows = _rows_of(metrics.get(EVALUATION, {}), "this run")
    rows += [Score(method=m, source="paper", learned=True, **{k: paper[m].get(k) for k in ("psnr", "ssim", "mae", "lpips")})
             for m in paper]
    if course is not None:
        rows += _rows_of(course.metrics.get(EVALUATION, {}), "course checkpoint")
    return rows


def source_label(source: str, preset: Mapping[str, Any], course: Course | None = None) -> str:
    """A :class:`Score`'s ``source`` with its scale: ``"this run (smoke, 10 training subjects)"``,
    ``"paper (410 NeRSemble training subjects)"``, ``"course checkpoint (268 training subjects)"``."""
    if source == "this run":
        train = train_subjects(preset)
        name = preset.get("name", "?")
        return f"this run ({name}, {train} training subjects)" if train is not None else f"this run ({name})"
    if source == "course checkpoint" and course is not None and course.train_subjects is not None:
        return f"course checkpoint ({course.train_subjects} training subjects)"
    if source == "paper":
        return f"paper ({base('full').num_train_subjects} NeRSemble training subjects)"
    return source


def baselines_note(metrics: Metrics) -> str:
    """Which baselines this run's headline rows have; says so when the template is the only one."""
    methods = _methods(metrics.get(EVALUATION, {}))
    if not methods:
        return ("This run recorded no evaluation (notebook 07's metrics are missing): it has no rows of its own, "
                "no baseline included.")
    others = [m.replace("_", " ") for m in methods if m not in LEARNED and m != "template"]
    if "template" not in methods and not others:
        return "This run recorded no baseline for its learned heads."
    if others:
        return f"Baselines recorded by this run: {', '.join(['template', *others] if 'template' in methods else others)}."
    return ("The template is this run's only recorded baseline: no mean-code or nearest-training-subject baseline "
            "was recorded by notebook 07, so none is shown.")


# ----------------------------------------------------------------------------- one sentence per stage
def _get(metrics: Metrics, notebook: str, *names: str) -> list[float] | None:
    values = metrics.get(notebook, {})
    out = [_number(values, n) for n in names]
    return None if any(v is None for v in out) else out  # type: ignore[return-value]


def _n(value: float) -> str:
    return f"{int(round(value)):,}"


def _plural(count: float, word: str) -> str:
    return f"{_n(count)} {word}{'' if int(round(count)) == 1 else 's'}"


def _outcome_00(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    got = _get(m, "00_data", "subjects", "train_subjects", "val_subjects", "test_subjects")
    if got is None:
        return None
    total, train, val, test = got
    real = _number(m.get("00_data", {}), "real_data")
    what = "real" if real else "synthetic" if real is not None else ""
    size = (f" x {preset['num_views']} views at {preset['image_width']}x{preset['image_height']}"
            if all(isinstance(preset.get(k), int) for k in ("num_views", "image_width", "image_height")) else "")
    return (f"data: {_n(total)} {what + ' ' if what else ''}subjects{size}, split by subject into {_n(train)} train / "
            f"{_n(val)} val / {_n(test)} test.")


def _outcome_01(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    parts = []
    fit = _get(m, "01_3dgs_basics", "image_fit_psnr", "image_fit_steps")
    if fit:
        parts.append(f"an image fit reaches {fit[0]:.1f} dB in {_n(fit[1])} steps")
    head = _get(m, "01_3dgs_basics", "head_ms_per_view")
    if head:
        k = preset.get("num_gaussians")
        parts.append(f"a {f'{k:,}-Gaussian ' if isinstance(k, int) else ''}head renders in "
                     f"{_significant(head[0], 2)} ms per view")
    speed = _get(m, "01_3dgs_basics", "numba_speedup_fwd_bwd")
    if speed:
        parts.append(f"the compiled CPU backend runs a forward and backward pass {speed[0]:.1f}x as fast as the torch reference")
    gsplat = _get(m, "01_3dgs_basics", "gsplat_speedup")
    if gsplat:
        parts.append(f"gsplat renders {gsplat[0]:.0f}x as fast as the torch reference on the GPU")
    return "3DGS basics: " + "; ".join(parts) + "." if parts else None


def _outcome_02(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    got = _get(m, "02_template_construction", "heldout_psnr_mean", "fit_subjects")
    if got is None:
        return None
    text = f"fits: {got[0]:.1f} dB on the held-out camera ({_plural(got[1], 'subject')}"
    worst = _get(m, "02_template_construction", "heldout_psnr_min")
    text += f", worst {worst[0]:.1f} dB)" if worst and got[1] > 1 else ")"
    train = _get(m, "02_template_construction", "train_psnr_mean")
    if train:
        text += f", {train[0]:.1f} dB on the cameras they were fitted to"
    template = _get(m, "02_template_construction", "template_psnr_mean")
    if template:
        text += f"; the template (their average head) scores {template[0]:.1f} dB on the same subjects"
    real = _get(m, "02_template_construction", "nersemble_heldout_psnr")
    if real:
        text += f"; a real NeRSemble subject's fit: {real[0]:.1f} dB on its held-out camera"
    return text + "."


def _outcome_03(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    got = _get(m, "03_autodecoder_training", "decoded_psnr_mean", "decoder_subjects")
    if got is None:
        return None
    text = f"decoder: its {_plural(got[1], 'training subject')} decoded from their codes score {got[0]:.1f} dB"
    ref = _get(m, "03_autodecoder_training", "fit_psnr_mean", "template_psnr_mean")
    if ref:
        text += f" (their own fits {ref[0]:.1f} dB, the template {ref[1]:.1f} dB)"
    held = _get(m, "03_autodecoder_training", "decoded_heldout_psnr_mean")
    if held:
        text += f" and {held[0]:.1f} dB on the held-out camera"
    if ref and got[0] <= ref[1]:
        text += "; no better than the template"
    return text + "."


def _outcome_04(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    got = _get(m, "04_encoder_distillation", "val_feed_forward_psnr")
    if got is None:
        return None
    val = _get(m, "00_data", "val_subjects")
    who = f"{_plural(val[0], 'validation subject')}" if val else "the validation subjects"
    text = f"feed-forward: one photo of {who} in, 15 other views scored: {got[0]:.1f} dB"
    base = _get(m, "04_encoder_distillation", "val_template_psnr")
    if base:
        gap = got[0] - base[0]
        text += f", {abs(gap):.1f} dB {'above' if gap >= 0 else 'below'} the template's {base[0]:.1f} dB"
        if gap < 0:
            text += " (loses to the template)"
    if _get(m, "04_encoder_distillation", "val_is_train") == [1.0]:
        text += "; the split has no validation subjects, so these are training subjects: optimistic"
    return text + "."


def _outcome_05(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    values = m.get("05_latent_editing", {})
    acc = {k[: -len("_heldout_accuracy")]: float(v) for k, v in values.items() if k.endswith("_heldout_accuracy")}
    if not acc:
        return None
    lo, hi = min(acc, key=acc.get), max(acc, key=acc.get)
    text = (f"latent editing: {_plural(len(acc), 'attribute direction')}; held-out subjects classified by them "
            f"{100 * sum(acc.values()) / len(acc):.0f}% right on average")
    if len(acc) > 1:
        text += f" (from {100 * acc[lo]:.0f}% for {lo.replace('_', ' ')} to {100 * acc[hi]:.0f}% for {hi.replace('_', ' ')})"
    return text + "."


def _outcome_06(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    got = _get(m, "06_refinement", "novel_psnr_feed_forward", "novel_psnr_refined", "refine_steps")
    if got is None:
        return None
    ff, ref, steps = got
    text = f"refinement: {_n(steps)} steps on one validation subject's photo"
    secs = _get(m, "06_refinement", "refine_seconds")
    if secs:
        text += f" ({_significant(secs[0], 2)} s)"
    text += f" take its 15 other views from {ff:.1f} to {ref:.1f} dB"
    inp = _get(m, "06_refinement", "input_psnr_feed_forward", "input_psnr_refined")
    if inp:
        text += f" and the photo itself from {inp[0]:.1f} to {inp[1]:.1f} dB"
    longer = _get(m, "06_refinement", "novel_psnr_4x_steps")
    if longer:
        text += f"; {_n(4 * steps)} steps: {longer[0]:.1f} dB on the other views"
    if ref <= ff:
        text += "; refinement did not help the views it never saw"
    if _get(m, "06_refinement", "val_is_train") == [1.0]:
        text += " (a training subject: optimistic)"
    return text + "."


def _outcome_07(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    rows = _rows_of(m.get(EVALUATION, {}), "this run")
    scored = [r for r in rows if r.psnr is not None]
    if not scored:
        return None
    test = _get(m, "00_data", "test_subjects")
    heads = _get(m, EVALUATION, "heads_per_method")
    who = _plural(test[0], "unseen test subject") if test else "the unseen test subjects"
    text = f"evaluation on {who}" + (f" ({_plural(heads[0], 'head')} per method)" if heads else "") + ": "
    text += ", ".join(f"{r.method} {r.psnr:.1f} dB" for r in scored) + " (whole image, 15 novel views per photo)"
    losers = [r.method for r in scored if r.loses_to]
    if losers:
        text += f"; {' and '.join(losers)} {'loses' if len(losers) == 1 else 'lose'} to a baseline"
    return text + "."


def _outcome_08(m: Metrics, preset: Mapping[str, Any]) -> str | None:
    got = _get(m, "08_your_photo", "input_psnr_feed_forward", "input_psnr_refined")
    if got is None:
        return None
    steps = _get(m, "08_your_photo", "refine_steps")
    text = f"your photo: the head matches the photo at {got[0]:.1f} dB feed-forward"
    text += f", {got[1]:.1f} dB after {_n(steps[0])} refinement steps" if steps else f", {got[1]:.1f} dB refined"
    novel = {k[len("novel_psnr_"):].replace("_", "-"): float(v) for k, v in m.get("08_your_photo", {}).items()
             if k.startswith("novel_psnr_")}
    if novel:
        order = sorted(novel, key=lambda k: (k != "template", k != "feed-forward", k))
        text += "; on the subject's other views: " + ", ".join(f"{k} {novel[k]:.1f} dB" for k in order)
        losers = [k for k in order if k != "template" and "template" in novel and novel[k] < novel["template"]]
        if losers:
            text += f" ({' and '.join(losers)} below the template)"
    return text + "."


_OUTCOMES = {"00": _outcome_00, "01": _outcome_01, "02": _outcome_02, "03": _outcome_03, "04": _outcome_04,
             "05": _outcome_05, "06": _outcome_06, "07": _outcome_07, "08": _outcome_08}


def stage_outcomes(metrics: Metrics, preset: Mapping[str, Any] | None = None) -> dict[str, str]:
    """One sentence per notebook number (``"02"`` -> ``"fits: 30.7 dB on the held-out camera (10 subjects)..."``),
    for the notebooks whose metrics hold what the sentence needs."""
    preset = preset or {}
    out = {}
    for number, outcome in _OUTCOMES.items():
        text = outcome(metrics, preset)
        if text:
            out[number] = text[:1].upper() + text[1:]
    return out


# ----------------------------------------------------------------------------- what the scale can show
def train_subjects(preset: Mapping[str, Any]) -> int | None:
    """Training subjects of a preset as ``preset.json`` records it (``None`` where fields are missing)."""
    keys = ("num_subjects", "num_test_subjects", "num_val_subjects")
    if not all(isinstance(preset.get(k), int) for k in keys):
        return None
    return preset["num_subjects"] - preset["num_test_subjects"] - preset["num_val_subjects"]


GENERALISES_FROM = 100
"""Training subjects below which the report says the learned stages cannot be expected to generalise (the
smoke preset has 10, the course preset 268, the paper 410)."""


def scale_note(preset: Mapping[str, Any], metrics: Metrics, course: Course | None = None) -> str:
    """One honest paragraph on what a run of this size can and cannot show."""
    train = train_subjects(preset)
    test = preset.get("num_test_subjects")
    paper_train = base("full").num_train_subjects
    if train is None:
        return "Scale: the run's preset.json is missing or incomplete, so its size is unknown."
    size = (f"{preset.get('image_width')}x{preset.get('image_height')} pixels, K = {preset['num_gaussians']:,} Gaussians"
            if isinstance(preset.get("num_gaussians"), int) else "")
    head = (f"Scale: the {preset.get('name', '?')} preset, {_plural(train, 'training subject')}"
            f"{', ' + size if size else ''}, scored on {_plural(test, 'test subject') if isinstance(test, int) else '?'}. ")
    if train < GENERALISES_FROM:
        course_train = course.train_subjects if course is not None else None
        text = (head + "At this size the run shows whether every stage runs and which way it moves its numbers, "
                "and whether the fits reproduce their subjects. It cannot show that the learned stages (decoder, "
                f"encoder) generalise to people they have not seen: {_plural(train, 'training subject')} are far too "
                f"few, so expect the feed-forward head of an unseen subject to stay close to the template. Nor can it "
                f"reproduce the paper's absolute numbers ({paper_train} NeRSemble training subjects).")
        if course_train:
            text += f" The course checkpoint's rows show what {course_train} training subjects buy at this image size."
    else:
        text = (head + "Enough training subjects for the learned stages to generalise; the paper's numbers come from "
                f"{paper_train} real NeRSemble subjects at a higher resolution, so compare orderings and gaps, not "
                "absolute values.")
    if isinstance(test, int) and test < 5:
        text += (f" Each number of the table is a mean over {_plural(test, 'test subject')}: differences of a few "
                 "tenths of a dB are within the noise.")
    return text


def real_data_note(preset: Mapping[str, Any], split: Mapping[str, Any] | None) -> str | None:
    """For a run on real data (``--data``: ``preset["data"]`` set): which subjects it used, by split, and what
    cannot be learnt from so few; ``None`` for a synthetic run."""
    data = preset.get("data")
    if not data:
        return None
    parts = {k: [str(s) for s in split.get(k, [])] for k in ("train", "val", "test")} if isinstance(split, Mapping) else {}
    listed = "; ".join(f"{k}: {', '.join(v) if v else 'none'}" for k, v in parts.items())
    total = sum(len(v) for v in parts.values())
    train = len(parts.get("train", []))
    text = f"Real data: {_plural(total, 'subject') if parts else 'subjects'} from {data}"
    text += f" ({listed})." if parts else " (the run folder has no dataset/split.json listing them)."
    if parts and train < GENERALISES_FROM:
        text += (f" From {_plural(train, 'training subject')} the decoder and the encoder cannot learn how faces "
                 "vary: an unseen subject's feed-forward head is at best a blend of these few, and the attribute "
                 "directions rest on a handful of examples. The per-subject stages (the fits of notebook 02 and "
                 "the refinement of notebook 06) are what such a run can show.")
    return text
