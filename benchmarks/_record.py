"""Provenance for benchmark results: every JSON under ``benchmarks/results/`` says where,
when and from which commit and command it was measured, so the next person can trust or redo it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=RESULTS.parent.parent).stdout.strip()  # the repository root
    except (OSError, subprocess.CalledProcessError):
        return ""


def provenance(benchmark: str, device: torch.device, gsplat: str) -> dict[str, Any]:
    """Device, thread count, torch version, commit (and whether the library had uncommitted
    changes), the command line, gsplat's status and the date."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "benchmark": benchmark, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": name,
        "device_type": device.type, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "uncommitted_library_changes": bool(_git("status", "--porcelain", "--", "fastavatar_nb")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "gsplat": gsplat,
    }


def save(record: dict[str, Any], out: Path) -> Path:
    """Write ``record`` as indented JSON to ``out`` (folders created) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return out
