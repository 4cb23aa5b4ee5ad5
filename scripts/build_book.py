"""Build a static HTML site of the course: the notebooks with a run's outputs, and the run's report.

    python scripts/build_book.py                        # runs/smoke -> runs/smoke/book/index.html
    python scripts/build_book.py --run-dir runs/course --out /tmp/course-book

(``make book`` runs it for ``runs/$(PRESET)``.) The site is built with Jupyter Book 1.x (Sphinx,
MyST-NB, the Sphinx Book Theme) from a temporary source folder that this script assembles:

- ``intro.md``: what the course is, the notebooks in order (each with its title), how to run it;
- the notebooks ``NN_name.ipynb`` in order: the executed copy ``<run dir>/executed/NN_name.ipynb``
  where there is one, else the committed ``notebooks/NN_name.ipynb`` (no outputs; a note says so);
- ``report.md``: the run's report with its figures, or a page saying the report appears after ``make run``.

Nothing is executed: the pages show the outputs the notebooks carry. Nothing is fetched either: MathJax
is served from the site itself (the ``sphinx-mathjax-offline`` package), intersphinx has no mapping,
and widget outputs show the static ``text/html`` that every viewer of this package puts beside its
widget (the ipywidgets embed scripts would come from a CDN, and the run stores no widget state).

``--out`` (default ``<run dir>/book``) is replaced only when it is a previous build of this script
(it holds the marker file ``.fastavatar-book``) or empty; anything else is refused with one error line
and exit code 2, as is a missing Jupyter Book (``pip install -e '.[book]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastavatar_nb.cli import discover_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
MARKER = ".fastavatar-book"
"""File in the output folder that marks it as this script's build (so a rebuild may replace it)."""
INSTALL_HINT = "pip install -e '.[book]'"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CDN_MATHJAX = re.compile(r"""<script[^>]*\ssrc=["']https?://[^"']*/mathjax/[^"']*["'][^>]*>\s*</script>""", re.I)

INTRO = """\
# FastAvatar, notebook by notebook

This course rebuilds **FastAvatar**, which turns a single photo of a face into a 3D Gaussian
Splatting head, one Jupyter notebook per stage: the data, the renderer, the template, the
auto-decoder, the encoder, latent editing, test-time refinement, the evaluation, and your own photo.
Each notebook derives its stage's equations, checks them against the `fastavatar_nb` package, and
trains or evaluates at the run's preset.

{source}

## The notebooks

{notebooks}

The [run report](report.md) gathers the run's preset, timings, metrics and figures.

## Run it yourself

```bash
make run     # run every notebook into runs/<preset>/, with the report
make book    # this site, from that run: runs/<preset>/book/index.html
```

`make run` picks the preset itself (`full` on a CUDA GPU, `smoke` on a CPU; `PRESET=course` for the
300-subject CPU run); `make book PRESET=...` builds the site of that preset's run.
"""

NO_REPORT = """\
# Run report

This run folder has no report yet (`{run_dir}/report.md` is missing).

The report (the preset, every notebook's status and time, the metrics and the figures) appears
here after `make run`, which executes the notebooks and writes it, followed by `make book`.
"""


class BookError(Exception):
    """A problem reported as one line and exit code 2."""


@dataclass
class Source:
    """The assembled book source: what went into it."""

    folder: Path
    notebooks: list[str] = field(default_factory=list)
    """Notebook file names in order, e.g. ``"00_data.ipynb"``."""
    titles: list[str] = field(default_factory=list)
    """Their titles (first headings), e.g. ``"00 · Data: subjects seen by sixteen cameras"``."""
    without_outputs: list[str] = field(default_factory=list)
    """Those taken from the committed ``notebooks/`` (no executed copy in the run folder)."""
    has_report: bool = False


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (``runs/smoke``), else as it is."""
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def notebook_title(path: Path) -> str:
    """The first Markdown heading of a notebook (its title), else its file stem."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError) as err:
        raise BookError(f"cannot read notebook {path}: {err}") from err
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        text = "".join(cell.get("source", []))
        for line in text.splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return path.stem


