"""``fastavatar-nb``: run the notebooks headless and report, from a terminal.

Commands:

- ``fastavatar-nb run [--preset smoke|course|full|auto] [--only 02..04|01,03] [--out runs/] [--force]``
  executes ``notebooks/NN_name.ipynb`` in order with nbclient, each in a fresh kernel whose
  working directory is the notebooks folder and whose environment carries
  ``FASTAVATAR_PRESET`` (the resolved name) and ``FASTAVATAR_RUN_DIR`` (the run folder).
  Executed copies go to ``<run folder>/executed/NN_name.ipynb``; ``<run folder>/run_status.json``
  records each notebook's status, time and a hash of its cells, and a later ``run`` skips the
  notebooks that succeeded with unchanged cells (``--force`` reruns them). It ends with a
  summary, writes ``report.md`` / ``report.html`` into the run folder (see
  ``fastavatar_nb.report``) and exits 1 if any notebook failed, naming the notebook, the
  failing cell and the error.
- ``fastavatar-nb report [--preset ...] [--out ...] [--open]`` rewrites the report of a run folder (and
  opens it in the browser where there is a display).
- ``fastavatar-nb presets`` prints every preset's one-line description.
- ``fastavatar-nb reconstruct photo.jpg [--refine N] [--out DIR] [--run DIR | --checkpoint course]
  [--json] [--overwrite]`` turns one photo into a 3D head (:func:`fastavatar_nb.photo.reconstruct`)
  and writes ``head.ply``, ``turntable.gif``, ``viewer.html``, ``detection.png`` and
  ``summary.json`` into ``DIR`` (default ``<photo name>_head``), printing each step's time; with
  ``--json`` the summary goes to stdout as JSON and the step lines to stderr. A photo that is not
  an image, has no face, or models that are missing give one error line and exit code 2.

The run folder is ``<--out>/<preset name>`` when ``--out`` is given, else
``FASTAVATAR_RUN_DIR`` when set, else ``<repository>/runs/<preset name>`` (see
``fastavatar_nb.presets.get``).

Kernels started by ``run`` get ``FASTAVATAR_HEADLESS=1`` (unless the variable is set already):
nobody watches them, so live figures are drawn once and progress bars print a few lines
(:mod:`fastavatar_nb._live`).

Bad input is reported as one ``fastavatar-nb: error: ...`` line naming the argument or file, what
was expected and what to do, with exit code 2 (never a traceback): a missing or empty notebooks
folder, a run folder that cannot be created or written, a damaged ``run_status.json``. A notebook
that cannot be read (not JSON, not a notebook) is named and marked failed, and the others run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastavatar_nb import presets, report
from fastavatar_nb._live import HEADLESS_ENV

if TYPE_CHECKING:
    from nbformat import NotebookNode

__all__ = ["NotebookResult", "build_parser", "discover_notebooks", "execute_notebook", "main", "parse_only"]

NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_[A-Za-z0-9_-]+\.ipynb$")
STATUS_FILE = "run_status.json"
Status = Literal["ok", "failed", "skipped"]


class CliError(Exception):
    """A usage problem reported as one line and exit code 2 (never a traceback)."""


class NotebookReadError(Exception):
    """A notebook file that cannot be read as a Jupyter notebook; the message names the file."""


@dataclass
class NotebookResult:
    """What happened to one notebook in one ``run``."""

    name: str
    """File stem, e.g. ``"02_template_construction"``."""
    status: Status
    """"ok", "failed", or "skipped" (succeeded earlier with the same cells and preset)."""
    seconds: float
    """Wall time of the execution (of the earlier one when skipped)."""
    executed: Path | None
    """The executed copy, or ``None`` when the notebook could not be read."""
    error: str = ""
    """``ErrorName: message`` of the failure; empty otherwise."""
    cell_index: int | None = None
    """Index in ``notebook.cells`` of the failing cell (markdown cells counted), when known."""
    cell_source: str = ""
    """First lines of the failing cell's source."""
    cell_position: str = ""
    """Where the failing cell is, counted from 1: e.g. "the notebook's 3rd cell (code cell 2 of 4)"."""


