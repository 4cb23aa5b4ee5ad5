"""``make book`` (scripts/build_book.py): the static site of the notebooks and the run's report.

One build (about 5 s: nothing is executed) from the committed notebooks, except 00, whose "executed copy"
in the run folder carries a few outputs, and a report written by ``fastavatar_nb.report``. It checks the
pages, the navigation's order, the report, and that the site loads nothing from the network: no
``src`` (scripts, images, frames) and no ``<link>`` (stylesheets, preloads, icons) points outside the
site, no inline script names a URL, and no stylesheet imports one. The refusals are checked without
building.

Without Jupyter Book (``pip install -e '.[book]'``, which ``make venv`` does) the build is skipped,
except on CI (CI=true), where it fails.
"""

from __future__ import annotations

import copy
import html
import importlib.util
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from repo_scripts import REPO, load_script

from fastavatar_nb import report

build_book = load_script("scripts/build_book.py")

NOTEBOOKS = sorted(p for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
HAS_BOOK_TOOLS = all(importlib.util.find_spec(m) for m in ("jupyter_book", "sphinx-mathjax-offline"))
needs_book_tools = pytest.mark.skipif(
    not HAS_BOOK_TOOLS and os.environ.get("CI") != "true",
    reason="Jupyter Book is not installed: pip install -e '.[book]'",
)

CDN_MATHJAX = '<script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/3.2.2/es5/tex-svg.min.js"></script>'


def _executed_copy(source: Path, dest: Path) -> None:
    """``source`` with outputs on its first code cell: a stream, a widget with its static HTML, and an
    HTML output carrying plotly's CDN MathJax tag."""
    nb = json.loads(source.read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["outputs"] = [
        {"output_type": "stream", "name": "stdout", "text": ["hello from the run\n"]},
        {"output_type": "display_data", "metadata": {}, "data": {
            "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2,
                                                         "version_minor": 0},
            "text/html": '<p class="static-head">static view of the head</p>',
            "text/plain": "HeadViewer(...)"}},
        {"output_type": "display_data", "metadata": {}, "data": {
            "text/html": f'<div class="plot">{CDN_MATHJAX}a plotly figure</div>', "text/plain": "Figure"}},
    ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(nb), encoding="utf-8")


def _make_run(run: Path) -> None:
    first = NOTEBOOKS[0]
    _executed_copy(first, run / "executed" / first.name)
    (run / "run_status.json").write_text(json.dumps({"notebooks": {first.stem: {
        "status": "ok", "seconds": 1.5, "executed": f"executed/{first.name}"}}}))
    report.record_metrics(run, first.stem, {"psnr_test": 21.5})
    report.save_image(np.linspace(0, 1, 32 * 48 * 3).reshape(32, 48, 3), run, f"{first.stem[:2]}_ramp")
    report.write_report(run)


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not HAS_BOOK_TOOLS:
        pytest.fail("CI=true but Jupyter Book is not installed: pip install -e '.[book]'")
    tmp = tmp_path_factory.mktemp("book")
    run = tmp / "run"
    _make_run(run)
    out = tmp / "site"
    code = build_book.main(["--run-dir", str(run), "--out", str(out)])
    assert code == 0
    return {"run": run, "out": out}


class _Resources(HTMLParser):
    """What a page makes the browser load: ``src`` of any tag, ``href`` of ``<link>``, inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href"):
            self.urls.append(a["href"])
        self._in_script = tag == "script" and not a.get("src")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline.append(data)


def _nav_links(page: str) -> list[str]:
    nav = re.search(r'<nav class="bd-links bd-docs-nav".*?</nav>', page, re.S)
    assert nav, "no navigation sidebar"
    return re.findall(r'<a class="(?:current )?reference internal" href="([^"]+)"', nav.group(0))


def _words(text: str) -> str:
    """Letters and digits only: a Markdown title and its HTML rendering compare equal."""
    return " ".join(re.findall(r"[0-9A-Za-z]+", text))


def _h1(page: str) -> str:
    match = re.search(r"<h1>(.*?)</h1>", page, re.S)
    assert match, "no <h1>"
    return _words(html.unescape(re.sub(r"<[^>]+>", "", match.group(1))))


@needs_book_tools
@pytest.mark.slow
def test_book_pages_navigation_and_report(book: dict) -> None:
    out: Path = book["out"]
    assert (out / "index.html").is_file()
    assert (out / build_book.MARKER).is_file()
    intro = (out / "intro.html").read_text(encoding="utf-8")

    # every notebook has a page titled as the notebook, and the navigation lists them in order
    for path in NOTEBOOKS:
        page = out / f"{path.stem}.html"
        assert page.is_file(), page
        assert _h1(page.read_text(encoding="utf-8")) == _words(build_book.notebook_title(path))
    expected = ["#", *[f"{p.stem}.html" for p in NOTEBOOKS], "report.html"]
    assert _nav_links(intro) == expected
    # on another page: the same list, the current page as "#"
    assert _nav_links((out / "report.html").read_text(encoding="utf-8")) == ["intro.html", *expected[1:-1], "#"]
    article = re.search(r"<article.*?</article>", intro, re.S)
    assert article, "no article in intro.html"
    # the intro lists the notebooks in order, with their titles, and says how to run them
    assert re.findall(r'href="(\d\d_[^"#]+)\.html"', article.group(0)) == [p.stem for p in NOTEBOOKS]
    text = html.unescape(re.sub(r"<[^>]+>", "", article.group(0)))
    assert "make run" in text and "make book" in text

    # 00 shows the run's outputs: the widget as its static HTML, without plotly's CDN MathJax
    first = (out / f"{NOTEBOOKS[0].stem}.html").read_text(encoding="utf-8")
    assert "hello from the run" in first
    assert 'class="static-head"' in first
    assert "widget-view+json" not in first
    assert "a plotly figure" in first and "cdnjs" not in first
    # the others are the committed notebooks: no outputs
    assert "cell_output" not in (out / f"{NOTEBOOKS[1].stem}.html").read_text(encoding="utf-8")

    # the report: its tables, its figure (copied into the site) and links to the notebooks' pages
    rep = (out / "report.html").read_text(encoding="utf-8")
    assert "run report" in rep and "psnr_test" in rep and "21.5" in rep
    images = re.findall(r'<img[^>]+src="([^"]+)"', rep)
    assert images and all((out / src).is_file() for src in images)
    assert f'href="{NOTEBOOKS[0].stem}.html"' in rep


@needs_book_tools
@pytest.mark.slow
def test_book_loads_nothing_from_the_network(book: dict) -> None:
    out: Path = book["out"]
    pages = sorted(out.glob("*.html"))
    assert len(pages) >= len(NOTEBOOKS) + 2
    remote = re.compile(r"^(https?:)?//", re.I)
    math_pages = 0
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        assert not [u for u in parser.urls if remote.match(u)], page.name
        assert not [s for s in parser.inline if re.search(r"https?://", s)], page.name
        for url in parser.urls:  # and every local resource is there
            target = (out / url.split("?")[0].split("#")[0])
            assert target.exists(), f"{page.name}: {url}"
        math_pages += "_static/mathjax/tex-chtml.js" in parser.urls
    assert math_pages >= 1  # MathJax comes from the site itself
    for css in out.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"""(url\(|@import)\s*["']?(https?:)?//""", text, re.I), css


def test_book_source_without_a_run(tmp_path: Path) -> None:
    """No executed notebooks and no report: the committed notebooks, and a report page that says why."""
    source = build_book.assemble(tmp_path / "run", tmp_path / "src")
    assert source.notebooks == [p.name for p in NOTEBOOKS]
    assert source.without_outputs == source.notebooks
    assert not source.has_report
    assert "appears\nhere after `make run`" in (tmp_path / "src" / "report.md").read_text()
    assert "without outputs" in (tmp_path / "src" / "intro.md").read_text()
    for path in NOTEBOOKS:  # the committed notebooks, without the reference outputs their check cells keep
        copy, original = (json.loads(p.read_text()) for p in (tmp_path / "src" / path.name, path))
        assert [c["source"] for c in copy["cells"]] == [c["source"] for c in original["cells"]]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in copy["cells"]
                   if c["cell_type"] == "code")
    config = json.loads((tmp_path / "src" / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    toc = (tmp_path / "src" / "_toc.yml").read_text()
    assert re.findall(r"file: (\S+)", toc) == [p.stem for p in NOTEBOOKS] + ["report"]


def test_book_refuses_a_folder_it_did_not_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert build_book.main(["--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a book built by this script" in err
    assert (out / "notes.txt").read_text() == "keep me"

    a_file = tmp_path / "file.html"
    a_file.write_text("x")
    assert build_book.main(["--run-dir", str(tmp_path / "run"), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "x"

    # an empty folder and a previous build are fine
    (tmp_path / "empty").mkdir()
    build_book.check_out(tmp_path / "empty")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / build_book.MARKER).write_text("")
    (tmp_path / "old" / "index.html").write_text("")
    build_book.check_out(tmp_path / "old")


def test_book_without_jupyter_book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jupyter_book" else real(name, *a))
    assert build_book.main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[book]'" in err
    assert not (tmp_path / "site").exists()


def test_book_help() -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_book.main(["--help"])
    assert exit_info.value.code == 0


def test_cdn_mathjax_is_dropped_from_copies(tmp_path: Path) -> None:
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [
        {"output_type": "display_data", "metadata": {},
         "data": {"text/html": [CDN_MATHJAX, "<div>plot</div>"], "text/plain": "x"}}]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    src = tmp_path / "a.ipynb"
    src.write_text(json.dumps(nb))
    before = copy.deepcopy(nb)
    assert build_book.copy_without_cdn_mathjax(src, tmp_path / "b.ipynb") == 1
    out = json.loads((tmp_path / "b.ipynb").read_text())
    assert out["cells"][0]["outputs"][0]["data"]["text/html"] == "<div>plot</div>"
    assert json.loads(src.read_text()) == before  # the run's own file is untouched
