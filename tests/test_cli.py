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


def test_no_notebooks_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(folder: Path) -> str:
        code = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path), "--notebooks", str(folder)])
        assert code == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        assert captured.err.startswith(f"fastavatar-nb: error: --notebooks {folder}: ")
        assert "NN_name.ipynb" in captured.err and "--notebooks DIR" in captured.err
        return captured.err

    assert f"{tmp_path / 'nb'} does not exist" in run(tmp_path / "nb")
    (tmp_path / "nb").mkdir()
    assert "no notebooks to run" in run(tmp_path / "nb") and "found no .ipynb files" in run(tmp_path / "nb")
    (tmp_path / "nb" / "scratch.ipynb").write_text("{}")
    (tmp_path / "nb" / "1_short.ipynb").write_text("{}")
    assert "found only 1_short.ipynb, scratch.ipynb" in run(tmp_path / "nb")
    (tmp_path / "file.ipynb").write_text("{}")
    assert "is a file, not a folder" in run(tmp_path / "file.ipynb")
    assert not (tmp_path / "smoke").exists()


@pytest.mark.parametrize("args", [
    ["--preset", "nope"],
    ["--only", "01", "--timeout", "-3"],
    ["--only", "01", "--timeout", "soon"],
])
def test_bad_arguments_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--out", str(tmp_path), "--notebooks", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}" in err and "Traceback" not in err


@pytest.mark.parametrize(("spec", "message"), [
    ("", "cannot read ''"),
    (",", "cannot read ''"),
    ("1..x", "cannot read '1..x'"),
    ("drop table", "cannot read 'drop table'"),
    ("-1", "cannot read '-1'"),
    ("99999999999999999999", "no notebook numbered"),
])
def test_nonsense_only_is_a_clean_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, message: str) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    code = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "runs"), "--notebooks", str(tmp_path),
                     "--only", spec])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastavatar-nb: error: --only: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_out_that_is_a_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    (tmp_path / "afile").write_text("not a folder")
    for extra in ([], ["--dry-run"]):
        code = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "afile"), "--notebooks", str(tmp_path),
                         *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastavatar-nb: error: --out {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file")
        assert "choose a writable folder with --out DIR" in err and "Traceback" not in err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "smoke").write_text("a file where the run folder goes")
    assert cli.main(["report", "--preset", "smoke", "--out", str(tmp_path / "runs")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    (tmp_path / "runs" / "smoke").unlink()
    (tmp_path / "runs" / "smoke").mkdir()
    (tmp_path / "runs" / "smoke" / "executed").write_text("a file where a folder goes")
    assert cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "runs"), "--notebooks", str(tmp_path)]) == 2
    assert "executed is a file, where the run keeps a folder" in capsys.readouterr().err


