"""The method figure names real functions and notebooks, and docs/method.svg is its current output."""

from __future__ import annotations

import importlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fastavatar_nb.figures import ARROWS, STAGES, Stage, main, method_figure

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.key)
def test_each_box_names_an_existing_function_and_notebook(stage: Stage) -> None:
    module, *attrs = stage.function.split(".")
    obj = importlib.import_module(f"fastavatar_nb.{module}")
    for attr in attrs:
        obj = getattr(obj, attr)
    assert callable(obj), stage.function
    assert (REPO / "notebooks" / stage.notebook).is_file(), stage.notebook


def test_figure_is_valid_svg_with_every_box_and_arrow() -> None:
    svg = method_figure()
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    for stage in STAGES:
        assert stage.label.split("\n")[0] in texts and stage.function in texts
    assert len(root.findall(f"{ns}path")) == len(ARROWS)
    cells = [(s.row, s.col) for s in STAGES]
    assert len(set(cells)) == len(cells), "two boxes share a grid cell"


def test_bad_arrow_is_refused() -> None:
    with pytest.raises(KeyError, match="'photo' -> 'nowhere'"):
        method_figure(arrows=(("photo", "nowhere"),))


def test_committed_svg_is_current(tmp_path) -> None:
    assert main([str(tmp_path / "m.svg")]) == 0
    assert (tmp_path / "m.svg").read_text() == (REPO / "docs" / "method.svg").read_text(), \
        "docs/method.svg is stale: python -m fastavatar_nb.figures docs/method.svg"