def discover_notebooks(folder: Path) -> list[Path]:
    """``NN_name.ipynb`` files directly in ``folder``, sorted by name; ``[]`` when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def parse_only(spec: str, available: Sequence[int]) -> list[int]:
    """Notebook numbers selected by ``spec``: comma-separated numbers and ``A..B`` ranges (inclusive).

    ``"02..04"`` -> ``[2, 3, 4]``, ``"01,03"`` -> ``[1, 3]``. Every number must be one of
    ``available``; a range keeps only the available numbers inside it and must hit one.

    Raises:
        CliError: malformed spec, an unknown number, or a range that selects nothing.
    """
    chosen: set[int] = set()
    valid = ", ".join(f"{n:02d}" for n in sorted(available)) or "none"
    for raw in spec.split(","):
        token = raw.strip()
        match = re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", token)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise CliError(f"--only: range {token!r} is empty (start after end)")
            hit = [n for n in available if lo <= n <= hi]
            if not hit:
                raise CliError(f"--only: range {token!r} matches no notebook; available: {valid}")
            chosen.update(hit)
        elif re.fullmatch(r"\d+", token):
            number = int(token)
            if number not in available:
                raise CliError(f"--only: no notebook numbered {token!r}; available: {valid}")
            chosen.add(number)
        else:
            raise CliError(
                f"--only: cannot read {token!r}; use numbers and ranges such as '02..04' or '01,03'"
            )
    return sorted(chosen)


def _read_notebook_json(path: Path) -> dict:
    """The notebook's JSON object; :class:`NotebookReadError` naming ``path`` and the problem otherwise."""
    fix = "restore it (e.g. `git checkout -- FILE`) or save it again from Jupyter".replace("FILE", str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NotebookReadError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise NotebookReadError(
            f"{path} is not a Jupyter notebook: expected UTF-8 JSON text, found a byte that is not UTF-8 "
            f"at offset {err.start}; {fix}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        found = ("an empty file" if not text.strip()
                 else f"invalid JSON at line {err.lineno}, column {err.colno} ({err.msg})")
        raise NotebookReadError(f"{path} is not a Jupyter notebook: expected JSON, found {found}; {fix}") from err
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        found = (f"a JSON {type(data).__name__}" if not isinstance(data, dict)
                 else "no 'cells' list" if not isinstance(cells, list) else "a cell that is not an object")
        raise NotebookReadError(
            f"{path} is not a Jupyter notebook: expected a JSON object with a 'cells' list, found {found}; {fix}")
    return data


def _preset_hash(preset: presets.Preset) -> str:
    """sha256 of the preset's settings (its run folder left out): a notebook that succeeded at other
    settings of the same preset (a changed field, a newer version's defaults) runs again."""
    fields = {k: v for k, v in preset.to_dict().items() if k != "run_dir"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _cells_hash(path: Path) -> str:
    """sha256 of the cells' types and sources (outputs and metadata ignored).

    Raises:
        NotebookReadError: the file cannot be read or is not a notebook (the message names it).
    """
    data = _read_notebook_json(path)
    digest = hashlib.sha256()
    for cell in data["cells"]:
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        digest.update(cell.get("cell_type", "").encode() + b"\0" + source.encode() + b"\0")
    return digest.hexdigest()


def execute_notebook(
    source: Path,
    executed: Path,
    env: dict[str, str],
    timeout: int | None = None,
    on_cell: Callable[[int, int], None] | None = None,
) -> NotebookResult:
    """Execute ``source`` top to bottom in a fresh kernel and write the result to ``executed``.

    Args:
        source: the notebook file.
        executed: where the executed copy (outputs included, also when a cell failed) is written.
        env: the kernel's full environment.
        timeout: seconds allowed per cell; ``None`` for no limit.
        on_cell: optional callable ``(cell_index, num_cells)`` called after each cell.

    Returns:
        A :class:`NotebookResult` with status "ok" or "failed" (never raises for a failing cell,
        a dead kernel, a cell timeout or an unreadable notebook).
    """
    import nbformat
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from traitlets.config import Config

    name = source.stem
    start = time.perf_counter()
    try:
        _read_notebook_json(source)
        nb = nbformat.read(source, as_version=4)
    except NotebookReadError as err:
        return NotebookResult(name, "failed", 0.0, None, error=f"NotebookReadError: {err}")
    except Exception as err:  # nbformat: NotJSONError, ValidationError, a KeyError for a missing field, ...
        return NotebookResult(name, "failed", 0.0, None, error=f"NotebookReadError: cannot read {source} "
                              f"as a Jupyter notebook ({type(err).__name__}: {err})")

    failed_cell: list[int] = []
    running_cell: list[int] = []  # the code cell sent to the kernel last (where a dead kernel died)
    num_cells = len(nb.cells)

    def cell_done(cell: object, cell_index: int, execute_reply: object) -> None:
        if on_cell is not None:
            on_cell(cell_index, num_cells)

    def cell_error(cell: object, cell_index: int, execute_reply: object) -> None:
        failed_cell.append(cell_index)

    def cell_execute(cell: object, cell_index: int) -> None:
        running_cell[:] = [cell_index]

    kernel_name = nb.metadata.get("kernelspec", {}).get("name", "python3")
    config = Config()
    ipc_dir = None
    if os.name == "posix":  # local IPC sockets: no TCP ports, and no "running over TCP without encryption" warning
        ipc_dir = tempfile.mkdtemp(prefix="fastavatar-kernel-")
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = os.path.join(ipc_dir, "k")
    client = NotebookClient(
        nb,
        config=config,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(source.parent)}},
        on_cell_executed=cell_done,
        on_cell_error=cell_error,
        on_cell_execute=cell_execute,
        # No widget state in the executed copy: nbconvert would then draw widgets with a script from a CDN
        # (nothing shows offline). Each of our viewers carries its own fallback instead (a PNG, or the
        # self-contained WebGL page of webviewer.HeadViewer), which nbconvert uses when the state is absent.
        store_widget_state=False,
    )
    error = ""
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        error = f"{err.ename}: {err.evalue}"
    except CellTimeoutError as err:
        error = f"CellTimeoutError: {str(err).splitlines()[0] if str(err) else 'cell timed out'}"
    except DeadKernelError:
        error = ("DeadKernelError: the kernel died while this cell ran (its process exited or was killed: "
                 "os._exit, a crash in native code, or the out-of-memory killer); the outputs so far are kept")
        if not running_cell:
            error = "DeadKernelError: the kernel died before any cell ran"
    except NoSuchKernel as err:
        error = f"NoSuchKernel: no Jupyter kernel named {err.name!r} (install ipykernel in this environment)"
    except Exception as err:  # e.g. a kernel that does not start ("Kernel died before replying to kernel_info")
        error = f"{type(err).__name__}: {err}".strip()
        if not running_cell:
            error += " (the kernel could not be started)"
    finally:
        if ipc_dir is not None:
            shutil.rmtree(ipc_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    try:
        executed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed)
    except OSError as err:
        write_error = f"cannot write the executed copy {executed}: {err.strerror or err}"
        error = f"{error}; {write_error}" if error else f"OSError: {write_error}"
        executed = None
    if not error:
        return NotebookResult(name, "ok", seconds, executed)
    index = failed_cell[0] if failed_cell else running_cell[0] if running_cell else _first_error_cell(nb)
    lines = nb.cells[index].source.splitlines() if index is not None else []
    head = "\n".join(lines[:5]) + ("\n..." if len(lines) > 5 else "")
    position = ""
    if index is not None:
        position = f"the notebook's {_ordinal(index + 1)} cell"
        if nb.cells[index].cell_type == "code":
            code_number = sum(c.cell_type == "code" for c in nb.cells[: index + 1])
            position += f" (code cell {code_number} of {sum(c.cell_type == 'code' for c in nb.cells)})"
    return NotebookResult(name, "failed", seconds, executed, error=error, cell_index=index, cell_source=head,
                          cell_position=position)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _first_error_cell(nb: NotebookNode) -> int | None:
    for index, cell in enumerate(nb.cells):
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return index
    return None


