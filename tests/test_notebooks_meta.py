"""Notebook hygiene: scripts/check_notebooks.py itself, and every committed notebook against the house rules.

Rules for ``notebooks/NN_name.ipynb`` (style guide, sections 3 and "Pull-request checklist"):
clean (no execution counts, small outputs, no attachments), a Python 3 kernel, a setup cell (first
or second code cell) reading the one preset switch ``FASTAVATAR_PRESET`` through
``fastavatar_nb.presets.get`` (and no other cell reading it), and no absolute paths.
"""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


check = load_script("scripts/check_notebooks.py")


def _dirty_notebook(path: Path, payload_kb: int = 1) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    md = new_markdown_cell("![x](attachment:x.png)")
    md["attachments"] = {"x.png": {"image/png": "iVBORw0KGgo="}}
    code = new_code_cell("print('x' * 10)", execution_count=3)
    code.outputs = [new_output("stream", name="stdout", text="x" * (payload_kb * 1000))]
    code.metadata["execution"] = {"iopub.status.busy": "2026-11-23T19:00:00Z"}
    nb.cells = [md, code]
    nbformat.write(nb, path)
    return path


def test_check_flags_counts_attachments_and_large_outputs(tmp_path: Path) -> None:
    path = _dirty_notebook(tmp_path / "01_dirty.ipynb", payload_kb=250)
    problems = check.check_notebook(path, max_output_kb=200)
    text = "\n".join(problems)
    assert "execution counts in cell(s) [1]" in text
    assert "attachments in cell(s) [0]" in text
    assert "more than 200 kB" in text
    assert check.check_notebook(path, max_output_kb=300) == problems[:2]


def test_strip_cleans_and_is_idempotent(tmp_path: Path) -> None:
    path = _dirty_notebook(tmp_path / "01_dirty.ipynb")
    assert check.strip_notebook(path) is True
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[1].outputs == [] and nb.cells[1].execution_count is None
    assert "execution" not in nb.cells[1].metadata and "widgets" not in nb.metadata
    assert nb.cells[1].source == "print('x' * 10)" and nb.metadata.kernelspec.name == "python3"
    before = path.read_bytes()
    assert check.strip_notebook(path) is False
    assert path.read_bytes() == before
    # Attachments are content, not output: strip keeps them and the check still reports them.
    assert [p for p in check.check_notebook(path) if "attachments" not in p] == []


def test_a_cell_without_an_id_is_flagged_and_strip_gives_it_one(tmp_path: Path) -> None:
    path = tmp_path / "01_ids.ipynb"
    nb = new_notebook(cells=[new_markdown_cell("# a"), new_code_cell("x = 1")])
    nbformat.write(nb, path)
    raw = path.read_text()
    doc = json.loads(raw)
    del doc["cells"][1]["id"]  # as a cell inserted by a script that writes JSON
    path.write_text(json.dumps(doc))
    assert any("cell(s) [1] have no id" in p for p in check.check_notebook(path))
    assert check.strip_notebook(path) is True
    ids = [c.get("id") for c in json.loads(path.read_text())["cells"]]
    assert ids[0] == doc["cells"][0]["id"] and isinstance(ids[1], str) and len(ids[1]) == 8
    assert check.check_notebook(path) == []


def test_check_output_cells_keep_their_reference_output(tmp_path: Path) -> None:
    nb = new_notebook()
    marked = new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(2 + 2)", execution_count=2)
    marked.outputs = [new_output("stream", name="stdout", text="4\n")]
    plain = new_code_cell("print(1)", execution_count=1)
    plain.outputs = [new_output("stream", name="stdout", text="1\n")]
    nb.cells = [marked, plain]
    path = tmp_path / "01_marked.ipynb"
    nbformat.write(nb, path)
    assert check.check_notebook(path) == [f"{path}: execution counts in cell(s) [1] (run `make strip`)"]
    assert check.strip_notebook(path) is True
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].execution_count == 2 and cells[0].outputs[0]["text"] == "4\n"
    assert cells[1].execution_count is None and cells[1].outputs == []
    assert check.check_notebook(path) == []


def test_check_rejects_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "01_broken.ipynb"
    path.write_text("{ not json")
    assert "not a valid notebook" in check.check_notebook(path)[0]


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main([str(tmp_path)]) == 0
    assert "nothing to check" in capsys.readouterr().out
    assert check.main([str(tmp_path / "missing")]) == 1
    path = _dirty_notebook(tmp_path / "01_dirty.ipynb")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _dirty_notebook(tmp_path / ".ipynb_checkpoints" / "01_dirty-checkpoint.ipynb")
    assert check.main([str(tmp_path)]) == 1
    assert "1 notebook(s)" in capsys.readouterr().err
    assert check.main(["--strip", str(tmp_path)]) == 0
    assert check.main([str(path)]) == 1  # the attachment remains
    nb = nbformat.read(path, as_version=4)
    nb.cells = nb.cells[1:]
    nbformat.write(nb, path)
    assert check.main([str(tmp_path)]) == 0
    assert "1 notebook(s) clean" in capsys.readouterr().out


