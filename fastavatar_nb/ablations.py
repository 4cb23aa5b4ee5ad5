"""Table 2 of the paper as switches: each ablation is one change to one stage's config, run at a preset.

The paper ablates four design choices (its Table 2, feed-forward unless noted): the number of
Gaussians K, two loss terms (SSIM in the decoder's Eq. 7, the cosine term of the encoder's Eq. 9),
how the template is initialised (averaged fits, random, optimised jointly with the decoder) and the
number of refinement steps. Here each is a :class:`Variant` of the preset's run:

=====================  ===========================================================================
switch                 what changes
=====================  ===========================================================================
``num_gaussians``      ``Preset.num_gaussians`` (a dataset with K/2 or 2K corresponded points, its
                       own fits, template, decoder and encoder; the photos are the same)
``decoder``            :class:`~fastavatar_nb.decoder.DecoderConfig` fields, e.g. ``ssim_weight=0``
``encoder``            :class:`~fastavatar_nb.encoder.EncoderConfig` fields, e.g. ``cos_weight=0``
``template``           ``"averaged"`` (:func:`~fastavatar_nb.template.build_template` of the fits, the
                       paper's), ``"random"`` (:func:`~fastavatar_nb.template.random_template` at the
                       training subjects' mean points, kept fixed) or ``"joint"`` (that random template
                       optimised with the decoder, ``DecoderConfig.template_lr``)
``refine_factor``      refinement steps as a multiple of the preset's ``refine.steps`` (0: feed-forward)
=====================  ===========================================================================

:func:`run` trains what each variant needs (reusing the preset's own run for the default) and scores
every variant on the **test** subjects with notebook 07's protocol, whole image on white first. Nothing
here chooses a setting: the table only reports, so scoring on test subjects is allowed. A second seed
of the default measures how far two runs that differ only by chance fall apart, the noise floor every
difference is read against. ``benchmarks/ablations.py`` runs it and records
``benchmarks/results/cpu-2core/ablations_smoke.json``; notebook 07 shows that table beside the paper's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .evaluation import PAPER_TABLE1

__all__ = ["Variant", "VARIANTS", "PAPER_TABLE2", "Ordering", "ORDERINGS", "JOINT_TEMPLATE_LR", "variant",
           "run", "check_orderings", "comparison_rows", "save_results", "load_results", "RECORDED", "recorded_results",
           "comparison_markdown", "orderings_markdown", "delta_figure"]

JOINT_TEMPLATE_LR = 1e-2
"""``DecoderConfig.template_lr`` of the joint-optimisation variant: the fits' rate for rotations on
the smoke preset (:data:`fastavatar_nb.fitting.SHORT_RUN_LRS`), set before any run, not tuned."""

_FORMAT = "fastavatar-nb ablations v1"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: the preset's pipeline with one switch changed."""

    name: str
    """Row label, e.g. ``"w/o SSIM (dec.)"``."""
    group: str
    """Table 2's block: ``"default"``, ``"noise"``, ``"K"``, ``"loss"``, ``"init"`` or ``"refinement"``."""
    paper: str | None = None
    """The :data:`PAPER_TABLE2` row it stands for (``None``: ours only)."""
    num_gaussians_factor: float = 1.0
    """K as a multiple of the preset's."""
    template: Literal["averaged", "random", "joint"] = "averaged"
    """How the template is made (module docstring)."""
    decoder: Mapping[str, Any] = field(default_factory=dict)
    """:class:`~fastavatar_nb.decoder.DecoderConfig` overrides."""
    encoder: Mapping[str, Any] = field(default_factory=dict)
    """:class:`~fastavatar_nb.encoder.EncoderConfig` overrides."""
    refine_factor: float = 0.0
    """Refinement steps as a multiple of the preset's (0: the feed-forward head)."""

    @property
    def trains_decoder(self) -> bool:
        """Whether this variant needs its own decoder (and so its own encoder)."""
        return self.num_gaussians_factor != 1.0 or self.template != "averaged" or bool(self.decoder)

    @property
    def slug(self) -> str:
        """Folder name of the variant's artifacts."""
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-").replace("--", "-")


