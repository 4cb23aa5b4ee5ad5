"""Metrics and figures a run leaves behind, and the one-page run report.

Convention (every notebook follows it, ``fastavatar-nb run`` reads it):

- ``<run_dir>/metrics/NN_name.json``: a flat JSON object ``{metric name: number}`` per
  notebook, written with :func:`record_metrics` (later calls from the same notebook merge
  into the file, newer values win). Names are free text such as ``"psnr_test"`` or
  ``"fit_seconds"``; values are finite ints or floats (bools are stored as 0/1).
- ``<run_dir>/figures/*.png``: figures, written with :func:`save_image` or by any code
  that writes a PNG into :func:`figures_dir`. Prefix them with the notebook number
  (``"02_template_orbit.png"``) so that the report groups them.
- ``<run_dir>/preset.json``: the preset (written by ``fastavatar_nb.runtime.setup``).
- ``<run_dir>/run_status.json``: per-notebook status and timings (written by the CLI).

:func:`write_report` turns those into ``report.md`` and ``report.html`` in the run folder.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import re
import sys
import webbrowser
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastavatar_nb import report_results as results
from fastavatar_nb.images import to_uint8
from fastavatar_nb.presets import Preset

__all__ = [
    "MetricsError",
    "collect_metrics",
    "format_duration",
    "figures_dir",
    "list_figures",
    "metrics_path",
    "record_metrics",
    "open_report",
    "save_image",
    "write_report",
]

PathLike = str | os.PathLike[str]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class MetricsError(ValueError):
    """Metrics that do not follow the flat ``{name: finite number}`` convention."""


def _run_dir(where: Preset | PathLike) -> Path:
    return where.run_dir if isinstance(where, Preset) else Path(where)


def _notebook_stem(notebook: str) -> str:
    stem = str(notebook)
    if stem.endswith(".ipynb"):
        stem = stem[: -len(".ipynb")]
    if not _NAME.match(stem):
        raise MetricsError(
            f"Notebook name {notebook!r} must be a plain file stem such as '02_template_construction'"
        )
    return stem


def metrics_path(where: Preset | PathLike, notebook: str) -> Path:
    """``<run_dir>/metrics/<notebook stem>.json``; ``where`` is a preset or a run folder."""
    return _run_dir(where) / "metrics" / f"{_notebook_stem(notebook)}.json"


def _as_number(name: str, value: Any) -> int | float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricsError(f"Metric {name!r} must be a scalar, got a tensor of shape {list(value.shape)}")
        value = value.item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise MetricsError(f"Metric {name!r} must be a scalar, got an array of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise MetricsError(f"Metric {name!r} is {number}: only finite numbers can be recorded")
        return number
    raise MetricsError(f"Metric {name!r} must be a number, got {type(value).__name__} {value!r}")


def record_metrics(where: Preset | PathLike, notebook: str, metrics: Mapping[str, Any]) -> Path:
    """Merge ``metrics`` into ``<run_dir>/metrics/<notebook>.json`` and return its path.

    Args:
        where: the notebook's preset (its ``run_dir`` is used) or a run folder.
        notebook: the notebook's file name or stem, e.g. ``"06_refinement"``.
        metrics: flat mapping of metric name -> number (Python, numpy or one-element torch
            scalars). Existing entries of the file with other names are kept.

    Raises:
        MetricsError: a name that is not a non-empty string, a value that is not a finite
            number (nested dicts, strings, NaN and inf included), or an existing file that
            is not a JSON object.
    """
    if not isinstance(metrics, Mapping):
        raise MetricsError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    clean: dict[str, int | float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.strip():
            raise MetricsError(f"Metric names must be non-empty strings, got {name!r}")
        clean[name] = _as_number(name, value)
    path = metrics_path(where, notebook)
    existing = _read_metrics_file(path) if path.exists() else {}
    existing.update(clean)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _read_metrics_file(path: Path) -> dict[str, int | float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise MetricsError(f"{path}: not valid JSON (a byte that is not UTF-8 at offset {err.start})") from err
    except OSError as err:
        raise MetricsError(f"{path}: cannot read it ({err.strerror or err})") from err
    if not isinstance(data, dict):
        raise MetricsError(f"{path}: expected a JSON object of name -> number, got {type(data).__name__}")
    return {str(k): _as_number(str(k), v) for k, v in data.items()}


def collect_metrics(run_dir: PathLike) -> dict[str, dict[str, int | float]]:
    """Every ``<run_dir>/metrics/*.json``, keyed by notebook stem, in file-name order."""
    folder = Path(run_dir) / "metrics"
    if not folder.is_dir():
        return {}
    return {path.stem: _read_metrics_file(path) for path in sorted(folder.glob("*.json"))}


def figures_dir(where: Preset | PathLike) -> Path:
    """``<run_dir>/figures``, created if missing."""
    folder = _run_dir(where) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def list_figures(run_dir: PathLike) -> list[Path]:
    """PNG files under ``<run_dir>/figures`` (recursively), sorted by relative path."""
    folder = Path(run_dir) / "figures"
    return sorted(folder.rglob("*.png")) if folder.is_dir() else []


def save_image(image: torch.Tensor | np.ndarray, where: Preset | PathLike, name: str) -> Path:
    """Write an image as ``<run_dir>/figures/<name>.png`` and return the path.

    Args:
        image: ``[H, W, 3]`` RGB or ``[H, W]`` grey, float in [0, 1] (clamped) or uint8.
        where: a preset or a run folder.
        name: file stem, e.g. ``"01_orbit"`` (``.png`` is added when missing).
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"save_image expects [H, W], [H, W, 3] or [H, W, 4], got shape {list(array.shape)}")
    array = to_uint8(array)
    stem = name[:-4] if name.endswith(".png") else name
    if not _NAME.match(stem):
        raise ValueError(f"Figure name {name!r} must be a plain file stem such as '01_orbit'")
    path = figures_dir(where) / f"{stem}.png"
    Image.fromarray(array).save(path)
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None


def _collect_metrics_leniently(run_dir: Path) -> tuple[dict[str, dict[str, int | float]], list[str]]:
    """Like :func:`collect_metrics`, but a damaged file is left out and described instead of raising."""
    folder = run_dir / "metrics"
    metrics: dict[str, dict[str, int | float]] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            metrics[path.stem] = _read_metrics_file(path)
        except MetricsError as err:
            problems.append(str(err).replace(str(run_dir) + "/", "", 1))
    return metrics, problems


SECTIONS: tuple[tuple[str, str], ...] = (
    ("results", "Results"),
    ("stages", "Stage by stage"),
    ("notebooks", "Notebooks"),
    ("preset", "Preset"),
    ("metrics", "Every recorded metric"),
)
"""The report's sections in page order: ``(HTML id, heading)``. The preset and the metrics are collapsed."""

LOSES = "\u26a0"
"""The mark of a learned method that scores below a baseline."""


class _Page:
    """The report as Markdown and HTML side by side (each piece added to both)."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        self.md += ["#" * level + " " + text, ""]
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self.html.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")

    def para(self, text: str, css: str | None = None) -> None:
        self.md += [text, ""]
        klass = f' class="{css}"' if css else ""
        self.html.append(f"<p{klass}>{html.escape(text)}</p>")

    def items(self, lines: list[str]) -> None:
        self.md += [*[f"- {line}" for line in lines], ""]
        self.html.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")

    def table(self, header: list[str], rows: list[list[str]], css: str | None = None,
              row_css: list[str] | None = None, link_column: int | None = None) -> None:
        """A table; the cells of ``link_column`` (relative paths) become links to themselves."""

        def md_cell(i: int, cell: str) -> str:
            return f"[{_md_cell(cell)}]({cell})" if i == link_column and cell else _md_cell(cell)

        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(md_cell(i, c) for i, c in enumerate(row)) + " |" for row in rows]
        self.md.append("")
        klass = f' class="{css}"' if css else ""
        out = [f"<table{klass}><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
        for r, row in enumerate(rows):
            cells = []
            for i, cell in enumerate(row):
                text = html.escape(cell)
                if i == link_column and cell:
                    text = f'<a href="{text}">{text}</a>'
                cells.append(f"<td>{text}</td>")
            rc = f' class="{row_css[r]}"' if row_css and row_css[r] else ""
            out.append(f"<tr{rc}>" + "".join(cells) + "</tr>")
        self.html.append("\n".join(out) + "</tbody></table>")

    def figure(self, rel: str, number: int, caption: str) -> None:
        name = rel.rsplit("/", 1)[-1]
        self.md += [f"![{rel}]({rel})", "", f"*Figure {number} ({name}).* {caption}", ""]
        esc = html.escape(rel)
        self.html.append(f'<figure id="fig-{html.escape(Path(name).stem)}"><img src="{esc}" alt="{html.escape(caption)}">'
                         f"<figcaption><b>Figure {number}</b> ({html.escape(name)}). {html.escape(caption)}"
                         "</figcaption></figure>")

    def open_section(self, anchor: str, title: str, collapsed_summary: str | None = None) -> None:
        self.html.append(f'<section id="{anchor}">')
        self.heading(2, title)
        if collapsed_summary is not None:
            self.md += ["<details>", f"<summary>{html.escape(collapsed_summary)}</summary>", ""]
            self.html.append(f"<details><summary>{html.escape(collapsed_summary)}</summary>")

    def close_section(self, collapsed: bool = False) -> None:
        if collapsed:
            self.md += ["</details>", ""]
            self.html.append("</details>")
        self.html.append("</section>")


def format_duration(seconds: float, compact: bool = False) -> str:
    """``"12.3 s"``, ``"3 min 05 s"``, ``"1 h 02 min"`` (``compact``: ``"3m05s"``, ``"1h02m03s"``, for progress lines)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if compact:
        return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _per_head(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _headline(page: _Page, metrics: dict[str, dict[str, int | float]], preset: dict[str, Any],
              course: results.Course | None) -> None:
    rows = results.headline_rows(metrics, course)
    lpips = any(r.lpips is not None for r in rows if r.source != "paper")  # a column only where we measured it
    page.para("Unseen test subjects, one photo in and the other 15 views scored (the paper's protocol, notebook 07): "
              "PSNR, SSIM and MAE over the whole image on white, identity = FaceNet cosine of each rendered view to "
              "its photo; means per subject, then over subjects."
              + ("" if lpips else " LPIPS was not measured (it needs LPIPS weights on disk, which these runs did not have)."))
    body, css = [], []
    for r in rows:
        paper = r.source == "paper"  # the paper gives SSIM, MAE and LPIPS to two decimals
        if r.loses_to:
            note = f"{LOSES} loses to " + "; ".join(r.loses_to)
        elif not r.learned:
            note = "baseline"
        else:
            note = "as published" if paper else ""
        cells = [r.method, results.source_label(r.source, preset, course), _cell(r.psnr, ".2f"),
                 _cell(r.ssim, ".2f" if paper else ".3f"), _cell(r.mae, ".2f" if paper else ".4f")]
        cells += [_cell(r.lpips, ".2f" if paper else ".3f")] if lpips else []
        body.append([*cells, _cell(r.identity, ".3f"), _per_head(r.seconds), note])
        css.append(" ".join(c for c in ("loses" if r.loses_to else "", "baseline" if not r.learned else "",
                                        r.source.replace(" ", "-")) if c))
    header = ["method", "from", "PSNR (dB)", "SSIM", "MAE", *(["LPIPS"] if lpips else []), "identity (cosine)",
              "time per head", "note"]
    page.table(header, body, css="headline", row_css=css)
    page.para(f"{LOSES} marks a learned head that scores below a baseline of the same run on PSNR or SSIM. "
              + results.baselines_note(metrics)
              + ("" if course is not None else " The course checkpoint (data_samples/course) is not on this machine."),
              css="note")


def write_report(run_dir: PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` and return both paths.

    The page reads results first (:data:`SECTIONS`):

    1. **Results**: the headline table (:func:`fastavatar_nb.report_results.headline_rows`: the whole image on
       white for the template, the run's other baselines, the feed-forward and the refined head, the paper's
       numbers and the shipped course checkpoint's, a learned head below a baseline marked), one sentence
       per stage computed from the metrics, a paragraph on what this scale can show, and for a real-data
       run the subjects it used.
    2. **Stage by stage**: each notebook's outcome with its figures (``figures/NN_*.png``) and captions.
    3. **Notebooks**: status, time and executed copy of each.
    4. **Preset** and 5. **every recorded metric** (names with units, values rounded to what they mean),
       both collapsed in the HTML (``<details>``).

    Missing pieces are named as missing rather than left out silently; a damaged metrics file or status
    entry is named in the report, never raised (the report is written at the end of a long run).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    preset_json = _read_json(run_dir / "preset.json")
    preset: dict[str, Any] = preset_json if isinstance(preset_json, dict) else {}
    status = _read_json(run_dir / "run_status.json")
    notebooks: dict[str, Any] = status.get("notebooks", {}) if isinstance(status, dict) else {}
    if not isinstance(notebooks, dict):
        notebooks = {}
    notebooks = {str(k): v for k, v in notebooks.items() if isinstance(v, dict)}
    metrics, metric_problems = _collect_metrics_leniently(run_dir)
    figures = [p.relative_to(run_dir).as_posix() for p in list_figures(run_dir)]
    split = _read_json(run_dir / "dataset" / "split.json")
    course = results.load_course()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    page = _Page()
    page.heading(1, f"fastavatar-nb run report: {run_dir.name}")
    failed = [s for s, info in notebooks.items() if info.get("status") == "failed"]
    ran = [info for info in notebooks.values() if isinstance(info.get("seconds"), int | float)]
    summary = f"Preset {preset.get('name', '(no preset.json)')}; written {stamp}; run folder {run_dir}."
    if notebooks:
        ok = sum(info.get("status") in ("ok", "skipped") for info in notebooks.values())
        summary += (f" {ok} of {len(notebooks)} notebooks ran ok"
                    f" ({format_duration(sum(float(i['seconds']) for i in ran))} executing).")
    page.para(summary, css="meta")

    page.open_section("results", "Results")
    for stem in failed:
        err = str(notebooks[stem].get("error") or "").split("\n")[0][:200]
        page.para(f"{LOSES} Notebook {stem} failed{': ' + err if err else ''}. Its numbers and those of the "
                  "notebooks after it may be missing or stale.", css="failed")
    _headline(page, metrics, preset, course)
    outcomes = results.stage_outcomes(metrics, preset)
    if outcomes:
        page.para("What each stage found (its figures are in the next section):")
        page.items([f"{n} {text}" for n, text in outcomes.items()])
    else:
        page.para("No stage recorded an outcome (metrics/*.json missing).")
    page.para(results.scale_note(preset, metrics, course), css="scale")
    real = results.real_data_note(preset, split if isinstance(split, dict) else None)
    if real:
        page.para(real, css="real-data")
    page.close_section()

    page.open_section("stages", "Stage by stage")
    by_stage: dict[str, list[str]] = {}
    for rel in figures:
        prefix = rel.rsplit("/", 1)[-1].split("_", 1)[0]
        by_stage.setdefault(prefix if prefix.isdigit() else "", []).append(rel)
    numbers = sorted({*(s[:2] for s in notebooks if s[:2].isdigit()), *(s[:2] for s in metrics if s[:2].isdigit()),
                      *(n for n in by_stage if n)})
    figure_number = 0
    for number in numbers + ([""] if "" in by_stage else []):
        page.heading(3, f"{number} {results.stage_title(number)}" if number else "Other figures", f"stage-{number or 'other'}")
        stems = [s for s in notebooks if s.startswith(number + "_")] if number else []
        for stem in stems:
            info = notebooks[stem]
            took = f" in {format_duration(float(info['seconds']))}" if isinstance(info.get("seconds"), int | float) else ""
            page.para(f"Notebook {stem}: {info.get('status', '?')}{took}.", css="status")
        if number in outcomes:
            page.para(outcomes[number])
        for rel in by_stage.get(number, []):
            figure_number += 1
            page.figure(rel, figure_number, results.figure_caption(Path(rel).stem))
    if not numbers and not by_stage:
        page.para("No notebook has run into this folder: no outcomes and no figures (figures/*.png missing).")
    page.close_section()

    page.open_section("notebooks", "Notebooks")
    if notebooks:
        rows = []
        for stem, info in notebooks.items():
            seconds = info.get("seconds")
            executed = info.get("executed") if isinstance(info.get("executed"), str) else ""
            rows.append([stem, str(info.get("status", "?")),
                         format_duration(float(seconds)) if isinstance(seconds, int | float) else "", executed or "",
                         str(info.get("error") or "")[:200]])
        page.table(["notebook", "status", "time", "executed copy", "error"], rows, link_column=3)
    else:
        page.para("No notebook has been run into this folder (`run_status.json` missing).")
    page.close_section()

    rows = [[f"{k}.{kk}" if isinstance(v, dict) else str(k), str(vv)]  # a stage's config: one row per field
            for k, v in preset.items() for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)])]
    page.open_section("preset", "Preset", f"The preset{' ' + str(preset['name']) if 'name' in preset else ''}: "
                      f"{len(rows)} fields" if preset else "No preset")
    if preset:
        page.table(["field", "value"], rows)
    else:
        page.para("No `preset.json` in the run folder.")
    page.close_section(collapsed=True)

    count = sum(len(v) for v in metrics.values())
    page.open_section("metrics", "Every recorded metric",
                      f"{count} values from {len(metrics)} notebooks, each with its unit" if metrics else "None")
    if metrics:
        page.table(["notebook", "metric", "value", "unit"],
                   [[nb, name, results.format_metric(name, v), results.metric_unit(name)]
                    for nb, values in metrics.items() for name, v in values.items()], css="dump")
    elif not metric_problems:
        page.para("No metrics recorded (`metrics/*.json` missing).")
    for problem in metric_problems:
        page.para(f"Left out: {problem}")
    page.close_section(collapsed=True)

    md_path = run_dir / "report.md"
    html_path = run_dir / "report.html"
    md_path.write_text("\n".join(page.md), encoding="utf-8")
    html_path.write_text(
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>fastavatar-nb report {html.escape(run_dir.name)}</title><style>{_STYLE}</style></head>"
        "<body>\n" + "\n".join(page.html) + "\n</body></html>\n", encoding="utf-8")
    return md_path, html_path


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70em;margin:1em auto;padding:0 1em;line-height:1.45;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
    "table.headline td:nth-child(-n+2){white-space:nowrap}"
    "table.headline td:nth-child(n+3):not(:last-child){text-align:right;font-variant-numeric:tabular-nums}"
    "tr.baseline{color:#555}tr.paper,tr.course-checkpoint{background:#f6f6f6}tr.loses td{background:#fde2e2}"
    "p.meta,p.status{color:#555;font-size:.9em}p.failed{color:#a00;font-weight:bold}"
    "p.scale,p.real-data{border-left:3px solid #999;padding-left:.6em}"
    "figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#333}"
    "details{margin:.5em 0}summary{cursor:pointer;color:#036}"
)


def has_display(environ: Mapping[str, str] | None = None, platform: str | None = None) -> bool:
    """Whether a browser window can open here: always on macOS and Windows; elsewhere (Linux, BSD) only
    with ``DISPLAY`` or ``WAYLAND_DISPLAY`` set (not over plain SSH, in a container or on CI)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if platform == "darwin" or platform.startswith(("win", "cygwin")):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def open_report(path: PathLike, opener: Callable[[str], bool] | None = None, display: bool | None = None) -> bool:
    """Open the report ``path`` (``report.html``) in the default browser where there is a display.

    Args:
        opener: called with the file's ``file://`` URL; returns whether a browser took it (default
            :func:`webbrowser.open`).
        display: whether there is a display (default :func:`has_display`); without one nothing is called,
            so no text-mode browser takes over the terminal.

    Returns:
        ``True`` when a browser took it; ``False`` without a display or when no browser could (the caller
        prints the path instead).
    """
    if not (has_display() if display is None else display):
        return False
    return bool((opener or webbrowser.open)(Path(path).resolve().as_uri()))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]
