"""The run report (``fastavatar_nb.report.write_report``) in headless Chromium, offline.

A small synthetic run folder (metrics of notebooks 00-07 and tiny PNG figures, written here) gets its
report; Chromium opens ``report.html`` from disk with the network blocked and checks that the sections
come in the report's order (results first, the collapsed preset and metric dump last), that every image
loads, that the collapsed sections open, and that the page asks for nothing outside the folder. The
screenshot goes to the artifact folders as ``report.png``.

``FASTAVATAR_REPORT_RUN=runs/smoke`` checks that run folder's ``report.html`` instead (as
``fastavatar-nb report`` wrote it); ``docs/report.png`` is that screenshot for a smoke run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from labtools import Deadline, offline_page, require_browser, save_screenshot
from PIL import Image

from fastavatar_nb import presets, report

pytestmark = pytest.mark.browser

BUDGET_S = 60.0


def _synthetic_run(run: Path) -> Path:
    presets.base("smoke").replace(run_dir=run).save()
    stems = ["00_data", "02_template_construction", "04_encoder_distillation", "06_refinement", "07_evaluation"]
    (run / "run_status.json").write_text(json.dumps({"notebooks": {
        s: {"status": "ok", "seconds": 30.0, "executed": f"executed/{s}.ipynb"} for s in stems}}))
    report.record_metrics(run, "00_data", {"subjects": 14, "train_subjects": 10, "val_subjects": 2, "test_subjects": 2,
                                           "real_data": 0})
    report.record_metrics(run, "02_template_construction", {"fit_subjects": 10, "heldout_psnr_mean": 30.7})
    report.record_metrics(run, "06_refinement", {"refine_steps": 50, "novel_psnr_feed_forward": 15.9,
                                                 "novel_psnr_refined": 21.0})
    report.record_metrics(run, "07_evaluation", {
        "template_psnr": 15.4, "template_ssim": 0.70, "feed_forward_psnr": 15.0, "feed_forward_ssim": 0.71,
        "refined_psnr": 21.9, "refined_ssim": 0.84})
    for i, stem in enumerate(["00_views", "02_before_after", "02_template_vs_subjects", "06_refinement", "07_methods"]):
        (run / "figures").mkdir(exist_ok=True)
        Image.new("RGB", (120, 60), (40 * i, 200 - 30 * i, 120)).save(run / "figures" / f"{stem}.png")
    return report.write_report(run)[1]


@pytest.fixture
def report_page(tmp_path: Path) -> Path:
    chosen = os.environ.get("FASTAVATAR_REPORT_RUN")
    if chosen:
        page = Path(chosen) / "report.html"
        if not page.is_file():
            pytest.fail(f"FASTAVATAR_REPORT_RUN={chosen}: no report.html there (run `fastavatar-nb report` first)")
        return page
    return _synthetic_run(tmp_path / "smoke")


def test_report_page_order_images_and_collapsed_dumps(report_page: Path, record_property) -> None:
    chromium = require_browser()
    deadline = Deadline(BUDGET_S)
    figures = len(list((report_page.parent / "figures").glob("**/*.png")))
    with offline_page(chromium, report_page.as_uri(), deadline) as (page, errors, blocked):
        page.wait_for_load_state("load", timeout=deadline.ms(30))
        sections = page.evaluate("[...document.querySelectorAll('body > section')].map(s => "
                                 "[s.id, s.querySelector('h2').textContent, s.getBoundingClientRect().top])")
        assert [s[0] for s in sections] == [anchor for anchor, _ in report.SECTIONS]
        assert [s[1] for s in sections] == [title for _, title in report.SECTIONS]
        tops = [s[2] for s in sections]
        assert tops == sorted(tops), tops  # laid out in that order, top to bottom
        assert page.locator("#results table.headline").is_visible()

        images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(images) == figures > 0
        broken = [src for src, complete, width in images if not (complete and width > 0)]
        assert not broken, f"images that did not load: {broken}"
        captions = page.evaluate("[...document.querySelectorAll('figure')].map(f => f.querySelector('figcaption')"
                                 "?.textContent.trim() || '')")
        assert len(captions) == figures and all(len(c) > 20 for c in captions), captions

        # the preset and the metric dump are collapsed until asked for
        for anchor in ("preset", "metrics"):
            details = page.locator(f"#{anchor} details")
            assert details.evaluate("d => d.open") is False
            assert not page.locator(f"#{anchor} table").is_visible()
        save_screenshot(page, "report.png", record_property)
        page.locator("#metrics summary").click(timeout=deadline.ms(10))
        assert page.locator("#metrics table").is_visible()
        assert not errors, errors
        assert not blocked, f"the report asked the network for {blocked}"