def read_notebook(path: Path) -> dict:
    """A notebook's JSON, or a :class:`BookError` that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BookError(f"cannot read notebook {path}: {err}") from err


def copy_without_cdn_mathjax(path: Path, dest: Path) -> int:
    """Copy a notebook, dropping the ``<script src=".../mathjax/...">`` tags of its HTML outputs; returns
    how many went.

    plotly's notebook renderer puts MathJax from a CDN into every figure's HTML. The book's pages load
    MathJax already (from ``_static``), and a second copy from the network is neither reachable offline
    nor compatible with the first; no figure of this package has TeX in its labels.
    """
    notebook = read_notebook(path)
    dropped = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            html = data.get("text/html")
            if html is None:
                continue
            text = "".join(html) if isinstance(html, list) else html
            text, n = CDN_MATHJAX.subn("", text)
            if n:
                data["text/html"], dropped = text, dropped + n
    dest.write_text(json.dumps(notebook), encoding="utf-8")
    return dropped


def copy_without_outputs(path: Path, dest: Path) -> None:
    """Copy a committed notebook with every code cell's outputs and count emptied: the few it keeps (the
    reference outputs of its ``# NBVAL_CHECK_OUTPUT`` cells) belong to the tests, not to a run, and the page
    says it shows no outputs."""
    notebook = read_notebook(path)
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    dest.write_text(json.dumps(notebook), encoding="utf-8")


def discover(folder: Path) -> dict[str, Path]:
    """``{file name: path}`` of the ``NN_name.ipynb`` files directly in ``folder`` (as ``fastavatar-nb run``
    finds them: :func:`fastavatar_nb.cli.discover_notebooks`)."""
    return {p.name: p for p in discover_notebooks(folder)}


def assemble(run_dir: Path, folder: Path, notebooks_dir: Path = NOTEBOOKS) -> Source:
    """Write the book's source into ``folder``: notebooks, ``intro.md``, ``report.md``,
    ``_config.yml`` and ``_toc.yml``."""
    committed = discover(notebooks_dir)
    executed = discover(run_dir / "executed")
    names = sorted(committed.keys() | executed.keys())
    if not names:
        raise BookError(f"no notebooks NN_name.ipynb in {notebooks_dir} or {run_dir / 'executed'}")
    folder.mkdir(parents=True, exist_ok=True)
    source = Source(folder)
    lines = []
    for name in names:
        path = executed.get(name) or committed[name]
        if name in executed:
            copy_without_cdn_mathjax(path, folder / name)
        else:
            source.without_outputs.append(name)
            copy_without_outputs(path, folder / name)
        source.notebooks.append(name)
        source.titles.append(notebook_title(path))
        lines.append(f"1. [{source.titles[-1]}]({name})")

    if not executed:
        where = (f"The pages show the committed notebooks **without outputs**: `{shown(run_dir)}` holds no "
                 "executed notebooks yet (`make run` makes them).")
    elif source.without_outputs:
        where = (f"The pages show the notebooks executed into `{shown(run_dir)}/executed`, except "
                 f"{', '.join(Path(n).stem for n in source.without_outputs)}, shown without outputs "
                 "(no executed copy in this run).")
    else:
        where = f"The pages show the notebooks as executed into `{shown(run_dir)}/executed`, with their outputs."
    (folder / "intro.md").write_text(INTRO.format(source=where, notebooks="\n".join(lines)), encoding="utf-8")

    report = run_dir / "report.md"
    if report.is_file():
        text = report.read_text(encoding="utf-8")
        # links to the executed copies point at their pages in the book
        text = re.sub(r"\]\(executed/(\d{2}_[A-Za-z0-9_-]+\.ipynb)\)", r"](\1)", text)
        (folder / "report.md").write_text(text, encoding="utf-8")
        if (run_dir / "figures").is_dir():
            shutil.copytree(run_dir / "figures", folder / "figures")
        source.has_report = True
    else:
        (folder / "report.md").write_text(NO_REPORT.format(run_dir=shown(run_dir)), encoding="utf-8")

    (folder / "_config.yml").write_text(config_yaml(), encoding="utf-8")
    (folder / "_toc.yml").write_text(toc_yaml(source.notebooks, source.titles), encoding="utf-8")
    return source


def config_yaml() -> str:
    """Jupyter Book's ``_config.yml``: no execution, no launch buttons, nothing loaded from the network."""
    config = {
        "title": "FastAvatar, notebook by notebook",
        "author": "fastavatar-nb",
        "copyright": "",
        "only_build_toc_files": True,
        "execute": {"execute_notebooks": "off"},
        "html": {"home_page_in_navbar": True, "use_repository_button": False,
                 "use_issues_button": False, "use_edit_page_button": False},
        "launch_buttons": {"thebe": False, "binderhub_url": "", "jupyterhub_url": "", "colab_url": "",
                           "deepnote_url": ""},
        "repository": {"url": ""},
        "sphinx": {
            "config": {
                # Jupyter Book's extensions less sphinx_thebe (live code from Binder, thebe from a CDN) and
                # intersphinx (inventories from other sites), plus MathJax 3 served from _static/mathjax
                "extensions": ["sphinx_togglebutton", "sphinx_copybutton", "myst_nb", "jupyter_book",
                               "sphinx_comments", "sphinx_external_toc", "sphinx_design", "sphinx_book_theme",
                               "sphinx-mathjax-offline"],
                "mathjax_path": "mathjax/tex-chtml.js",
                # $$...$$ inside a paragraph is display math, as in Jupyter
                "myst_dmath_double_inline": True,
                # no ipywidgets embed scripts (CDN); widgets show their static text/html instead
                "nb_ipywidgets_js": {},
                "nb_mime_priority_overrides": [["html", "application/vnd.jupyter.widget-view+json", None]],
                # plotly's JSON has no renderer here; the text/html beside it (plotly.js embedded) is shown
                "suppress_warnings": ["myst.domains", "mystnb.unknown_mime_type"],
            },
        },
    }
    # JSON is YAML; it spares a YAML writer
    return json.dumps(config, indent=2) + "\n"


