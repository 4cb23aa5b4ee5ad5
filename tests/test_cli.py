"""``fastavatar-nb``: argument parsing, notebook discovery, and a real headless run of tiny notebooks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from fastavatar_nb import cli, presets


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (presets.RUN_DIR_ENV, presets.PRESET_ENV, presets.ALLOW_CPU_FULL_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def write_notebook(path: Path, *cells: str, markdown_first: bool = True) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if markdown_first:
        nb.cells.append(new_markdown_cell(f"# {path.stem}"))
    nb.cells.extend(new_code_cell(src) for src in cells)
    nbformat.write(nb, path)
    return path


def test_parse_only() -> None:
    available = [0, 1, 2, 3, 4, 6]
    assert cli.parse_only("02..04", available) == [2, 3, 4]
    assert cli.parse_only("01,03", available) == [1, 3]
    assert cli.parse_only("00, 03..9", available) == [0, 3, 4, 6]
    assert cli.parse_only("4,4", available) == [4]
    with pytest.raises(cli.CliError, match="no notebook numbered '05'.*00, 01, 02, 03, 04, 06"):
        cli.parse_only("05", available)
    with pytest.raises(cli.CliError, match="matches no notebook"):
        cli.parse_only("07..09", available)
    with pytest.raises(cli.CliError, match="empty"):
        cli.parse_only("04..02", available)
    with pytest.raises(cli.CliError, match="cannot read 'two'"):
        cli.parse_only("two", available)


def test_discover_notebooks(tmp_path: Path) -> None:
    for name in ("02_b.ipynb", "01_a.ipynb", "scratch.ipynb", "1_short.ipynb", "03_c.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in cli.discover_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    assert cli.discover_notebooks(tmp_path / "missing") == []


def test_cells_hash_ignores_outputs_not_sources(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    before = cli._cells_hash(path)
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1")]
    nb.cells[1].execution_count = 4
    nbformat.write(nb, path)
    assert cli._cells_hash(path) == before
    nb.cells[1].source = "x = 2"
    nbformat.write(nb, path)
    assert cli._cells_hash(path) != before


def test_help_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastavatar-nb" in out and "run" in out and "report" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    assert "--only" in capsys.readouterr().out


def test_no_notebooks_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path), "--notebooks", str(tmp_path / "nb")])
    assert code == 0
    assert "No notebooks to run" in capsys.readouterr().out
    assert not (tmp_path / "smoke").exists()


def test_full_on_cpu_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--preset", "full", "--out", str(tmp_path), "--notebooks", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fastavatar-nb: error:" in err and "CUDA is not available" in err and "Traceback" not in err


def test_bad_only_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    code = cli.main(
        ["run", "--preset", "smoke", "--out", str(tmp_path), "--notebooks", str(tmp_path), "--only", "9"]
    )
    assert code == 2
    assert "available: 01" in capsys.readouterr().err


def test_run_pass_fail_resume_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    out = tmp_path / "runs"
    run_dir = out / "smoke"
    write_notebook(
        nb_dir / "01_pass.ipynb",
        "import os\nfrom pathlib import Path\n"
        f"assert os.environ['FASTAVATAR_PRESET'] == 'smoke'\n"
        f"assert os.environ['FASTAVATAR_RUN_DIR'] == {str(run_dir)!r}\n"
        f"assert Path.cwd().resolve() == Path({str(nb_dir)!r}).resolve()\n"
        "print('hello from 01')",
        "import json\nrun = Path(os.environ['FASTAVATAR_RUN_DIR'])\n"
        "(run / 'metrics').mkdir(parents=True, exist_ok=True)\n"
        "(run / 'metrics' / '01_pass.json').write_text(json.dumps({'psnr': 21.5, 'steps': 3}))\n"
        "(run / 'figures').mkdir(exist_ok=True)\n"
        "(run / 'figures' / '01_pass_plot.png').write_bytes(b'not really a png')",
    )
    write_notebook(
        nb_dir / "02_fail.ipynb",
        "x = 41",
        "y = x + 1\nraise ValueError(f'boom {y}')\n# line 3\n# line 4\n# line 5\n# line 6",
        "print('never runs')",
    )
    args = ["run", "--preset", "smoke", "--out", str(out), "--notebooks", str(nb_dir)]

    assert cli.main(args) == 1
    text = capsys.readouterr().out
    assert "[ok] 01_pass.ipynb" in text and "[FAILED] 02_fail.ipynb" in text
    assert "1 ran ok, 0 skipped, 1 failed" in text
    assert "FAILED 02_fail.ipynb at cell 2: ValueError: boom 42" in text
    assert "raise ValueError(f'boom {y}')" in text and "# line 5" in text and "# line 6" not in text

    status = json.loads((run_dir / "run_status.json").read_text())
    assert status["preset"] == "smoke"
    assert status["notebooks"]["01_pass"]["status"] == "ok"
    assert status["notebooks"]["02_fail"]["status"] == "failed"
    assert status["notebooks"]["02_fail"]["cell_index"] == 2
    assert status["notebooks"]["01_pass"]["seconds"] > 0
    executed = nbformat.read(run_dir / "executed" / "01_pass.ipynb", as_version=4)
    assert "hello from 01" in executed.cells[1].outputs[0]["text"]
    failed = nbformat.read(run_dir / "executed" / "02_fail.ipynb", as_version=4)
    assert failed.cells[2].outputs[-1]["ename"] == "ValueError"
    assert failed.cells[3].get("outputs", []) == []
    assert presets.Preset.load(run_dir / "preset.json").name == "smoke"

    report = (run_dir / "report.md").read_text()
    assert "| 01_pass | psnr | 21.5 |" in report and "| 01_pass | steps | 3 |" in report
    assert "![figures/01_pass_plot.png](figures/01_pass_plot.png)" in report
    assert "02_fail | failed" in report and "ValueError: boom 42" in report
    assert '<img src="figures/01_pass_plot.png"' in (run_dir / "report.html").read_text()

    # Resume: the notebook that succeeded is skipped without starting a kernel.
    assert cli.main([*args, "--only", "01"]) == 0
    text = capsys.readouterr().out
    assert "[skip] 01_pass.ipynb" in text and "0 ran ok, 1 skipped, 0 failed" in text
    assert cli.main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "01_pass.ipynb: skip" in text and "02_fail.ipynb: run" in text
    assert cli.main([*args, "--dry-run", "--force"]) == 0
    assert "01_pass.ipynb: run" in capsys.readouterr().out
    # Changing a cell makes it run again.
    write_notebook(nb_dir / "01_pass.ipynb", "print('changed')")
    assert cli.main([*args, "--dry-run"]) == 0
    assert "01_pass.ipynb: run" in capsys.readouterr().out
    # The resumed run kept the record of the notebook it did not select.
    status = json.loads((run_dir / "run_status.json").read_text())
    assert set(status["notebooks"]) == {"01_pass", "02_fail"}
    # A damaged status file is named, and --force starts afresh.
    (run_dir / "run_status.json").write_text("{oops")
    assert cli.main([*args, "--dry-run"]) == 2
    assert "run_status.json is not valid JSON" in capsys.readouterr().err
    assert cli.main([*args, "--dry-run", "--force"]) == 0


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--preset", "smoke", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "smoke").mkdir()
    assert cli.main(["report", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "smoke" / "report.md").is_file()


def test_presets_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("smoke: 14 subjects") and "full: 427 subjects" in out and "auto: smoke" in out


def test_kernels_talk_over_local_sockets_and_stop_after_each_notebook(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    write_notebook(nb_dir / "01_quiet.ipynb", "import os\nprint('kernel pid', os.getpid())")
    assert cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "runs"), "--notebooks", str(nb_dir)]) == 0
    out, err = capfd.readouterr()
    assert "[ok] 01_quiet.ipynb" in out
    executed = nbformat.read(tmp_path / "runs" / "smoke" / "executed" / "01_quiet.ipynb", as_version=4)
    pid = int(executed.cells[1].outputs[0]["text"].split()[-1])
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # the kernel was shut down, not left to die with this process
        os.kill(pid, 0)
    if os.name == "posix":  # IPC transport: ipykernel's "running over TCP without encryption" warning is gone
        assert "without encryption" not in out + err and "Parent appears to have exited" not in out + err