VARIANTS: tuple[Variant, ...] = (
    Variant("default", "default", "FastAvatar feed-forward"),
    Variant("default, seed 1", "noise", decoder={"seed": 1}, encoder={"seed": 1}),
    Variant("K/2", "K", "K = 5,023", num_gaussians_factor=0.5),
    Variant("2K", "K", "K = 40,000", num_gaussians_factor=2.0),
    Variant("w/o SSIM (dec.)", "loss", "w/o SSIM (dec.)", decoder={"ssim_weight": 0.0}),
    Variant("w/o CosSim (enc.)", "loss", "w/o CosSim (enc.)", encoder={"cos_weight": 0.0}),
    Variant("random init", "init", "Random Init", template="random"),
    Variant("joint-opt.", "init", "Joint-Opt.", template="joint"),
    Variant("refined", "refinement", "FastAvatar refined (300 steps)", refine_factor=1.0),
    Variant("refined x 2", "refinement", "600 steps", refine_factor=2.0),
)
"""Table 2 at any preset; K/2 and 2K stand for the paper's 5,023 and 40,000 (its default 10,144)."""

PAPER_TABLE2: dict[str, dict[str, float]] = {
    "FastAvatar feed-forward": {"psnr": PAPER_TABLE1["feed-forward"]["psnr"], "ssim": PAPER_TABLE1["feed-forward"]["ssim"],
                                "ms": 10},
    "K = 5,023": {"psnr": 17.65, "ssim": 0.81, "ms": 9},
    "K = 40,000": {"psnr": 22.26, "ssim": 0.93, "ms": 29},
    "w/o SSIM (dec.)": {"psnr": 20.72, "ssim": 0.88, "ms": 10},
    "w/o CosSim (enc.)": {"psnr": 20.83, "ssim": 0.89, "ms": 10},
    "Random Init": {"psnr": 14.88, "ssim": 0.76, "ms": 10},
    "Joint-Opt.": {"psnr": 18.92, "ssim": 0.80, "ms": 10},
    "FastAvatar refined (300 steps)": {"psnr": PAPER_TABLE1["refined"]["psnr"], "ssim": PAPER_TABLE1["refined"]["ssim"],
                                       "ms": 3000},
    "600 steps": {"psnr": 24.65, "ssim": 0.93, "ms": 6000},
}
"""The paper's Table 2 (PSNR in dB, SSIM, runtime in ms on an A100; 10,144 Gaussians, 300 refinement steps)."""


@dataclass(frozen=True)
class Ordering:
    """A claim of the paper: variant ``better`` scores above variant ``worse`` (by :attr:`metric`)."""

    claim: str
    worse: str
    better: str
    metric: str = "psnr"
    """``"psnr"`` or ``"ssim"`` (higher is better) or ``"ms"`` (lower is better)."""


ORDERINGS: tuple[Ordering, ...] = (
    Ordering("fewer Gaussians lose detail", "K/2", "default"),
    Ordering("more Gaussians improve fidelity", "default", "2K"),
    Ordering("more Gaussians slow inference", "2K", "default", "ms"),
    Ordering("removing SSIM (decoder) degrades quality", "w/o SSIM (dec.)", "default"),
    Ordering("removing the cosine term (encoder) degrades quality", "w/o CosSim (enc.)", "default"),
    Ordering("the averaged template beats joint optimisation", "joint-opt.", "default"),
    Ordering("joint optimisation beats random initialisation", "random init", "joint-opt."),
    Ordering("refinement improves on feed-forward", "default", "refined"),
    Ordering("longer refinement improves further", "refined", "refined x 2"),
)
"""The orderings Table 2 and its text state, between rows of :data:`VARIANTS`; the last refinement
claim, diminishing returns, is checked by :func:`check_orderings` on its own."""