def toc_yaml(notebooks: list[str], titles: list[str]) -> str:
    """Jupyter Book's ``_toc.yml``: the intro, the notebooks in order, the report.

    The navigation names each notebook by its title up to the colon ("00 · Data"), so that the whole
    list fits beside the page; the page itself keeps the full title.
    """
    chapters = "\n".join(f"  - file: {Path(n).stem}\n    title: {json.dumps(t.split(':')[0].strip())}"
                         for n, t in zip(notebooks, titles, strict=True))
    return ("format: jb-book\nroot: intro\nparts:\n- caption: Notebooks\n  chapters:\n"
            f"{chapters}\n- caption: This run\n  chapters:\n  - file: report\n    title: Run report\n")


def jupyter_book_command() -> list[str]:
    """The ``jupyter-book`` command of this Python; :class:`BookError` when it is not installed."""
    for module, what in (("jupyter_book", "Jupyter Book"), ("sphinx-mathjax-offline", "sphinx-mathjax-offline")):
        if importlib.util.find_spec(module) is None:
            raise BookError(f"{what} is not installed in {sys.executable}; run: {INSTALL_HINT}")
    script = Path(sys.executable).parent / "jupyter-book"
    if script.is_file():
        return [str(script)]
    found = shutil.which("jupyter-book")
    if found is None:
        raise BookError(f"the jupyter-book command is missing beside {sys.executable}; run: {INSTALL_HINT}")
    return [found]


def check_out(out: Path) -> None:
    """Refuse an output folder this script did not make (it would be replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BookError(f"--out {out} is a file, not a folder; choose another --out")
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return
    raise BookError(f"--out {out} exists and is not a book built by this script (no {MARKER} in it); "
                    "it is left alone: choose another --out or move it away")


def build(run_dir: Path, out: Path, *, quiet: bool = True) -> Path:
    """Assemble the source, build the site and put it at ``out``; returns ``out / "index.html"``."""
    check_out(out)
    command = jupyter_book_command()
    with tempfile.TemporaryDirectory(prefix="fastavatar-book-") as tmp:
        source = assemble(run_dir, Path(tmp) / "src")
        if source.without_outputs == source.notebooks:
            print(f"build_book: note: no executed notebooks in {run_dir / 'executed'}: the pages show the "
                  "committed notebooks, without outputs (`make run` first)")
        elif source.without_outputs:
            print(f"build_book: note: no executed copy in {run_dir / 'executed'} of "
                  f"{', '.join(source.without_outputs)}: their pages have no outputs (`make run` first)")
        if not source.has_report:
            print(f"build_book: note: no {run_dir / 'report.md'}: the report page says it appears after `make run`")
        args = [*command, "build", str(source.folder), "--path-output", tmp, "--builder", "html"]
        # quiet: Sphinx's output is kept and only its warnings are shown, by notebook name
        result = subprocess.run([*args, "--quiet"] if quiet else args, capture_output=quiet, text=True)
        html = Path(tmp) / "_build" / "html"
        if result.returncode != 0 or not (html / "index.html").is_file():
            if quiet:
                sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            raise BookError(f"jupyter-book build failed (exit {result.returncode}); its output is above")
        if quiet:
            warnings = [ANSI.sub("", line).replace(f"{source.folder}/", "")
                        for line in result.stderr.splitlines() if "WARNING" in line]
            for line in warnings[:20]:
                print(f"build_book: {line}")
            if len(warnings) > 20:
                print(f"build_book: ... and {len(warnings) - 20} more warnings (--verbose shows them all)")
        (html / ".buildinfo").unlink(missing_ok=True)
        (html / MARKER).write_text("built by scripts/build_book.py; `make book` replaces this folder\n")
        check_out(out)  # again: nothing may have appeared there meanwhile
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(html, out)
    return out / "index.html"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_book.py",
        description="Build a static HTML site (Jupyter Book 1.x) of the course's notebooks with a run's "
        "outputs and its report. Nothing is executed or fetched.",
    )
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "smoke",
                        help="run folder of `fastavatar-nb run`: executed notebooks are read from "
                        "DIR/executed/ (the committed notebooks/ where missing), the report from "
                        "DIR/report.md (default: runs/smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, replaced if it holds a previous build (default: RUN_DIR/book)")
    parser.add_argument("--verbose", action="store_true", help="show Sphinx's own output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = args.run_dir.resolve()
    out = (args.out if args.out is not None else run_dir / "book").resolve()
    start = time.perf_counter()
    try:
        index = build(run_dir, out, quiet=not args.verbose)
    except BookError as err:
        print(f"build_book.py: error: {err}", file=sys.stderr)
        return 2
    print(f"build_book: built in {time.perf_counter() - start:.1f} s; open {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