def _load_status(path: Path) -> dict:
    if not path.exists():
        return {"notebooks": {}}
    advice = "delete it or run with --force (every selected notebook then runs again)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CliError(f"{path} is not valid JSON ({err}); {advice}") from err
    except UnicodeDecodeError as err:
        raise CliError(f"{path} is not valid JSON (a byte that is not UTF-8 at offset {err.start}); {advice}") from err
    except OSError as err:
        raise CliError(f"cannot read the run status file {path}: {err.strerror or err}; {advice}") from err
    if not isinstance(data, dict) or not isinstance(data.get("notebooks"), dict):
        raise CliError(f"{path} does not look like a run status file (expected a JSON object with a "
                       f"'notebooks' object); {advice}")
    # Entries of another shape are dropped (their notebooks run again), never trusted.
    data["notebooks"] = {k: v for k, v in data["notebooks"].items() if isinstance(v, dict)}
    return data


def _check_run_dir(run_dir: Path, origin: str, create: bool) -> None:
    """Check that ``run_dir`` can be (or is) a writable folder; :class:`CliError` naming ``origin`` otherwise.

    Args:
        run_dir: the run folder.
        origin: where the folder came from, for the message (``"--out /x"``, ...).
        create: create it and write a probe file (a real run); else only look (``--dry-run``).
    """
    advice = "choose a writable folder with --out DIR"
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise CliError(f"{origin}: {folder} is a file, not a folder; the run folder {run_dir} "
                               f"cannot be made inside it; {advice}")
            break
    if not create:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"{origin}: cannot create the run folder {run_dir} ({err.strerror or err}); "
                       f"{advice}") from err
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
        for sub in ("executed", "metrics", "figures"):
            folder = run_dir / sub
            if folder.exists() and not folder.is_dir():
                raise CliError(f"{origin}: {folder} is a file, where the run keeps a folder; move it away or "
                               f"{advice}")
    except OSError as err:
        raise CliError(f"{origin}: the run folder {run_dir} is not writable ({err.strerror or err}); "
                       f"{advice}") from err


