"""Every notebook runs on the two shared real NeRSemble subjects (``--data``), as a user's own folder would.

One subprocess: ``fastavatar-nb run --preset smoke --data ../shared/data/nersemble_samples`` into a
temporary folder, then every notebook's status. Two subjects make one training and one test subject, so
the notebooks may only assert what holds on any data (shapes, finiteness, the equations, a fit lowering
its own loss) and state their outcomes; this test catches a notebook that asserts an outcome that only
synthetic data gives. Skipped where ``../shared`` is absent (CI has it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_TIMEOUT_S = 1500
"""The whole run's limit in seconds (it took 5 min on the 2-core machine, 2026-12-07)."""


@pytest.mark.slow
def test_every_notebook_runs_on_the_two_shared_real_subjects(shared_dir: Path, tmp_path: Path) -> None:
    data = shared_dir / "data" / "nersemble_samples"
    if not data.is_dir():
        pytest.skip(f"{data} is absent")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTAVATAR_RUN_DIR", "FASTAVATAR_PRESET", "FASTAVATAR_DATA")}
    env["FASTAVATAR_HEADLESS"] = "1"
    cmd = [sys.executable, "-m", "fastavatar_nb.cli", "run", "--preset", "smoke", "--data", str(data),
           "--out", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=NOTEBOOK_TIMEOUT_S)
    tail = (proc.stdout + proc.stderr)[-4000:]
    run_dirs = [p for p in (tmp_path / "runs").iterdir() if (p / "run_status.json").is_file()]
    assert len(run_dirs) == 1, f"no run folder with run_status.json under {tmp_path / 'runs'}:\n{tail}"
    status = json.loads((run_dirs[0] / "run_status.json").read_text())
    notebooks = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    failed = {name: {k: info.get(k) for k in ("status", "cell_index", "error")}
              for name, info in status["notebooks"].items() if info.get("status") != "ok"}
    assert not failed, f"notebooks failed on real data: {json.dumps(failed, indent=1)[:3000]}\n{tail}"
    assert proc.returncode == 0, tail
    ran = set(status["notebooks"])
    assert set(notebooks) <= ran, f"not run: {sorted(set(notebooks) - ran)}"
