"""The README's table of measured times, generated from the benchmark results (one row per measurement).

Each row comes from one JSON file under ``benchmarks/results/`` (written by a ``benchmarks/*.py``
script with its device, commit and command); nothing is typed by hand, and a new measurement replaces
the old row instead of joining a history. The table sits in README.md between the markers
``<!-- timings:begin -->`` and ``<!-- timings:end -->``.

    python scripts/timing_table.py            # print the table
    python scripts/timing_table.py --write    # put it into README.md
    python scripts/timing_table.py --check    # exit 1 if README.md's table is not the generated one (make test)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- timings:begin -->", "<!-- timings:end -->"

Row = tuple[str, str]


def _ms(v: float) -> str:
    return f"{v:,.0f} ms" if v >= 100 else f"{v:.1f} ms"


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def make_rows(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    by_target: dict[str, dict[str, dict]] = {}
    for r in d["rows"]:
        by_target.setdefault(r["target"], {})[r["commit"][:7]] = r
    names = {"run": "`make run` at smoke on a fresh clone (every notebook)",
             "test": "`CI=true bash .ci/run` on a fresh clone (unit tests, every notebook, browser checks)"}
    for target, runs in by_target.items():
        parts = []
        for commit, r in runs.items():
            ok = "ok" if r["exit_code"] == 0 else f"exit {r['exit_code']}"
            summary = f", {r['pytest_summary']}" if r.get("pytest_summary") else ""
            note = f"; {r['note']}" if r.get("note") else ""
            parts.append(f"{_minutes(r['seconds'])} at {commit} ({ok}{summary}{note})")
        if len(runs) == 2:
            first, second = list(runs.values())
            parts.append(f"**{first['seconds'] / second['seconds']:.1f}x**")
        rows.append((names.get(target, target), "; ".join(parts)))
    return rows


def render_rows(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in d["rows"]:
        if r.get("tile_size") not in (None,):
            continue
        groups.setdefault((r["scene"], r["K"], r["width"], r["height"], r["images"]), {})[r["backend"]] = r
    for (scene, K, W, H, n), by in groups.items():
        what = (f"render {'the course heads' if scene == 'course' else 'the benchmark head'}, K = {K:,}, {W}x{H}, "
                f"{n} image{'s' if n > 1 else ''}: forward / forward+backward")
        parts = [f"{b} {_ms(r['forward_ms'])} / {_ms(r['forward_backward_ms'])}" for b, r in by.items()]
        for b, r in by.items():
            if b != "torch":
                parts.append(f"**{b} {r['speedup_forward']:.1f}x / {r['speedup_forward_backward']:.1f}x** faster")
        first = next(iter(by.values()))
        parts.append(f"floor {first['floor_forward_ms']:.2g} / {first['floor_forward_backward_ms']:.2g} ms")
        rows.append((what, "; ".join(parts)))
    return rows


def decoder_rows(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    preset = d.get("preset", {}).get("name", "?")
    for r in d["rows"]:
        what = (f"decoder training step at {preset} ({r['subjects_per_step']} subjects x {r['views_per_step']} views, "
                f"K = {r['K']:,}, {r['width']}x{r['height']}), {r.get('backend', 'torch')} renderer, "
                f"{r.get('mlp_dtype', 'float32')} MLP")
        value = f"{_ms(r['train_step_s'] * 1e3)}"
        if "train_step_mlp_s" in r:
            value += (f" (MLP forward+backward {_ms(r['train_step_mlp_s'] * 1e3)}, renders + loss "
                      f"{_ms(r['train_step_render_loss_s'] * 1e3)}); one decode {_ms(r['decode_s'] * 1e3)}")
        rows.append((what, value))
    return rows


def decoder_dtype_rows(d: dict[str, Any]) -> list[Row]:
    preset = d.get("preset", {}).get("name", "?")
    s, seeds = d["summary"], sorted({r["seed"] for r in d["rows"]})
    f32, b16 = s["float32"], s["bfloat16"]
    value = (f"float32 {f32['seconds']:.0f} s, {f32['train_psnr']:.2f} / {f32['heldout_psnr']:.2f} dB; bfloat16 "
             f"{b16['seconds']:.0f} s, {b16['train_psnr']:.2f} / {b16['heldout_psnr']:.2f} dB: **"
             f"{f32['seconds'] / b16['seconds']:.1f}x faster, {b16['train_psnr'] - f32['train_psnr']:+.2f} / "
             f"{b16['heldout_psnr'] - f32['heldout_psnr']:+.2f} dB**")
    if "seed_spread_train_psnr_float32" in s:
        value += f"; float32's spread between seeds {s['seed_spread_train_psnr_float32']:.2f} dB"
    return [(f"decoder training at {preset}, float32 against bfloat16 MLP (mean of seeds {seeds}): seconds, decoded "
             "training subjects' PSNR on their training views / camera 8", value)]


def numba_vs_c_rows(d: dict[str, Any]) -> list[Row]:
    cases = ", ".join(f"{r['width']}x{r['height']} x{r['images']} {r['numba_over_c']:.2f}" for r in d["rows"])
    return [("numba's blend kernel against the same loop in C (gcc -O3 -march=native), one thread: time ratio",
             cases)]


def fit_rows(d: dict[str, Any]) -> list[Row]:
    by: dict[str, list[str]] = {}
    for r in d["rows"]:
        by.setdefault(r["backend"], []).append(f"batch {r['batch_size']}: {r['subject_iterations_per_s']:.0f}")
    return [(f"fitting throughput at smoke size ({backend} renderer), subject-steps/s", ", ".join(parts))
            for backend, parts in by.items()]


SOURCES: list[tuple[str, Callable[[dict], list[Row]]]] = [
    ("cpu-2core/make_timings.json", make_rows),
    ("cpu-2core/render_cpu.json", render_rows),
    ("cpu-2core/decoder_course_cpu.json", decoder_rows),
    ("cpu-2core/decoder_smoke_cpu.json", decoder_rows),
    ("cpu-2core/decoder_dtype_smoke.json", decoder_dtype_rows),
    ("cpu-2core/numba_vs_c.json", numba_vs_c_rows),
    ("cpu-2core/fit_cpu.json", fit_rows),
]
"""(results file, its rows); a file that is absent is left out."""


def table(results: Path | None = None) -> str:
    results = results or RESULTS
    lines = ["| what | measured | source |", "|---|---|---|"]
    for rel, rows_of in SOURCES:
        path = results / rel
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        source = f"`benchmarks/results/{rel}` ({d.get('date', '?')[:10]}, {d.get('commit', '?')[:7]})"
        for what, value in rows_of(d):
            lines.append(f"| {what} | {value} | {source} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"timing_table: {README} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the table into README.md")
    mode.add_argument("--check", action="store_true", help="fail if README.md's table differs from the generated one")
    args = ap.parse_args(argv)
    block = table()
    if args.write:
        README.write_text(replace_block(README.read_text(), block))
        print(f"timing_table: wrote {block.count(chr(10)) - 2} rows into {README}")
    elif args.check:
        text = README.read_text()
        if replace_block(text, block) != text:
            print("timing_table: README.md's timing table is not the one generated from benchmarks/results/; "
                  "run `python scripts/timing_table.py --write`", file=sys.stderr)
            return 1
        print("timing_table: README.md's timing table matches benchmarks/results/")
    else:
        print(block, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
