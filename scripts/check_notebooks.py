#!/usr/bin/env python3
"""Check (or strip) that committed notebooks are clean.

A clean notebook has no execution counts, no pasted-in attachments, and at most
``--max-output-kb`` (default 200) of outputs and widget state in all. ``make test`` runs the
check first; ``make strip`` (``--strip``) empties every code cell's outputs and execution
count and drops run-time metadata (cell ``execution``/``ExecuteTime``/``collapsed``/
``scrolled``, notebook ``widgets``) with nbformat, in place.

Exception: a cell whose source contains ``# NBVAL_CHECK_OUTPUT`` keeps its outputs and
execution count (nbval compares its output and treats a cell with outputs but no count as
an error), and its outputs still count towards the budget.

Usage::

    python scripts/check_notebooks.py [--strip] [--max-output-kb N] [PATH ...]

PATHs are notebooks or folders searched recursively (``.ipynb_checkpoints`` skipped);
default ``notebooks/`` next to this script's folder. Exit code 0 when clean (or stripped),
1 when a notebook is dirty or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import nbformat

DEFAULT_MAX_OUTPUT_KB = 200
CELL_RUNTIME_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")
NOTEBOOK_RUNTIME_METADATA = ("widgets",)
CHECK_OUTPUT_MARKER = "NBVAL_CHECK_OUTPUT"


def keeps_output(cell: nbformat.NotebookNode) -> bool:
    """True for a code cell marked ``# NBVAL_CHECK_OUTPUT``: its stored output is the reference."""
    return cell.get("cell_type") == "code" and CHECK_OUTPUT_MARKER in cell.get("source", "")


def find_notebooks(paths: Iterable[Path]) -> list[Path]:
    """Notebook files among ``paths`` (folders searched recursively, checkpoints skipped), sorted."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        elif path.suffix == ".ipynb" and path.is_file():
            found.add(path)
        elif not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    return sorted(found)


def output_bytes(nb: nbformat.NotebookNode) -> int:
    """Bytes of JSON taken by every cell's outputs plus the notebook's widget state."""
    total = 0
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            total += len(json.dumps(cell.get("outputs", []), separators=(",", ":")))
    widgets = nb.metadata.get("widgets")
    if widgets:
        total += len(json.dumps(widgets, separators=(",", ":")))
    return total


def check_notebook(path: Path, max_output_kb: float = DEFAULT_MAX_OUTPUT_KB) -> list[str]:
    """Problems that make ``path`` unfit to commit; ``[]`` when clean."""
    try:
        text = path.read_text(encoding="utf-8")
        nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT)
        nbformat.validate(nb)
    except (OSError, ValueError) as err:  # NotJSONError and ValidationError are ValueErrors
        return [
            f"{path}: not a valid notebook ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ]
    problems = []
    counted = [
        i
        for i, c in enumerate(nb.cells)
        if c.get("cell_type") == "code" and c.get("execution_count") and not keeps_output(c)
    ]
    if counted:
        problems.append(f"{path}: execution counts in cell(s) {counted} (run `make strip`)")
    if (nb.nbformat, nb.nbformat_minor) >= (4, 5):  # nbformat's reader fills missing ids in: look at the file
        no_id = [i for i, c in enumerate(json.loads(text)["cells"]) if "id" not in c]
        if no_id:
            problems.append(f"{path}: cell(s) {no_id} have no id (run `make strip`, which gives them one)")
    attached = [i for i, c in enumerate(nb.cells) if c.get("attachments")]
    if attached:
        problems.append(
            f"{path}: attachments in cell(s) {attached}: write figures to files or produce them with code"
        )
    size = output_bytes(nb)
    if size > max_output_kb * 1000:
        problems.append(
            f"{path}: outputs take {size / 1000:.0f} kB, more than {max_output_kb:g} kB (run `make strip`)"
        )
    return problems


def strip_notebook(path: Path) -> bool:
    """Remove outputs, execution counts and run-time metadata from ``path`` in place; True if it changed."""
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=nbformat.NO_CONVERT)
    for cell in nb.cells:
        if "id" not in cell and (nb.nbformat, nb.nbformat_minor) >= (4, 5):  # a cell added by hand or by a script
            cell["id"] = uuid.uuid4().hex[:8]
        if cell.get("cell_type") == "code" and not keeps_output(cell):
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in CELL_RUNTIME_METADATA:
            cell.get("metadata", {}).pop(key, None)
    for key in NOTEBOOK_RUNTIME_METADATA:
        nb.metadata.pop(key, None)
    after = nbformat.writes(nb)
    if not after.endswith("\n"):
        after += "\n"
    if after == before:
        return False
    path.write_text(after, encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks or folders (default: notebooks/)")
    parser.add_argument(
        "--strip", action="store_true", help="strip the notebooks in place instead of checking"
    )
    parser.add_argument(
        "--max-output-kb", type=float, default=DEFAULT_MAX_OUTPUT_KB, help="output budget per notebook"
    )
    args = parser.parse_args(argv)
    default = Path(__file__).resolve().parents[1] / "notebooks"
    paths = args.paths or [default]
    try:  # an explicit path must exist; a missing default folder just means no notebooks yet
        notebooks = (
            find_notebooks(args.paths)
            if args.paths
            else find_notebooks([default] if default.is_dir() else [])
        )
    except FileNotFoundError as err:
        print(f"check_notebooks: {err}", file=sys.stderr)
        return 1
    if not notebooks:
        print(f"check_notebooks: no notebooks under {', '.join(map(str, paths))}: nothing to check")
        return 0
    if args.strip:
        changed = [p for p in notebooks if strip_notebook(p)]
        print(f"check_notebooks: stripped {len(changed)} of {len(notebooks)} notebook(s)")
        for p in changed:
            print(f"  {p}")
        return 0
    problems = [msg for p in notebooks for msg in check_notebook(p, args.max_output_kb)]
    for msg in problems:
        print(msg, file=sys.stderr)
    if problems:
        print(f"check_notebooks: {len(problems)} problem(s) in {len(notebooks)} notebook(s)", file=sys.stderr)
        return 1
    print(f"check_notebooks: {len(notebooks)} notebook(s) clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
