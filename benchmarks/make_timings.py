"""The two commands' wall times on fresh clones, commits side by side: ``make run`` and ``make test``.

For each commit (default: ``HEAD``; ``--baseline REV`` adds an earlier one, measured first) this clones
the repository afresh into ``--workdir``, checks the commit out, and times each target from start to
end, one after the other, nothing else running:

- ``run``: ``make run PRESET=smoke`` (every notebook at smoke into the clone's ``runs/smoke``);
- ``test``: ``CI=true bash .ci/run`` (what CI runs: unit tests, every notebook, browser checks).

``make venv`` runs first, untimed; ``--venv PATH`` reuses one virtual environment for every clone (linked
as the clone's ``.venv``; ``make venv`` then only re-installs the clone itself, every time: its stamp is
removed first, so the editable install always points at the clone being timed). The numba kernels' on-disk cache lives in each clone, so every clone compiles them once, as CI
does.

    python benchmarks/make_timings.py --baseline effaf89 --venv .venv --targets run
    python benchmarks/make_timings.py --targets test --out benchmarks/results/cpu-2core/make_test.json

Writes JSON (device, commits, commands, seconds, exit codes, pytest's summary line) and a table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from _record import RESULTS, provenance, save

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
"""The project's shared folder (real subjects, the paper), linked beside every clone as CI has it."""
TARGETS = {"run": ["make", "run", "PRESET=smoke"], "test": ["bash", ".ci/run"]}
SUMMARY = re.compile(r"^=+ (.*(passed|failed).*) =+$", re.M)


def clone(rev: str, folder: Path, venv: Path | None) -> str:
    """A fresh clone of this repository at ``rev`` in ``folder``; returns the full commit hash."""
    subprocess.run(["git", "clone", "--quiet", "--no-local", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "-C", str(folder), "checkout", "--quiet", rev], check=True)
    if venv is not None:
        (folder / ".venv").symlink_to(venv.resolve())
        # the shared venv's editable install must point at this clone: drop make venv's stamp so that it
        # installs the clone again (untimed; a matching stamp would leave the previous clone's package in place)
        for stamp in venv.glob(".fastavatar-nb-installed-*"):
            stamp.unlink()
    return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def time_target(folder: Path, target: str, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTAVATAR_", "GOMP_", "OMP_", "KMP_"))}
    if target == "test":
        env["CI"] = "true"
    with open(log, "w") as f:  # the venv first, untimed: the times are of the work, not of pip
        subprocess.run(["make", "venv"], cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(TARGETS[target], cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    found = SUMMARY.findall(text)
    return {"target": target, "command": " ".join(TARGETS[target]), "seconds": round(seconds, 1), "exit_code": rc,
            "pytest_summary": found[-1][0] if found else None, "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="HEAD", help="the commit to measure (default HEAD)")
    ap.add_argument("--baseline", default=None, help="an earlier commit measured first, the same way")
    ap.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["run", "test"])
    ap.add_argument("--venv", type=Path, default=None, help="reuse this venv in every clone")
    ap.add_argument("--workdir", type=Path, default=None, help="where the clones go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu-2core" / "make_timings.json")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fastavatar-timings-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for rev in [r for r in (args.baseline, args.commit) if r]:
        for target in args.targets:
            # <work>/<rev>-<target>/main beside a link to this checkout's ../shared, as CI sees it: the tests
            # that use the shared real subjects (the real-data notebooks, about 5 minutes) then run, not skip
            root = work / f"{rev.replace('/', '_')}-{target}"
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            if SHARED.is_dir():
                (root / "shared").symlink_to(SHARED.resolve())
            folder = root / "main"
            commit = clone(rev, folder, args.venv)
            row = {"rev": rev, "commit": commit, **time_target(folder, target, work / f"{root.name}.log")}
            rows.append(row)
            print(f"{rev:>10} {commit[:7]} {target:4s}: {row['seconds'] / 60:5.1f} min, exit {row['exit_code']}"
                  f"{'  (' + row['pytest_summary'] + ')' if row['pytest_summary'] else ''}", flush=True)
    for target in args.targets:
        times = {r["rev"]: r["seconds"] for r in rows if r["target"] == target}
        if args.baseline and len(times) == 2:
            print(f"{target}: {times[args.baseline] / times[args.commit]:.2f}x faster than {args.baseline}")
    record = {**provenance("make_timings", torch.device("cpu"), "n/a"), "venv_reused": args.venv is not None,
              "rows": rows}
    save(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