def test_unwritable_out_is_a_clean_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    out = tmp_path / "readonly"
    out.mkdir()
    args = ["run", "--preset", "smoke", "--out", str(out), "--notebooks", str(tmp_path)]
    if os.name == "posix" and os.geteuid() != 0:  # root writes anywhere: then only the simulated case below
        out.chmod(0o555)
        try:
            assert cli.main(args) == 2
        finally:
            out.chmod(0o755)
        err = capsys.readouterr().err
        assert f"--out {out}: cannot create the run folder {out / 'smoke'} (Permission denied)" in err
        assert "Traceback" not in err

    real_mkdir = Path.mkdir

    def refuse(self: Path, *a: object, **k: object) -> None:
        if self == out / "smoke":
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"fastavatar-nb: error: --out {out}: cannot create the run folder {out / 'smoke'} "
                   "(Permission denied); choose a writable folder with --out DIR\n")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    (out / "smoke").mkdir()

    def no_write(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", no_write)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: the run folder {out / 'smoke'} is not writable (Permission denied)" in err
    monkeypatch.setenv(presets.RUN_DIR_ENV, str(out / "smoke"))
    assert cli.main(args[:3] + args[5:]) == 2
    assert f"${presets.RUN_DIR_ENV}={out / 'smoke'}: the run folder" in capsys.readouterr().err


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
    assert "it is the notebook's 3rd cell (code cell 2 of 3); it starts:" in text

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
    # Other settings of the same preset (a changed field, a newer version's defaults) make it run again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets._BASE, "smoke", presets._BASE["smoke"].replace(**{"refine.schedule": "code"}))
        assert cli.main([*args, "--dry-run"]) == 0
        assert "01_pass.ipynb: run" in capsys.readouterr().out
    assert cli.main([*args, "--dry-run"]) == 0
    assert "01_pass.ipynb: skip" in capsys.readouterr().out
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
    # --set changes a field for the run: the run folder's preset.json and the notebooks' presets.get have it
    write_notebook(nb_dir / "01_pass.ipynb", "from fastavatar_nb import presets\n"
                   "p = presets.get('smoke')\nassert (p.decoder.epochs, p.num_subjects) == (3, 20), p.describe()")
    assert cli.main([*args, "--only", "01", "--force", "--set", "decoder.epochs=3", "--set", "num_subjects=20"]) == 0
    assert "1 ran ok" in capsys.readouterr().out
    assert presets.Preset.load(run_dir / "preset.json").decoder.epochs == 3
    assert cli.main([*args, "--only", "01", "--dry-run", "--set", "decoder.epochs=3", "--set", "num_subjects=20"]) == 0
    assert "01_pass.ipynb: skip" in capsys.readouterr().out  # the same settings: done
    assert cli.main([*args, "--only", "01", "--dry-run", "--set", "decoder.epoch=3"]) == 2
    assert "DecoderConfig: unknown fields ['epoch']" in capsys.readouterr().err


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


def test_dead_kernel_names_the_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    write_notebook(nb_dir / "01_exit.ipynb", "x = 1", "import os\nos._exit(1)  # the kernel exits", "print('never')")
    write_notebook(nb_dir / "02_killed.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    write_notebook(nb_dir / "03_after.ipynb", "print('still runs')")
    out = tmp_path / "runs"
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--notebooks", str(nb_dir)]) == 1
    text = capsys.readouterr().out
    assert "FAILED 01_exit.ipynb at cell 2: DeadKernelError: the kernel died while this cell ran" in text
    assert ("  cell 2 counts from 0 (as nb.cells does): it is the notebook's 3rd cell (code cell 2 of 3); it starts:\n"
            "  import os\n  os._exit(1)  # the kernel exits") in text
    assert "FAILED 02_killed.ipynb at cell 1: DeadKernelError: the kernel died while this cell ran" in text
    assert "it is the notebook's 2nd cell (code cell 1 of 1)" in text and "os.kill(os.getpid(), signal.SIGKILL)" in text
    assert "before any cell ran" not in text and "[ok] 03_after.ipynb" in text
    status = json.loads((out / "smoke" / "run_status.json").read_text())
    assert status["notebooks"]["01_exit"]["cell_index"] == 2 and status["notebooks"]["02_killed"]["cell_index"] == 1
    executed = nbformat.read(out / "smoke" / "executed" / "01_exit.ipynb", as_version=4)
    assert executed.cells[3].get("outputs", []) == []


def test_unreadable_notebook_is_named_and_the_others_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    (nb_dir / "01_broken.ipynb").write_text('{"cells": [\n  {"cell_type": "code",,}\n')
    write_notebook(nb_dir / "02_fine.ipynb", "print('fine')")
    (nb_dir / "03_list.ipynb").write_text("[]")
    (nb_dir / "04_binary.ipynb").write_bytes(b"\xff\xfe\x00junk")
    (nb_dir / "05_empty.ipynb").write_text("")
    out = tmp_path / "runs"
    args = ["run", "--preset", "smoke", "--out", str(out), "--notebooks", str(nb_dir)]
    assert cli.main([*args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "01_broken.ipynb: cannot be read (would be marked failed)" in captured.out
    assert "02_fine.ipynb: run" in captured.out
    assert f"warning: {nb_dir / '01_broken.ipynb'} is not a Jupyter notebook" in captured.err

    assert cli.main(args) == 1
    captured = capsys.readouterr()
    text = captured.out
    assert "Traceback" not in text + captured.err and "[ok] 02_fine.ipynb" in text
    assert (f"FAILED 01_broken.ipynb at reading the file: NotebookReadError: {nb_dir / '01_broken.ipynb'} is not a "
            "Jupyter notebook: expected JSON, found invalid JSON at line 2, column 24") in text
    assert "restore it (e.g. `git checkout --" in text
    assert "03_list.ipynb is not a Jupyter notebook: expected a JSON object with a 'cells' list, found a JSON list" in text
    assert "04_binary.ipynb is not a Jupyter notebook: expected UTF-8 JSON text" in text
    assert "05_empty.ipynb is not a Jupyter notebook: expected JSON, found an empty file" in text
    assert "1 ran ok, 0 skipped, 4 failed" in text
    status = json.loads((out / "smoke" / "run_status.json").read_text())
    assert status["notebooks"]["01_broken"]["status"] == "failed"
    assert "01_broken.ipynb" in status["notebooks"]["01_broken"]["error"]
    assert "01_broken | failed" in (out / "smoke" / "report.md").read_text()
    # --fail-fast stops at the first one
    assert cli.main([*args, "--fail-fast"]) == 1
    summary = capsys.readouterr().out.split("Summary")[1]
    assert "01_broken" in summary and "02_fine" not in summary


@pytest.mark.parametrize("content", [
    "{oops", "[]", '{"notebooks": []}', "\xff\xfe", "",
])
def test_damaged_status_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "run_status.json").write_bytes(content.encode("latin-1"))
    args = ["run", "--preset", "smoke", "--out", str(tmp_path / "runs"), "--notebooks", str(tmp_path), "--dry-run"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"fastavatar-nb: error: {run_dir / 'run_status.json'}" in err
    assert "delete it or run with --force" in err and "Traceback" not in err
    assert cli.main([*args, "--force"]) == 0


def test_status_entries_of_the_wrong_shape_are_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_notebook(tmp_path / "01_a.ipynb", "x = 1")
    write_notebook(tmp_path / "02_b.ipynb", "x = 2")
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    digest = cli._cells_hash(tmp_path / "02_b.ipynb")
    (run_dir / "run_status.json").write_text(json.dumps({"notebooks": {
        "01_a": "oops",
        "02_b": {"status": "ok", "cells_sha256": digest, "executed": 5, "seconds": "long"},
    }}))
    args = ["run", "--preset", "smoke", "--out", str(tmp_path / "runs"), "--notebooks", str(tmp_path), "--dry-run"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "01_a.ipynb: run" in out and "02_b.ipynb: run" in out
    (run_dir / "run_status.json").write_text(json.dumps({"notebooks": {
        "02_b": {"status": "ok", "cells_sha256": digest, "executed": "executed/02_b.ipynb", "seconds": "long",
                 "preset_sha256": cli._preset_hash(presets.get("smoke", run_dir=run_dir))},
    }}))
    (run_dir / "executed").mkdir()
    (run_dir / "executed" / "02_b.ipynb").write_text("{}")
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "01_a.json").write_text("{broken")
    code = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "runs"), "--notebooks", str(tmp_path),
                     "--only", "02"])
    assert code == 0  # skipped; the damaged metrics file is named in the report, not raised at the end
    assert "[skip] 02_b.ipynb" in capsys.readouterr().out
    assert "Left out: metrics/01_a.json: not valid JSON" in (run_dir / "report.md").read_text()


def test_kernels_are_told_they_are_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastavatar_nb._live import HEADLESS_ENV

    monkeypatch.delenv(HEADLESS_ENV, raising=False)
    write_notebook(tmp_path / "01_env.ipynb", f"import os\nprint(repr(os.environ.get({HEADLESS_ENV!r})))")
    out = tmp_path / "runs"
    args = ["run", "--preset", "smoke", "--out", str(out), "--notebooks", str(tmp_path), "--force"]
    assert cli.main(args) == 0
    executed = nbformat.read(out / "smoke" / "executed" / "01_env.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"].strip() == "'1'"
    monkeypatch.setenv(HEADLESS_ENV, "0")  # a user who wants the live displays anyway keeps them
    assert cli.main(args) == 0
    executed = nbformat.read(out / "smoke" / "executed" / "01_env.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"].strip() == "'0'"