def test_sanitize_file_parses_and_scrubs() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "tests" / "nbval_sanitize.cfg")
    assert config.sections()
    text = "torch 2.14.1 | took 12.3 s at 0x7f3a in /tmp/pytest-1/run | 4.5it/s"
    for section in config.sections():
        text = re.sub(config[section]["regex"], config[section]["replace"], text)
    assert text == "torch VERSION | took DURATION at 0xADDRESS in TMPPATH | RATE"


MAX_CELL_LINES = 25
"""Notebooks stay thin: a longer code cell holds logic that belongs in the library, with tests."""


def _code_cells(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_follows_the_rules(path: Path) -> None:
    assert check.check_notebook(path) == []
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    code = _code_cells(nb)
    setup = "\n".join(code[:2])
    assert "FASTAVATAR_PRESET" in setup and "presets.get(" in setup, (
        "the setup cell (first or second code cell) must read the preset switch: "
        'preset = fa.presets.get(os.environ.get("FASTAVATAR_PRESET", "auto"))'
    )
    long = {i: len(c.splitlines()) for i, c in enumerate(code) if len(c.splitlines()) > MAX_CELL_LINES}
    assert not long, f"code cells over {MAX_CELL_LINES} lines (code cell index: lines): {long}; move logic into the library"
    sources = "\n".join(code)
    assert sources.count("FASTAVATAR_PRESET") == 1, "one switch per notebook: read FASTAVATAR_PRESET once"
    assert not re.search(r"['\"]/(work|home|scratch|Users)/", sources), "no absolute paths in notebooks"
    assert "fastavatar_nb" in sources



def test_output_checked_cells_are_marked_as_nbval_reads_them() -> None:
    """nbval compares a cell's output only when a line of it is exactly ``# NBVAL_CHECK_OUTPUT``; a marker with
    more text on its line would keep its output (check_notebooks) but never be compared. Every such cell has a
    reference output, and the notebooks hold some: deterministic printed checks at the smoke preset."""
    from nbval.plugin import find_comment_markers

    checked = 0
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type != "code" or check.CHECK_OUTPUT_MARKER not in cell.source:
                continue
            assert dict(find_comment_markers(cell.source)).get("check") is True, \
                f"{path.name} cell {i}: put '# NBVAL_CHECK_OUTPUT' alone on its line (nbval ignores it otherwise)"
            assert cell.outputs and cell.execution_count, f"{path.name} cell {i}: no reference output"
            checked += 1
    assert checked >= 4, checked

# ------------------------------------------------------------------ numbers in the prose
ROOT = Path(__file__).resolve().parent.parent
MEASURED = re.compile(r"(?<![\w.])(\d+\.\d+)\s*(dB|x\b|%| s\b| ms\b| min\b)")
"""A measured-looking number in prose: a decimal with a unit (dB, x, %, s, ms, min)."""


def _recorded_numbers() -> set[float]:
    """Every number of the recorded results (benchmarks/results/, data_samples/**.json)."""
    out: set[float] = set()

    def walk(obj) -> None:
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj and abs(obj) != float("inf"):
            out.add(float(obj))

    for f in [*ROOT.glob("benchmarks/results/**/*.json"), *ROOT.glob("data_samples/**/*.json")]:
        walk(json.loads(f.read_text()))
    return out


def unbacked_numbers(markdown: str, paper: str, recorded: set[float]) -> list[str]:
    """The measured-looking numbers of ``markdown`` that neither the paper's text nor a recorded result holds
    (a recorded value matches when it rounds to the printed digits, as a value or as a percentage)."""
    paper_numbers = set(re.findall(r"\d+\.\d+", paper))
    bad = []
    for m in MEASURED.finditer(markdown):
        num = m.group(1)
        if num in paper_numbers:
            continue
        digits, value = len(num.split(".")[1]), float(num)
        if not any(abs(round(r, digits) - value) < 1e-9 or abs(round(100 * r, digits) - value) < 1e-9 for r in recorded):
            bad.append(m.group(0))
    return bad


def test_prose_states_no_number_that_no_result_backs(shared_dir: Path) -> None:
    """Issue 32: a number in a notebook's text is the paper's or a recorded result's (benchmarks/results,
    the shipped checkpoint's metrics), never a number typed once and left behind by the next run."""
    paper = (shared_dir / "paper" / "fastavatar_paper.txt").read_text()
    recorded = _recorded_numbers()
    assert unbacked_numbers("the fit reached 31.18 dB, 2.5x faster", paper, {31.1831, 2.4999}) == []
    assert unbacked_numbers("a typed result: 27.3141 dB", paper, recorded) == ["27.3141 dB"]
    bad = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] == "markdown":
                found = unbacked_numbers("".join(cell["source"]), paper, recorded)
                if found:
                    bad[f"{path.name} cell {i}"] = found
    assert not bad, f"numbers in markdown that no recorded result or the paper holds (compute them in a code cell): {bad}"
