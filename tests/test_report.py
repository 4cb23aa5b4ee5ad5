"""Run-folder conventions: metrics JSON, figures, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastavatar_nb import checkpoints, cli, presets, report
from fastavatar_nb import report_results as results
from fastavatar_nb.evaluation import PAPER_TABLE1
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
    assert "No metrics recorded" in text and "figures/*.png missing" in text
    assert "recorded no evaluation" in text and "preset.json is missing" in text
    assert html.read_text().startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------- a small synthetic run folder
SMOKE_EVAL = {"template_psnr": 15.4, "template_ssim": 0.70, "template_mae": 0.098, "template_identity": 0.71,
              "feed_forward_psnr": 15.8, "feed_forward_ssim": 0.71, "feed_forward_mae": 0.09, "feed_forward_seconds": 0.021,
              "refined_psnr": 21.9, "refined_ssim": 0.84, "refined_mae": 0.04, "refined_seconds": 4.2,
              "heads_per_method": 8}


def _png(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), rgb).save(path)


def make_run(run: Path, evaluation: dict | None = None, data: str | None = None,
             split: dict | None = None) -> Path:
    """A run folder as ``fastavatar-nb run`` leaves it: preset, status, metrics of 00/02/04/06/07, tiny figures."""
    preset = presets.base("smoke").replace(run_dir=run)
    run.mkdir(parents=True)
    preset.save()
    doc = json.loads((run / "preset.json").read_text())
    doc["data"] = data  # as a --data run's preset records it
    (run / "preset.json").write_text(json.dumps(doc))
    stems = ["00_data", "02_template_construction", "04_encoder_distillation", "06_refinement", "07_evaluation"]
    (run / "run_status.json").write_text(json.dumps({"notebooks": {
        s: {"status": "ok", "seconds": 12.5, "executed": f"executed/{s}.ipynb"} for s in stems}}))
    report.record_metrics(run, "00_data", {"subjects": 14, "train_subjects": 10, "val_subjects": 2, "test_subjects": 2,
                                           "real_data": int(data is not None), "generate_seconds": 7.2213})
    report.record_metrics(run, "02_template_construction", {
        "fit_subjects": 10, "heldout_psnr_mean": 30.7134, "heldout_psnr_min": 28.04, "train_psnr_mean": 32.4,
        "template_psnr_mean": 14.83, "fit_seconds": 446.79, "drift_p95_mm": 9.5689})
    report.record_metrics(run, "04_encoder_distillation", {"val_feed_forward_psnr": 15.1, "val_template_psnr": 15.3,
                                                           "val_is_train": 0, "face_detection_rate": 0.96633})
    report.record_metrics(run, "06_refinement", {"refine_steps": 50, "refine_seconds": 4.1, "novel_psnr_feed_forward": 15.9,
                                                 "novel_psnr_refined": 21.0, "input_psnr_feed_forward": 16.0,
                                                 "input_psnr_refined": 25.2, "novel_psnr_4x_steps": 21.3})
    report.record_metrics(run, "07_evaluation", SMOKE_EVAL if evaluation is None else evaluation)
    for stem, colour in (("00_views", (255, 0, 0)), ("02_before_after", (0, 255, 0)), ("07_methods", (0, 0, 255)),
                         ("06_refinement", (9, 9, 9)), ("09_new_figure", (1, 2, 3)), ("overview", (4, 5, 6))):
        _png(run / "figures" / f"{stem}.png", colour)
    if split is not None:
        (run / "dataset").mkdir()
        (run / "dataset" / "split.json").write_text(json.dumps(split))
    return run


def _headings(text: str, level: str) -> list[str]:
    return [line[len(level) + 1:] for line in text.splitlines() if line.startswith(level + " ")]


def test_report_reads_results_first_and_dumps_last(tmp_path: Path) -> None:
    run = make_run(tmp_path / "smoke")
    md, html_path = report.write_report(run)
    text, page = md.read_text(), html_path.read_text()
    assert _headings(text, "##") == [title for _, title in report.SECTIONS]
    positions = [page.index(f'<section id="{anchor}">') for anchor, _ in report.SECTIONS]
    assert positions == sorted(positions)
    # the preset and the metric dump are collapsed, the results are not
    for anchor in ("preset", "metrics"):
        section = page[page.index(f'<section id="{anchor}">'):]
        assert section.index("<details>") < section.index("</section>")
    results_html = page[positions[0]:positions[1]]
    assert "<details>" not in results_html
    # one sentence per stage, computed from the metrics
    assert "02 Fits: 30.7 dB on the held-out camera (10 subjects, worst 28.0 dB)" in text
    assert "06 Refinement: 50 steps on one validation subject's photo (4.1 s) take its 15 other views from 15.9 to 21.0 dB" in text
    assert "Scale: the smoke preset, 10 training subjects" in text and "cannot show" in text
    # the preset's table: a stage's config one row per field, by its dotted name
    assert "| decoder.epochs | 20 |" in text and "| refine.steps | 50 |" in text and "| name | smoke |" in text


def test_figures_sit_beside_their_stage_with_captions(tmp_path: Path) -> None:
    md, html_path = report.write_report(make_run(tmp_path / "smoke"))
    text, page = md.read_text(), html_path.read_text()
    stages = text[text.index("## Stage by stage"):text.index("## Notebooks")]
    assert _headings(stages, "###") == ["00 Data", "02 Per-subject fits and the template",
                                        "04 Encoder: the feed-forward head", "06 Test-time refinement",
                                        "07 Evaluation on unseen test subjects", "09 Notebook 09", "Other figures"]
    for stage, figure in (("### 02 ", "02_before_after"), ("### 07 ", "07_methods"), ("### 09 ", "09_new_figure"),
                          ("### Other", "overview")):
        block = stages[stages.index(stage):]
        block = block[:block.find("\n### ", 1)] if "\n### " in block[1:] else block
        assert f"![figures/{figure}.png](figures/{figure}.png)" in block, (stage, figure)
    assert f"*Figure 2 (02_before_after.png).* {results.FIGURE_CAPTIONS['02_before_after']}" in text
    assert "*Figure 5 (09_new_figure.png).* New figure (notebook 09: notebook 09)." in text
    assert page.count("<figure") == 6 and page.count("<figcaption>") == 6
    assert '<img src="figures/07_methods.png" alt="Unseen test subjects: the input photo' in page
    assert text.index("## Stage by stage") < text.index("figures/00_views.png") < text.index("## Notebooks")


def test_headline_table_rows_and_reused_numbers(tmp_path: Path) -> None:
    rows = results.headline_rows(report.collect_metrics(make_run(tmp_path / "smoke")), results.load_course())
    assert [(r.source, r.method) for r in rows] == [
        ("this run", "template"), ("this run", "feed-forward"), ("this run", "refined"),
        ("paper", "feed-forward"), ("paper", "refined"),
        *[("course checkpoint", m) for m in ("template", "mean code", "FaceNet nearest", "render retrieval",
                                             "feed-forward", "refined")]]
    paper = {r.method: r for r in rows if r.source == "paper"}
    assert (paper["feed-forward"].psnr, paper["feed-forward"].ssim) == (21.26, 0.90) == (
        PAPER_TABLE1["feed-forward"]["psnr"], PAPER_TABLE1["feed-forward"]["ssim"])
    assert (paper["refined"].psnr, paper["refined"].ssim) == (24.09, 0.92)
    shipped = json.loads((checkpoints.shipped_dir("course") / checkpoints.METRICS_FILE).read_text())["07_evaluation"]
    course = {r.method: r for r in rows if r.source == "course checkpoint"}
    assert course["refined"].psnr == pytest.approx(shipped["refined_psnr"])
    assert course["feed-forward"].identity == pytest.approx(shipped["feed_forward_identity"])
    # at 268 training subjects, with the encoder that reads the photo's colours, it beats every baseline, a lookup
    # over the training heads included (the paper's encoder lost to it: test_a_method_that_loses_to_a_baseline...)
    assert shipped["feed_forward_psnr"] > shipped["render_retrieval_psnr"] and \
        shipped["feed_forward_ssim"] > shipped["render_retrieval_ssim"]
    assert course["feed-forward"].loses_to == () and not course["refined"].loses_to


def test_a_method_that_loses_to_a_baseline_is_marked(tmp_path: Path) -> None:
    evaluation = {**SMOKE_EVAL, "feed_forward_psnr": 15.0, "mean_code_psnr": 15.6, "mean_code_ssim": 0.69}
    run = make_run(tmp_path / "smoke", evaluation=evaluation)
    rows = results.headline_rows(report.collect_metrics(run))
    mine = {r.method: r for r in rows if r.source == "this run"}
    assert list(mine) == ["template", "mean code", "feed-forward", "refined"]
    assert not mine["template"].learned and not mine["mean code"].learned
    assert mine["feed-forward"].loses_to == ("template (PSNR -0.40 dB)", "mean code (PSNR -0.60 dB)")
    assert mine["refined"].loses_to == ()
    md, html_path = report.write_report(run)
    text = md.read_text()
    assert ("| feed-forward | this run (smoke, 10 training subjects) | 15.00 | 0.710 | 0.0900 | - | 21 ms | "
            f"{report.LOSES} loses to template (PSNR -0.40 dB); mean code (PSNR -0.60 dB) |") in text
    assert "Baselines recorded by this run: template, mean code." in text
    assert "LPIPS was not measured" in text and "| LPIPS |" not in text
    assert "feed-forward loses to a baseline" in text
    assert html_path.read_text().count('<tr class="loses this-run">') == 1


def test_lpips_column_where_measured(tmp_path: Path) -> None:
    run = make_run(tmp_path / "smoke", evaluation={**SMOKE_EVAL, "template_lpips": 0.31, "refined_lpips": 0.1234})
    text = report.write_report(run)[0].read_text()
    assert "| method | from | PSNR (dB) | SSIM | MAE | LPIPS | identity (cosine) |" in text
    assert "| refined | this run (smoke, 10 training subjects) | 21.90 | 0.840 | 0.0400 | 0.123 |" in text
    assert "| refined | paper (410 NeRSemble training subjects) | 24.09 | 0.92 | 0.02 | 0.18 |" in text


def test_without_other_baselines_the_report_says_so(tmp_path: Path) -> None:
    text = report.write_report(make_run(tmp_path / "smoke"))[0].read_text()
    assert "The template is this run's only recorded baseline" in text
    no_template = {k: v for k, v in SMOKE_EVAL.items() if not k.startswith("template")}
    assert results.baselines_note({"07_evaluation": no_template}) == "This run recorded no baseline for its learned heads."


def test_metric_dump_has_units_and_rounded_numbers(tmp_path: Path) -> None:
    text = report.write_report(make_run(tmp_path / "smoke"))[0].read_text()
    dump = text[text.index("## Every recorded metric"):]
    for row in ("| 02_template_construction | heldout_psnr_mean | 30.71 | dB |",
                "| 02_template_construction | fit_seconds | 447 | s |",
                "| 02_template_construction | drift_p95_mm | 9.57 | mm |",
                "| 04_encoder_distillation | face_detection_rate | 96.6 | % |",
                "| 04_encoder_distillation | val_is_train | no |  |",
                "| 00_data | generate_seconds | 7.22 | s |",
                "| 07_evaluation | heads_per_method | 8 |  |"):
        assert row in dump, row


@pytest.mark.parametrize(("name", "value", "shown", "unit"), [
    ("heldout_psnr_mean", 30.7134, "30.71", "dB"),
    ("psnr", 21.5, "21.5", "dB"),
    ("decoder_seconds", 1689.66, "1,690", "s"),
    ("feed_forward_seconds", 0.044671, "0.0447", "s"),
    ("head_ms_per_view", 35.694, "35.7", "ms"),
    ("face_detection_rate", 0.96633, "96.6", "%"),
    ("decoder_parameters", 812603, "812,603", ""),
    ("heads_per_method", 32.0, "32", ""),
    ("val_is_train", 1, "yes", ""),
    ("facenet_same_cos", 0.82878, "0.829", "cosine"),
    ("refined_ssim", 0.84149, "0.841", "0-1"),
    ("numba_speedup_fwd_bwd", 7.03, "7", "x"),
    ("rotation_error_deg_yaw", 3.14159, "3.14", "degrees"),
    ("tiny", 1.5e-5, "1.50e-05", ""),
])
def test_format_metric(name: str, value: float, shown: str, unit: str) -> None:
    assert results.format_metric(name, value) == shown
    assert results.metric_unit(name) == unit


def test_stage_outcomes_from_metrics() -> None:
    m = {"02_template_construction": {"heldout_psnr_mean": 30.71, "fit_subjects": 10},
         "03_autodecoder_training": {"decoded_psnr_mean": 14.0, "decoder_subjects": 10, "fit_psnr_mean": 31.0,
                                     "template_psnr_mean": 14.5},
         "04_encoder_distillation": {"val_feed_forward_psnr": 15.1, "val_template_psnr": 15.3, "val_is_train": 1}}
    out = results.stage_outcomes(m, {})
    assert out["02"] == "Fits: 30.7 dB on the held-out camera (10 subjects)."
    assert out["03"].endswith("; no better than the template.")
    assert "0.2 dB below the template's 15.3 dB (loses to the template)" in out["04"]
    assert "these are training subjects: optimistic" in out["04"]
    assert set(out) == {"02", "03", "04"}  # a stage without its numbers gets no sentence


def test_scale_note_at_scale() -> None:
    course = presets.base("course")
    doc = {"name": "course", "num_subjects": course.num_subjects, "num_test_subjects": course.num_test_subjects,
           "num_val_subjects": course.num_val_subjects}
    note = results.scale_note(doc, {})
    assert "268 training subjects" in note and "Enough training subjects" in note and "cannot show" not in note


def test_real_data_run_names_its_subjects(tmp_path: Path) -> None:
    split = {"train": ["074", "104", "140"], "val": [], "test": ["306"]}
    run = make_run(tmp_path / "smoke-nersemble", data="/data/nersemble_samples", split=split)
    text = report.write_report(run)[0].read_text()
    line = next(line for line in text.splitlines() if line.startswith("Real data:"))
    assert line.startswith("Real data: 4 subjects from /data/nersemble_samples (train: 074, 104, 140; val: none; "
                           "test: 306).")
    assert "From 3 training subjects the decoder and the encoder cannot learn how faces vary" in line
    synthetic = report.write_report(make_run(tmp_path / "smoke"))[0].read_text()
    assert "Real data:" not in synthetic


def test_failed_notebook_is_named_in_the_results(tmp_path: Path) -> None:
    run = make_run(tmp_path / "smoke")
    status = json.loads((run / "run_status.json").read_text())
    status["notebooks"]["04_encoder_distillation"].update(status="failed", error="ValueError: boom\nmore")
    (run / "run_status.json").write_text(json.dumps(status))
    text = report.write_report(run)[0].read_text()
    results_md = text[:text.index("## Stage by stage")]
    assert "Notebook 04_encoder_distillation failed: ValueError: boom." in results_md
    assert "| 04_encoder_distillation | failed | 12.5 s | [executed/04_encoder_distillation.ipynb]" in text


def test_open_report_only_where_there_is_a_display(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text("<!DOCTYPE html>")
    opened: list[str] = []
    assert not report.open_report(page, opener=lambda url: opened.append(url) or True, display=False)
    assert opened == []
    assert report.open_report(page, opener=lambda url: opened.append(url) or True, display=True)
    assert opened == [page.resolve().as_uri()]
    assert not report.open_report(page, opener=lambda url: False, display=True)  # no browser took it
    assert not report.has_display({}, "linux") and report.has_display({"DISPLAY": ":0"}, "linux")
    assert report.has_display({"WAYLAND_DISPLAY": "wayland-0"}, "linux") and report.has_display({}, "darwin")


def test_cli_report_open_prints_the_path_without_a_display(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path / "smoke")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(report.sys, "platform", "linux")
    monkeypatch.setattr(report.webbrowser, "open", lambda url: pytest.fail("no display: nothing may be opened"))
    assert cli.main(["report", "--preset", "smoke", "--out", str(tmp_path), "--open"]) == 0
    out = capsys.readouterr().out
    assert f"No display to open a browser on: open {tmp_path / 'smoke' / 'report.html'}" in out
    calls: list[str] = []
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(report.webbrowser, "open", lambda url: calls.append(url) or True)
    assert cli.main(["report", "--preset", "smoke", "--out", str(tmp_path), "--open"]) == 0
    assert calls == [(tmp_path / "smoke" / "report.html").resolve().as_uri()]
    assert "Opened" in capsys.readouterr().out
    monkeypatch.setattr(report.webbrowser, "open", lambda url: False)  # a display but no browser
    assert cli.main(["report", "--preset", "smoke", "--out", str(tmp_path), "--open"]) == 0
    assert "No browser took it" in capsys.readouterr().out
