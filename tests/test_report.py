"""Run-folder conventions: metrics JSON, figures, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastavatar_nb import presets, report
from fastavatar_nb.report import MetricsError


@pytest.fixture
def preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> presets.Preset:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return presets.get("smoke", run_dir=tmp_path / "run")


def test_record_metrics_writes_and_merges(preset: presets.Preset) -> None:
    path = report.record_metrics(
        preset, "06_refinement.ipynb", {"psnr": np.float32(21.25), "steps": np.int64(50)}
    )
    assert path == preset.run_dir / "metrics" / "06_refinement.json"
    assert json.loads(path.read_text()) == {"psnr": 21.25, "steps": 50}
    report.record_metrics(preset.run_dir, "06_refinement", {"psnr": torch.tensor(24.5), "ok": True})
    data = json.loads(path.read_text())
    assert data == {"psnr": 24.5, "steps": 50, "ok": 1}
    assert isinstance(data["steps"], int)
    assert report.collect_metrics(preset.run_dir) == {"06_refinement": data}


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"psnr": math.nan}, "finite"),
        ({"psnr": float("inf")}, "finite"),
        ({"psnr": "21"}, "must be a number"),
        ({"nested": {"a": 1}}, "must be a number"),
        ({"img": torch.zeros(2)}, "scalar"),
        ({"": 1.0}, "non-empty"),
    ],
)
def test_record_metrics_rejects_non_numbers(preset: presets.Preset, metrics: dict, message: str) -> None:
    with pytest.raises(MetricsError, match=message):
        report.record_metrics(preset, "01_x", metrics)
    assert not (preset.run_dir / "metrics" / "01_x.json").exists()


def test_record_metrics_rejects_bad_names_and_files(preset: presets.Preset) -> None:
    with pytest.raises(MetricsError, match="plain file stem"):
        report.record_metrics(preset, "../escape", {"a": 1})
    bad = preset.run_dir / "metrics" / "02_bad.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("[1, 2]")
    with pytest.raises(MetricsError, match="JSON object"):
        report.record_metrics(preset, "02_bad", {"a": 1})
    with pytest.raises(MetricsError, match="02_bad.json"):
        report.collect_metrics(preset.run_dir)


def test_save_image_round_trip(preset: presets.Preset) -> None:
    image = torch.linspace(0, 1, 4 * 5 * 3).reshape(4, 5, 3)
    path = report.save_image(image, preset, "01_ramp")
    assert path == preset.run_dir / "figures" / "01_ramp.png"
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back, np.round(image.numpy() * 255).astype(np.uint8))
    grey = report.save_image(np.full((3, 2), 2.0), preset, "01_grey.png")
    assert np.asarray(Image.open(grey)).tolist() == [[255, 255]] * 3
    with pytest.raises(ValueError, match=r"\[2, 3, 5\]"):
        report.save_image(np.zeros((2, 3, 5)), preset, "bad")
    assert [p.name for p in report.list_figures(preset.run_dir)] == ["01_grey.png", "01_ramp.png"]


def test_write_report_names_missing_pieces(tmp_path: Path) -> None:
    md, html = report.write_report(tmp_path / "empty")
    text = md.read_text()
    assert "No `preset.json`" in text and "No notebook has been run" in text
    assert "No metrics recorded" in text and "No figures" in text
    assert html.read_text().startswith("<!DOCTYPE html>")


def test_write_report_tables(preset: presets.Preset) -> None:
    preset.save()
    report.record_metrics(preset, "07_evaluation", {"psnr": 24.09, "lpips_available": False, "tiny": 1.5e-5})
    report.save_image(np.zeros((2, 2, 3)), preset, "07_views")
    md, html = report.write_report(preset.run_dir)
    text = md.read_text()
    assert "| num_gaussians | 2500 |" in text
    assert "| 07_evaluation | psnr | 24.09 |" in text
    assert "| 07_evaluation | lpips_available | 0 |" in text
    assert "| 07_evaluation | tiny | 1.500e-05 |" in text
    assert "![figures/07_views.png](figures/07_views.png)" in text
    assert "<td>24.09</td>" in html.read_text()