def variant(name: str) -> Variant:
    """The :data:`VARIANTS` entry called ``name``."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no ablation variant {name!r}; the variants are {[v.name for v in VARIANTS]}")


def _paper_scores() -> dict[str, dict[str, float]]:
    return {v.name: PAPER_TABLE2[v.paper] for v in VARIANTS if v.paper is not None}


def check_orderings(scores: Mapping[str, Mapping[str, float]], noise: float | None = None) -> list[dict[str, Any]]:
    """Which of :data:`ORDERINGS` hold in ``scores`` (``{variant name: {"psnr", "ssim", "ms"}}``).

    Args:
        scores: one entry per variant (missing variants leave their orderings out).
        noise: the PSNR difference two runs of the default make by chance (seed); a PSNR margin
            within it is flagged ``"within noise"``.

    Returns:
        One row per ordering and one for diminishing refinement returns: ``claim``, ``metric``,
        ``margin`` (better minus worse, in the metric's unit; for ``ms`` worse minus better),
        ``holds`` (bool), the paper's own ``paper_margin`` and ``verdict`` (``"holds"``,
        ``"reversed"``, ``"holds, within noise"``, ``"reversed, within noise"``).
    """
    paper = _paper_scores()

    def margin(s: Mapping[str, Mapping[str, float]], o: Ordering) -> float | None:
        if o.worse not in s or o.better not in s or o.metric not in s[o.worse] or o.metric not in s[o.better]:
            return None
        d = float(s[o.better][o.metric]) - float(s[o.worse][o.metric])
        return -d if o.metric == "ms" else d

    def verdict(m: float, metric: str) -> str:
        v = "holds" if m > 0 else "reversed"
        return f"{v}, within noise" if noise is not None and metric == "psnr" and abs(m) <= noise else v

    rows = []
    for o in ORDERINGS:
        m = margin(scores, o)
        if m is not None:
            rows.append({"claim": o.claim, "worse": o.worse, "better": o.better, "metric": o.metric, "margin": m,
                         "holds": m > 0, "paper_margin": margin(paper, o), "verdict": verdict(m, o.metric)})
    names = ("default", "refined", "refined x 2")
    if all(n in scores for n in names):
        def gains(s: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
            a, b, c = (float(s[n]["psnr"]) for n in names)
            return b - a, c - b

        first, second = gains(scores)
        pf, ps = gains(paper)
        rows.append({"claim": "longer refinement gives diminishing returns", "worse": "refined x 2 - refined",
                     "better": "refined - default", "metric": "psnr", "margin": first - second,
                     "holds": second < first, "paper_margin": pf - ps,
                     "verdict": verdict(first - second, "psnr")})
    return rows


def comparison_rows(scores: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Our scores beside the paper's, one row per variant in :data:`VARIANTS` order (those scored)."""
    rows = []
    for v in VARIANTS:
        if v.name not in scores:
            continue
        ours, paper = scores[v.name], PAPER_TABLE2.get(v.paper or "", {})
        rows.append({"group": v.group, "variant": v.name, "K": ours.get("K"), "psnr": ours["psnr"],
                     "ssim": ours["ssim"], "ms": ours.get("ms"), "paper_setting": v.paper, "paper_psnr": paper.get("psnr"),
                     "paper_ssim": paper.get("ssim"), "paper_ms": paper.get("ms")})
    return rows


# ------------------------------------------------------------------------------------ running
def _models(preset: Any, v: Variant, train: Any, base: tuple[Any, Any], folder: Path, embeddings: tuple,
            progress: bool, log: Callable[[str], None]) -> tuple[Any, Any]:
    """The decoder and encoder of variant ``v``: the base run's where the switch leaves them alone, else
    its own in ``folder/<slug>/`` through :func:`~fastavatar_nb.pipeline.ensure_decoder` and
    :func:`~fastavatar_nb.pipeline.ensure_encoder` with the variant's configs (reused when stored,
    resumed when interrupted, refused when stored with another config)."""
    from . import pipeline
    from .data import SubjectDataset
    from .encoder import ENCODER_FILE
    from .template import random_template

    avatars, encoder = base
    if not (v.trains_decoder or v.encoder):
        return avatars, encoder
    p, p_train = preset.replace(run_dir=folder / v.slug), train
    if v.num_gaussians_factor != 1.0:  # a dataset of that K: the same photos, other corresponded points
        p = p.replace(num_gaussians=round(preset.num_gaussians * v.num_gaussians_factor))
        p_train = SubjectDataset(pipeline.prepare_dataset(p, progress=progress), "train")
        if p_train.subject_ids != train.subject_ids:
            raise ValueError(f"{p.run_dir} holds other training subjects than {preset.run_dir}; delete it to make it again")
    stored = (p.run_dir / ENCODER_FILE).is_file()
    log(f"reusing {p.run_dir}" if stored else f"training into {p.run_dir}")
    if v.trains_decoder:
        overrides = dict(v.decoder)
        if v.template == "joint":
            overrides.setdefault("template_lr", JOINT_TEMPLATE_LR)

        def make_template():
            if v.template != "averaged":  # random, and the start of the joint optimisation: at the mean points
                points = torch.stack([p_train[i].points for i in range(len(p_train))]).mean(0)
                return random_template(points.to(p.torch_device), seed=p.seed)
            if p.num_gaussians == preset.num_gaussians:  # the base run's template: the switch is elsewhere
                return pipeline.ensure_template(preset, train, progress=progress)
            return pipeline.ensure_template(p, p_train, progress=progress)  # fitted at this K

        avatars = pipeline.ensure_decoder(p, p_train, progress=progress, make_template=make_template,
                                          config=p.decoder.replace(**overrides))
    encoder = pipeline.ensure_encoder(p, p_train, avatars, embeddings=embeddings, progress=progress,
                                      config=p.encoder.replace(**v.encoder))
    return avatars, encoder