def _run_dir_origin(args: argparse.Namespace) -> str:
    if args.out is not None:
        return f"--out {args.out}"
    if os.environ.get(presets.RUN_DIR_ENV):
        return f"${presets.RUN_DIR_ENV}={os.environ[presets.RUN_DIR_ENV]}"
    return "run folder"


def _find_notebooks(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The notebooks folder and its ``NN_name.ipynb`` files; :class:`CliError` when there are none."""
    given = args.notebooks is not None
    folder = Path(args.notebooks).resolve() if given else presets.project_root() / "notebooks"
    what = f"--notebooks {args.notebooks}" if given else f"notebooks folder {folder} (the default)"
    expected = "expected a folder of notebooks named NN_name.ipynb (two digits, '_', a name; e.g. 01_basics.ipynb)"
    if not folder.exists():
        raise CliError(f"{what}: {folder} does not exist; {expected}; pass --notebooks DIR")
    if not folder.is_dir():
        raise CliError(f"{what}: {folder} is a file, not a folder; {expected}; pass --notebooks DIR")
    found = discover_notebooks(folder)
    if not found:
        others = sorted(p.name for p in folder.glob("*.ipynb"))
        seen = (f"found only {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" if others
                else "found no .ipynb files")
        raise CliError(f"{what}: no notebooks to run in {folder}: {expected}, {seen}; "
                       f"rename them or pass --notebooks DIR")
    return folder, found


def _save_status(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _data_overrides(args: argparse.Namespace) -> dict:
    """Preset overrides from ``--data``, ``--split``, ``--labels`` and ``--timestep`` (none when not given)."""
    out: dict = {}
    for name, value in (("data", args.data), ("data_split", args.split), ("data_labels", args.labels),
                        ("data_timestep", args.timestep)):
        if value is not None:
            out[name] = value
    if out and args.data is None and not os.environ.get(presets.DATA_ENV):
        given = ", ".join(f"--{n.removeprefix('data_')}" for n in out)
        raise CliError(f"{given} need --data DIR (a folder of real NeRSemble/VHAP subjects)")
    return out


def _resolve_preset(args: argparse.Namespace) -> presets.Preset:
    try:
        name = presets.get(args.preset, allow_cpu=args.allow_cpu).name
        overrides = {"run_dir": Path(args.out) / name} if args.out is not None else {}
        return presets.get(name, allow_cpu=args.allow_cpu, **overrides, **_data_overrides(args),
                           **presets.parse_sets(args.set))
    except presets.PresetError as err:
        message = str(err)
        for field, option in (("data_split ", "--split "), ("data_labels ", "--labels "), ("data ", "--data ")):
            if message.startswith(field):
                message = option + message.removeprefix(field)
                break
        raise CliError(message) from err


def _check_data(preset: presets.Preset) -> None:
    """With ``--data``: every subject folder checked before anything runs or is written (one report of
    every problem, :class:`CliError`), and a run folder holding another dataset refused."""
    if preset.data is None:
        return
    from fastavatar_nb.data.real import check_cache, check_dataset, source_record

    print(f"Checking every subject in {preset.data} before the run ...")
    try:
        check = check_dataset(preset.data, preset.data_timestep, preset.data_split, preset.data_labels,
                              content=True, progress=True, num_points=preset.num_gaussians)
    except FileNotFoundError as err:
        raise CliError(str(err)) from err
    if not check.ok:
        raise CliError(f"--data {preset.data} has problems; nothing was run and nothing in the run folder "
                       f"{preset.run_dir} was written:\n{check.report()}\nFix or remove these subject folders "
                       "(or the --split/--labels file) and run again.")
    print(check.report())
    from fastavatar_nb.report_results import GENERALISES_FROM

    if preset.num_train_subjects < GENERALISES_FROM:
        print(f"Note: {preset.num_train_subjects} training subject(s) and {preset.num_test_subjects} test subject(s). "
              "Every stage runs and each fit reproduces its subject, but the decoder and the encoder cannot learn "
              f"from so few (below {GENERALISES_FROM}) what tells people apart: expect the feed-forward head of a "
              "test subject to stay near the template; the notebooks and the report state what the numbers show.")
    record = source_record(preset.data, preset.image_width, preset.image_height, preset.num_gaussians,
                           preset.data_timestep, preset.data_split, preset.data_labels)
    try:
        check_cache(preset.run_dir / "dataset", record)
    except FileExistsError as err:
        raise CliError(str(err)) from err


def cmd_run(args: argparse.Namespace) -> int:
    """``fastavatar-nb run``; returns the exit code."""
    from tqdm.auto import tqdm

    preset = _resolve_preset(args)
    notebooks_dir, found = _find_notebooks(args)
    numbers = [int(NOTEBOOK_PATTERN.match(p.name).group(1)) for p in found]  # type: ignore[union-attr]
    if args.only is not None:
        wanted = set(parse_only(args.only, numbers))
        found = [p for p, n in zip(found, numbers, strict=True) if n in wanted]

    run_dir = preset.run_dir
    origin = _run_dir_origin(args)
    _check_run_dir(run_dir, origin, create=False)
    executed_dir = run_dir / "executed"
    status_path = run_dir / STATUS_FILE
    try:
        status = _load_status(status_path)
    except CliError:
        if not args.force:
            raise
        status = {"notebooks": {}}
    print(f"Preset {preset.describe()}")
    print(preset.describe_data())
    print(f"Notebooks: {notebooks_dir} ({len(found)} selected). Run folder: {run_dir}")
    _check_data(preset)

    plan: list[tuple[Path, str | None, bool]] = []
    unreadable: dict[str, str] = {}
    preset_digest = _preset_hash(preset)
    for path in found:
        try:
            digest: str | None = _cells_hash(path)
        except NotebookReadError as err:
            # Named now and marked failed when its turn comes; the other notebooks still run.
            digest, unreadable[path.stem] = None, str(err)
            print(f"fastavatar-nb: warning: {err}; {path.name} will be marked failed", file=sys.stderr)
        prev = status["notebooks"].get(path.stem, {})
        executed_rel = prev.get("executed")
        done = (
            digest is not None
            and prev.get("status") == "ok"
            and prev.get("cells_sha256") == digest
            and prev.get("preset_sha256") == preset_digest
            and isinstance(executed_rel, str)
            and (run_dir / executed_rel).is_file()
        )
        plan.append((path, digest, done and not args.force))
    if args.dry_run:
        for path, _, skip in plan:
            what = ("cannot be read (would be marked failed)" if path.stem in unreadable
                    else "skip (done earlier, same cells and preset)" if skip else "run")
            print(f"  {path.name}: {what}")
        return 0

    _check_run_dir(run_dir, origin, create=True)
    preset.save()
    env = {
        **os.environ,
        presets.PRESET_ENV: preset.name,
        presets.RUN_DIR_ENV: str(run_dir),
    }
    env.setdefault(HEADLESS_ENV, "1")  # nobody watches these kernels: no live redraws (fastavatar_nb._live)
    if args.set:  # the kernels' presets.get applies them (over any FASTAVATAR_SET of the caller)
        env[presets.SET_ENV] = json.dumps({**json.loads(env.get(presets.SET_ENV) or "{}"), **presets.parse_sets(args.set)})
    if args.allow_cpu:
        env[presets.ALLOW_CPU_FULL_ENV] = "1"
    for var, value in ((presets.DATA_ENV, preset.data), (presets.DATA_SPLIT_ENV, preset.data_split),
                       (presets.DATA_LABELS_ENV, preset.data_labels), (presets.DATA_TIMESTEP_ENV, preset.data_timestep)):
        if value is not None:
            env[var] = str(value)
        else:
            env.pop(var, None)
    status["preset"] = preset.name
    results: list[NotebookResult] = []
    # disable=None: a live bar on a terminal only; logs (CI) get the one-line [ok]/[FAILED] records.
    bar = tqdm(plan, unit="notebook", desc="notebooks", file=sys.stdout, dynamic_ncols=True, disable=None)
    for path, digest, skip in bar:
        if skip:
            prev = status["notebooks"][path.stem]
            seconds = prev.get("seconds")
            results.append(
                NotebookResult(
                    path.stem, "skipped", float(seconds) if isinstance(seconds, int | float) else 0.0,
                    run_dir / prev["executed"],
                )
            )
            bar.write(f"[skip] {path.name}: succeeded earlier with the same cells and preset (--force reruns it)")
            continue
        bar.set_postfix_str(path.stem)

        def on_cell(index: int, total: int, stem: str = path.stem) -> None:
            bar.set_postfix_str(f"{stem} cell {index + 1}/{total}")

        try:
            if path.stem in unreadable:
                result = NotebookResult(path.stem, "failed", 0.0, None, error=f"NotebookReadError: {unreadable[path.stem]}")
            else:
                result = execute_notebook(
                    path, executed_dir / path.name, env, timeout=args.timeout, on_cell=on_cell
                )
        except KeyboardInterrupt:
            bar.close()
            print(f"\nInterrupted during {path.name}; finished notebooks are recorded in {status_path}.")
            print("Run the same command again to resume (notebooks that succeeded are skipped).")
            return 130
        results.append(result)
        entry = {
            "status": result.status,
            "seconds": round(result.seconds, 3),
            "executed": str(result.executed.relative_to(run_dir)) if result.executed else None,
            "cells_sha256": digest,
            "preset_sha256": preset_digest,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "error": result.error,
            "cell_index": result.cell_index,
        }
        status["notebooks"][path.stem] = entry
        _save_status(status_path, status)
        tag = "ok" if result.status == "ok" else "FAILED"
        bar.write(f"[{tag}] {path.name} in {report.format_duration(result.seconds, compact=True)}")
        if result.status == "failed" and args.fail_fast:
            break
    bar.close()

    md_path, _ = report.write_report(run_dir)
    _print_summary(results, run_dir, md_path)
    return 1 if any(r.status == "failed" for r in results) else 0


def _print_summary(results: list[NotebookResult], run_dir: Path, md_path: Path) -> None:
    width = max((len(r.name) for r in results), default=8)
    print("\nSummary")
    for r in results:
        took = report.format_duration(r.seconds, compact=True) + (" (earlier run)" if r.status == "skipped" else "")
        print(f"  {r.name:<{width}}  {r.status:<7}  {took}")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    total = sum(r.seconds for r in results if r.status != "skipped")
    print(
        f"{counts['ok']} ran ok, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"{report.format_duration(total, compact=True)} executing."
    )
    print(f"Executed notebooks: {run_dir / 'executed'}")
    print(f"Metrics: {run_dir / 'metrics'}  Figures: {run_dir / 'figures'}")
    print(f"Report: {md_path} (and report.html)")
    for r in results:
        if r.status != "failed":
            continue
        where = (f"cell {r.cell_index}" if r.cell_index is not None
                 else "reading the file" if r.error.startswith("NotebookReadError") else "before any cell ran")
        print(f"\nFAILED {r.name}.ipynb at {where}: {r.error}")
        if r.cell_position:
            print(f"  cell {r.cell_index} counts from 0 (as nb.cells does): it is {r.cell_position}; it starts:")
        if r.cell_source:
            print("  " + r.cell_source.replace("\n", "\n  "))
        if r.executed:
            print(f"  full traceback in {r.executed}")


def cmd_report(args: argparse.Namespace) -> int:
    """``fastavatar-nb report``; returns the exit code."""
    run_dir = _resolve_preset(args).run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise CliError(f"{_run_dir_origin(args)}: {run_dir} is a file, not a run folder; pass the --out of a run")
    if not run_dir.is_dir():
        raise CliError(f"run folder {run_dir} does not exist; run `fastavatar-nb run` first")
    _check_run_dir(run_dir, _run_dir_origin(args), create=True)
    md_path, html_path = report.write_report(run_dir)
    print(f"Wrote {md_path} and {html_path}")
    if args.open:
        if not report.has_display():
            print(f"No display to open a browser on: open {html_path} from a machine with one")
        elif report.open_report(html_path, display=True):
            print(f"Opened {html_path} in the browser")
        else:
            print(f"No browser took it: open {html_path} yourself")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """``fastavatar-nb presets``; returns the exit code."""
    for name in presets.PRESET_NAMES:
        if name != "auto":
            print(presets.base(name).describe())
    auto = presets.get("auto").name
    print(f"auto: {auto} on this machine (full when CUDA is available, else smoke)")
    return 0


def _reconstruct_models(args: argparse.Namespace):
    """``(avatars, encoder, width, height, source)`` from ``--run`` or ``--checkpoint``."""
    import torch

    from fastavatar_nb import checkpoints
    from fastavatar_nb._io import ArtifactError
    from fastavatar_nb.decoder import DecoderResult
    from fastavatar_nb.encoder import EncoderResult

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run is not None:
        run = Path(args.run)
        if not run.is_dir():
            raise CliError(f"--run {run}: no such run folder; pass a folder written by `fastavatar-nb run` (it holds "
                           "decoder.safetensors, encoder.safetensors and preset.json) or use --checkpoint course")
        try:
            preset = presets.Preset.load(run / "preset.json")
            avatars = DecoderResult.load(run, device=device)
            encoder = EncoderResult.load(run, device=device)
        except (FileNotFoundError, ArtifactError, presets.PresetError, ValueError) as e:
            raise CliError(f"--run {run}: {e}; the run must have trained the decoder and the encoder (notebooks "
                           "03-04), or use --checkpoint course") from None
        return avatars, encoder, preset.image_width, preset.image_height, f"run {run}"
    try:
        ckpt = checkpoints.load(args.checkpoint, device=device)
    except (FileNotFoundError, ArtifactError, ValueError) as e:
        raise CliError(f"--checkpoint {args.checkpoint}: {e}") from None
    return (ckpt.avatars, ckpt.encoder, ckpt.preset.image_width, ckpt.preset.image_height,
            f"checkpoint {args.checkpoint}")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """``fastavatar-nb reconstruct``; returns the exit code."""
    import warnings

    from fastavatar_nb import photo

    log = sys.stderr if args.json else sys.stdout
    src = Path(args.photo)
    out = Path(args.out) if args.out is not None else Path(f"{src.stem}_head")
    try:
        photo.check_output_folder(out, args.overwrite)
    except FileExistsError as e:
        raise CliError(f"--out: {e}") from None
    if args.refine < 0:
        raise CliError(f"--refine must be >= 0 steps, got {args.refine}")
    if args.frames < 1:
        raise CliError(f"--frames must be >= 1, got {args.frames}")
    if args.focal_px is not None and not (args.focal_px > 0 and args.focal_px < float("inf")):
        raise CliError(f"--focal-px must be a positive number of the photo's pixels, got {args.focal_px}")
    t0 = time.perf_counter()
    avatars, encoder, width, height, source = _reconstruct_models(args)
    print(f"models: {source} ({width}x{height}, K={avatars.template.num_gaussians}) "
          f"{time.perf_counter() - t0:6.2f} s", file=log)

    def step(name: str, seconds: float) -> None:
        print(f"{name:>22s}: {seconds:6.2f} s", file=log, flush=True)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recon = photo.reconstruct(src, avatars, encoder, width, height, refine_steps=args.refine,
                                      focal_px=args.focal_px, progress=not args.json, on_step=step)
    except (photo.PhotoError, photo.NoFaceError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    for w in caught:
        if issubclass(w.category, UserWarning) and str(w.message).startswith(recon.photo.name):
            print(f"fastavatar-nb: warning: {w.message}", file=sys.stderr)
    t1 = time.perf_counter()
    paths = photo.save_reconstruction(recon, out, overwrite=args.overwrite, frames=args.frames,
                                      sh_degree=avatars.config.sh_degree, summary={"models": source})
    step("write outputs", time.perf_counter() - t1)
    summary = dict(recon.summary(), models=source, outputs={k: str(v) for k, v in paths.items()},
                   total_s=round(time.perf_counter() - t0, 3))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        cam = recon.pose
        print(f"camera (PnP): yaw {cam.yaw_deg:+.1f} deg, pitch {cam.pitch_deg:+.1f} deg, {cam.distance:.2f} m, "
              f"landmarks reprojected within {cam.reprojection_px:.1f} px (RMS)")
        if summary["camera_refined"] is not None:
            ref = summary["camera_refined"]
            print(f"camera (refined with the head): yaw {ref['yaw_deg']:+.1f} deg, pitch {ref['pitch_deg']:+.1f} deg, "
                  f"{ref['distance_m']:.2f} m; PSNR on the photo {summary['refine_psnr_first']:.2f} -> "
                  f"{summary['refine_psnr_final']:.2f} dB")
        for note in summary["notes"]:
            print(f"note: {note}")
        print(f"wrote {out}/: " + ", ".join(paths) + f" ({summary['total_s']:.1f} s in all)")
        print(f"open {paths['viewer.html']} in a browser, or {paths['head.ply']} in any 3DGS viewer")
    return 0


def _add_preset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=presets.PRESET_NAMES,
        default="auto",
        help="preset to run at: smoke (CPU, minutes), course (CPU, about 80 minutes: the shipped course checkpoint), "
        "full (CUDA), auto = full if CUDA is available else smoke (default)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="parent of the run folder: the run goes to DIR/<preset> "
        "(default: $FASTAVATAR_RUN_DIR if set, else <repository>/runs/<preset>)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="run on the real NeRSemble/VHAP subject folders in DIR instead of synthetic heads (every folder is "
        "checked first; default run folder runs/<preset>-<DIR name>; also $FASTAVATAR_DATA)",
    )
    parser.add_argument("--split", metavar="FILE", default=None,
                        help='with --data: split file {"train": [ids], "val": [ids], "test": [ids]} (default: hash split)')
    parser.add_argument("--labels", metavar="CSV", default=None,
                        help="with --data: attribute labels, a CSV 'subject,<attribute>,...' (notebook 05's edits)")
    parser.add_argument("--timestep", metavar="N", type=int, default=None,
                        help="with --data: the timestep read from every subject (default: the first, 00000)")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="allow --preset full without CUDA (very slow: days on a CPU)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one preset field for this run, a stage's by its dotted name: --set num_subjects=20 "
                        "--set decoder.epochs=4 (repeatable; values read as JSON where they parse; also $FASTAVATAR_SET)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``fastavatar-nb`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fastavatar-nb",
        description="FastAvatar notebooks from the terminal: run them headless and write a run report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="execute the notebooks headless and write a report",
        description="Execute notebooks/NN_name.ipynb in order (fresh kernel each, working directory "
        "notebooks/), write executed copies to <run folder>/executed/, skip notebooks that "
        "already succeeded with the same cells and preset settings, and write <run folder>/report.md.",
    )
    _add_preset_args(run)
    run.add_argument("--only", metavar="SPEC", help="notebook numbers: '02..04', '01,03' or '00,02..04'")
    run.add_argument("--force", action="store_true", help="rerun notebooks that succeeded earlier")
    run.add_argument("--fail-fast", action="store_true", help="stop at the first failing notebook")
    run.add_argument(
        "--timeout", type=_positive_int, default=None, metavar="S", help="seconds allowed per cell (default: none)"
    )
    run.add_argument(
        "--notebooks", metavar="DIR", default=None, help="notebooks folder (default: <repository>/notebooks)"
    )
    run.add_argument("--dry-run", action="store_true", help="list what would run or be skipped, run nothing")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="rewrite report.md/report.html of a run folder",
                         description="Rewrite <run folder>/report.md and report.html from its metrics/, figures/, "
                         "preset.json and run_status.json: the results first, the figures beside their stage, "
                         "the preset and every metric last.")
    _add_preset_args(rep)
    rep.add_argument("--open", action="store_true",
                     help="open report.html in the browser (where there is a display; otherwise print its path)")
    rep.set_defaults(func=cmd_report)
    pre = sub.add_parser("presets", help="describe the presets")
    pre.set_defaults(func=cmd_presets)
    rec = sub.add_parser(
        "reconstruct", help="one photo -> a 3D head (head.ply, turntable.gif, viewer.html)",
        description="Detect the face and its five landmarks, estimate the photo's camera (PnP against the "
        "template), encode the face (FaceNet -> encoder -> decoder) and optionally refine the head on the photo; "
        "write head.ply, turntable.gif, viewer.html, detection.png and summary.json.")
    rec.add_argument("photo", metavar="PHOTO", help="the photo (JPEG, PNG, WebP, ...)")
    rec.add_argument("--refine", type=int, default=0, metavar="N",
                     help="test-time refinement steps on the photo (default 0: the feed-forward head; 50 take about "
                     "10 s on a CPU at the course checkpoint's size)")
    rec.add_argument("--out", metavar="DIR", default=None, help="output folder (default: <photo name>_head)")
    models = rec.add_mutually_exclusive_group()
    models.add_argument("--run", metavar="DIR", default=None,
                        help="use the decoder and encoder of this run folder (e.g. runs/full)")
    models.add_argument("--checkpoint", metavar="NAME", default="course",
                        help="use a shipped checkpoint (default: course)")
    rec.add_argument("--focal-px", type=float, default=None, metavar="F",
                     help="the photo's focal length in its pixels (default: from EXIF, else the rig's framing)")
    rec.add_argument("--frames", type=int, default=36, metavar="N", help="turntable frames (default 36)")
    rec.add_argument("--json", action="store_true", help="print a machine-readable summary to stdout")
    rec.add_argument("--overwrite", action="store_true", help="replace the files of an earlier reconstruction")
    rec.set_defaults(func=cmd_reconstruct)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastavatar-nb`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as err:
        print(f"fastavatar-nb: error: {err}", file=sys.stderr)
        return 2
    except report.MetricsError as err:
        print(f"fastavatar-nb: error: {err}; fix or delete that file, then `fastavatar-nb report`", file=sys.stderr)
        return 2
    except OSError as err:  # a file that vanished or filled the disk mid-run: name it, no traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"fastavatar-nb: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfastavatar-nb: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
