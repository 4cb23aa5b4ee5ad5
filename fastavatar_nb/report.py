"""Metrics and figures a run leaves behind, and the one-page run report.

Convention (every notebook follows it, ``fastavatar-nb run`` reads it):

- ``<run_dir>/metrics/NN_name.json``: a flat JSON object ``{metric name: number}`` per
  notebook, written with :func:`record_metrics` (later calls from the same notebook merge
  into the file, newer values win). Names are free text such as ``"psnr_test"`` or
  ``"fit_seconds"``; values are finite ints or floats (bools are stored as 0/1).
- ``<run_dir>/figures/*.png``: figures, written with :func:`save_image` or by any code
  that writes a PNG into :func:`figures_dir`. Prefix them with the notebook number
  (``"02_template_orbit.png"``) so that the report groups them.
- ``<run_dir>/preset.json``: the preset (written by ``fastavatar_nb.presets.setup``).
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
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastavatar_nb.presets import Preset

__all__ = [
    "MetricsError",
    "collect_metrics",
    "figures_dir",
    "list_figures",
    "metrics_path",
    "record_metrics",
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
    from .viewers import to_uint8  # here, so the CLI's report does not import plotly

    array = to_uint8(array)
    stem = name[:-4] if name.endswith(".png") else name
    if not _NAME.match(stem):
        raise ValueError(f"Figure name {name!r} must be a plain file stem such as '01_orbit'")
    path = figures_dir(where) / f"{stem}.png"
    Image.fromarray(array).save(path)
    return path


def _format_number(value: int | float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.3e}"


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


def write_report(run_dir: PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` and return both paths.

    The report lists the preset (``preset.json``), each notebook's status and time
    (``run_status.json``), the metric table (``metrics/*.json``) and the figures
    (``figures/*.png``, linked relative to the run folder). Missing pieces are named as
    missing rather than left out silently; a damaged metrics file or status entry is named in the
    report, never raised (the report is written at the end of a long run).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    preset = _read_json(run_dir / "preset.json")
    status = _read_json(run_dir / "run_status.json")
    notebooks: dict[str, Any] = status.get("notebooks", {}) if isinstance(status, dict) else {}
    if not isinstance(notebooks, dict):
        notebooks = {}
    notebooks = {str(k): v for k, v in notebooks.items() if isinstance(v, dict)}
    metrics, metric_problems = _collect_metrics_leniently(run_dir)
    figures = [p.relative_to(run_dir).as_posix() for p in list_figures(run_dir)]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    md: list[str] = [
        f"# fastavatar-nb run report: `{run_dir.name}`",
        "",
        f"Written {stamp}. Run folder: `{run_dir}`.",
        "",
    ]
    body: list[str] = [f"<h1>fastavatar-nb run report: <code>{html.escape(run_dir.name)}</code></h1>"]
    body.append(f"<p>Written {stamp}. Run folder: <code>{html.escape(str(run_dir))}</code>.</p>")

    md += ["## Preset", ""]
    body.append("<h2>Preset</h2>")
    if isinstance(preset, dict):
        items = [(str(k), str(v)) for k, v in preset.items()]
        md += ["| field | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in items], ""]
        body.append(_html_table(["field", "value"], items))
    else:
        md += ["No `preset.json` in the run folder.", ""]
        body.append("<p>No <code>preset.json</code> in the run folder.</p>")

    md += ["## Notebooks", ""]
    body.append("<h2>Notebooks</h2>")
    if notebooks:
        rows = []
        for stem, info in notebooks.items():
            seconds = info.get("seconds")
            took = f"{seconds:.1f} s" if isinstance(seconds, int | float) else ""
            executed = info.get("executed") or ""
            executed = executed if isinstance(executed, str) else ""
            rows.append((stem, str(info.get("status", "?")), took, executed, str(info.get("error") or "")))
        md += ["| notebook | status | time | executed copy | error |", "|---|---|---|---|---|"]
        md += [
            f"| {s} | {st} | {t} | {f'[{e}]({e})' if e else ''} | {_md_cell(err)} |"
            for s, st, t, e, err in rows
        ]
        md.append("")
        body.append(_html_table(["notebook", "status", "time", "executed copy", "error"], rows, link_col=3))
    else:
        md += ["No notebook has been run into this folder (`run_status.json` missing).", ""]
        body.append("<p>No notebook has been run into this folder.</p>")

    md += ["## Metrics", ""]
    body.append("<h2>Metrics</h2>")
    if metrics:
        rows = [(nb, name, _format_number(v)) for nb, values in metrics.items() for name, v in values.items()]
        md += [
            "| notebook | metric | value |",
            "|---|---|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows],
            "",
        ]
        body.append(_html_table(["notebook", "metric", "value"], rows))
    elif not metric_problems:
        md += ["No metrics recorded (`metrics/*.json` missing).", ""]
        body.append("<p>No metrics recorded.</p>")
    for problem in metric_problems:
        md += [f"Left out: {problem}", ""]
        body.append(f"<p>Left out: {html.escape(problem)}</p>")

    md += ["## Figures", ""]
    body.append("<h2>Figures</h2>")
    if figures:
        for rel in figures:
            md += [f"### {rel}", "", f"![{rel}]({rel})", ""]
            esc = html.escape(rel)
            body.append(
                f'<figure><img src="{esc}" alt="{esc}" style="max-width:100%"><figcaption>{esc}</figcaption></figure>'
            )
    else:
        md += ["No figures (`figures/*.png` missing).", ""]
        body.append("<p>No figures.</p>")

    md_path = run_dir / "report.md"
    html_path = run_dir / "report.html"
    md_path.write_text("\n".join(md))
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    html_path.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>fastavatar-nb report {html.escape(run_dir.name)}</title><style>{style}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return md_path, html_path


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _html_table(header: list[str], rows: list[tuple[str, ...]], link_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = [f"<table><tr>{head}</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = html.escape(str(cell))
            if i == link_col and cell:
                text = f'<a href="{text}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)