def _score(preset: Any, v: Variant, avatars: Any, encoder: Any, test: Any, test_emb: Any, test_found: Any,
           progress: bool) -> dict[str, Any]:
    """Notebook 07's protocol on the test subjects for one variant: whole image first, then the head region."""
    from .evaluation import feed_forward, input_views, protocol_rows, summarize
    from .refine import refine_views

    dev = preset.torch_device
    rows: list[dict[str, Any]] = []
    times: list[float] = []
    steps = round(preset.refine.steps * v.refine_factor)
    for t in range(len(test)):
        s = test[t].to(dev)
        views = input_views(test_found[t], preset.evaluation.input_views)
        codes, heads, secs = feed_forward(encoder, avatars, test_emb[t, views].to(dev), s.images[views])
        if steps > 0:
            heads, rsecs = refine_views(avatars, s, codes, views, preset.refine.replace(steps=steps),
                                        preset.backend, progress=progress)
            secs = secs + rsecs
        rows += protocol_rows(s, {v.name: heads}, views, preset.backend)
        times += [float(x) for x in secs]

    def means(rs: list[dict[str, Any]]) -> dict[str, float]:  # per subject first, then over subjects
        return {k: x for k, x in summarize(rs)[v.name].items() if k != "n"}

    subjects = dict.fromkeys(r["subject"] for r in rows)
    out: dict[str, Any] = means(rows)
    out.update(ms=1000 * sorted(times)[len(times) // 2], K=avatars.template.num_gaussians, refine_steps=steps,
               per_subject={sid: means([r for r in rows if r["subject"] == sid]) for sid in subjects},
               input_views=preset.evaluation.input_views, decoded_heldout_psnr=float(avatars.heldout_psnr.nanmean()))
    return out


def run(preset: Any, folder: str | Path, variants: Sequence[Variant] = VARIANTS, progress: bool = True,
        log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Train and score ``variants`` at ``preset``; returns ``{variant name: scores}``.

    The default variant is the preset's own run (``preset.run_dir``, made by the notebooks or here with
    :mod:`fastavatar_nb.pipeline`); every other variant that trains keeps its decoder, encoder and
    checkpoint in ``folder/<slug>/`` (reused when present with the same config, resumed when
    interrupted). K variants get their own run folder with a dataset of that K (the same photos, other
    corresponded points), fits and template. The encoder of every variant is trained on the base
    run's face embeddings (the photos are the same in every variant).

    Each entry: ``psnr``, ``ssim``, ``mae`` (whole image on white), ``psnr_head``, ``ssim_head``,
    ``mae_head`` (the head region), ``ms`` (median time from a face embedding to a head, refinement
    included, on this machine), ``K``, ``refine_steps``, ``train_seconds``, ``per_subject`` and
    ``decoded_heldout_psnr``: the decoder alone, on its training subjects' learnt codes at the camera
    it never trained on (whole image; what the switch does to the decoder, before any encoder).
    """
    from . import pipeline
    from .data import SubjectDataset

    folder = Path(folder)
    root = pipeline.prepare_dataset(preset, progress=progress)
    train, test = SubjectDataset(root, "train"), SubjectDataset(root, "test")
    if len(test) == 0:
        raise ValueError(f"{root} has no test subjects; the ablation table is scored on test subjects")
    base_avatars = pipeline.ensure_decoder(preset, train, progress=progress)
    train_emb = pipeline.ensure_embeddings(preset, train, progress=progress)
    base_encoder = pipeline.ensure_encoder(preset, train, base_avatars, embeddings=train_emb, progress=progress)
    test_emb, test_found = pipeline.ensure_embeddings(preset, test, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        log(f"--- {v.name}")
        t0 = time.perf_counter()
        avatars, encoder = _models(preset, v, train, (base_avatars, base_encoder), folder, train_emb, progress, log)
        trained = time.perf_counter() - t0
        results[v.name] = {**_score(preset, v, avatars, encoder, test, test_emb, test_found, progress),
                           "train_seconds": trained}
        r = results[v.name]
        log(f"{v.name}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f} (whole image), {r['ms']:.1f} ms per head")
    return results


def save_results(path: str | Path, results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> Path:
    """Write ``results`` (from :func:`run`), the orderings they support and ``meta`` as JSON."""
    p = Path(path)
    noise = _noise(results)
    doc = {"format": _FORMAT, "meta": dict(meta), "noise_psnr": noise, "results": {k: dict(v) for k, v in results.items()},
           "orderings": check_orderings(results, noise)}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                            else str(o)))
    return p


def _noise(results: Mapping[str, Mapping[str, Any]]) -> float | None:
    a, b = results.get("default"), results.get("default, seed 1")
    return None if a is None or b is None else abs(float(a["psnr"]) - float(b["psnr"]))


def load_results(path: str | Path) -> dict[str, Any]:
    """What :func:`save_results` wrote: ``{"meta", "noise_psnr", "results", "orderings"}``.

    Raises:
        FileNotFoundError: no such file (``benchmarks/ablations.py`` writes it);
        ValueError: not an ablation results file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no ablation results at {p}; run `python benchmarks/ablations.py --preset smoke` "
                                "(about an hour on 2 CPU cores)")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not readable JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{p} is not an ablation results file (format "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    if not all(math.isfinite(float(r["psnr"])) for r in doc["results"].values()):
        raise ValueError(f"{p} holds non-finite PSNRs")
    return doc


# ------------------------------------------------------------------------------------ showing
RECORDED = Path("benchmarks") / "results" / "cpu-2core" / "ablations_smoke.json"
"""The committed results of ``benchmarks/ablations.py --preset smoke`` (2 CPU cores), relative to the repository."""


def recorded_results(preset: Any) -> tuple[Path, dict[str, Any]]:
    """``(path, load_results(path))``: this preset's own results where ``benchmarks/ablations.py`` was run
    here (``benchmarks/results/local/ablations_<preset>_<device>.json``), else the committed smoke results."""
    from .presets import project_root

    root = project_root()
    local = root / "benchmarks" / "results" / "local" / f"ablations_{preset.name}_{preset.torch_device.type}.json"
    path = local if local.is_file() else root / RECORDED
    return path, load_results(path)


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def comparison_markdown(doc: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`load_results`' ``doc``: each variant's scores beside the paper's (the
    test subjects' feed-forward or refined heads; "decoder, camera 8" is ``decoded_heldout_psnr``)."""
    lines = ["| block | variant | K | PSNR (dB) | SSIM | head PSNR (dB) | ms per head | decoder, camera 8 (dB) "
             "| paper setting | paper PSNR / SSIM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in comparison_rows(doc["results"]):
        res = doc["results"][r["variant"]]
        paper = "-" if r["paper_psnr"] is None else f"{r['paper_psnr']:.2f} / {r['paper_ssim']:.2f}"
        lines.append(f"| {r['group']} | {r['variant']} | {_f(r['K'], ',')} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{_f(res.get('psnr_head'), '.2f')} | {_f(r['ms'], '.1f')} | "
                     f"{_f(res.get('decoded_heldout_psnr'), '.2f')} | {r['paper_setting'] or '-'} | {paper} |")
    return "\n".join(lines)


def orderings_markdown(doc: Mapping[str, Any]) -> str:
    """A Markdown table of the paper's orderings and whether ``doc``'s results keep them."""
    unit = {"psnr": "dB", "ssim": "", "ms": "ms"}
    lines = ["| the paper says | compared (worse < better) | ours | paper | verdict |", "|---|---|---|---|---|"]
    for o in doc["orderings"]:
        u = unit[o["metric"]]
        lines.append(f"| {o['claim']} | {o['worse']} < {o['better']} ({o['metric']}) | {o['margin']:+.2f} {u} | "
                     f"{_f(o['paper_margin'], '+.2f')} {u} | **{o['verdict']}** |")
    return "\n".join(lines)


def delta_figure(doc: Mapping[str, Any]):
    """Plotly bars: each variant's PSNR minus the default's, ours beside the paper's, with the seed noise
    band around zero (a bar inside it is a difference two runs of the default also make)."""
    import plotly.graph_objects as go

    res = doc["results"]
    base = float(res["default"]["psnr"])
    names = [v.name for v in VARIANTS if v.name in res and v.name != "default"]
    paper = _paper_scores()
    fig = go.Figure([
        go.Bar(name="ours", x=names, y=[float(res[n]["psnr"]) - base for n in names]),
        go.Bar(name="paper", x=names, y=[paper[n]["psnr"] - paper["default"]["psnr"] if n in paper else None
                                         for n in names]),
    ])
    noise = doc.get("noise_psnr")
    if noise:
        fig.add_hrect(y0=-noise, y1=noise, fillcolor="grey", opacity=0.2, line_width=0,
                      annotation_text="seed noise", annotation_position="top left")
    fig.update_layout(barmode="group", height=360, yaxis_title="PSNR - default's PSNR (dB, whole image)",
                      title="Table 2: what each switch does to the test PSNR")
    return fig
