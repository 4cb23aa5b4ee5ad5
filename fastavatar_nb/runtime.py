"""What a notebook or script does once, at its start: torch's threads, the seeds, the run folder, and a line
of the environment's versions (:func:`setup`).

Kept apart from :mod:`fastavatar_nb.presets`, which only describes runs: building or reading a preset changes
nothing on the machine, and :func:`setup` is the one place that does.
"""

from __future__ import annotations

import platform
import random
from importlib import metadata

import numpy as np
import torch

from .presets import Preset

__all__ = ["setup", "package_version"]


def package_version(dist: str) -> str:
    """The installed version of the distribution ``dist`` (e.g. ``"gsplat"``), or ``"not installed"``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def setup(preset: Preset, *, save: bool = True) -> str:
    """Set torch's threads, seed torch, numpy and random with ``preset.seed``, create the run folder,
    report the environment.

    Threads: :func:`fastavatar_nb.threads.configure_threads` (the cores free now; a warning when
    other jobs keep some busy).

    Args:
        preset: the preset of this notebook or script.
        save: also write the preset to ``preset.run_dir / "preset.json"`` (the run report reads it).

    Returns:
        A few lines to print in the setup cell: versions of Python, torch, numpy, gsplat and
        fastavatar-nb, the device (with the GPU's name on CUDA), the backend, the threads and the preset.
    """
    from .threads import configure_threads

    threads = configure_threads()  # the free cores only: a busy machine slows two-thread torch tenfold
    random.seed(preset.seed)
    np.random.seed(preset.seed)
    torch.manual_seed(preset.seed)  # seeds every CUDA device too
    preset.run_dir.mkdir(parents=True, exist_ok=True)
    if save:
        preset.save()
    device = preset.device
    if preset.device == "cuda" and torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    backend = preset.backend
    if backend == "auto":
        from .render import resolve_backend

        backend = f"auto -> {resolve_backend('auto', preset.torch_device)}"
    return "\n".join(
        [
            f"python {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__} | "
            f"gsplat {package_version('gsplat')} | fastavatar-nb {package_version('fastavatar-nb')}",
            f"device {device} | backend {backend} | seed {preset.seed} | {threads}",
            f"preset {preset.describe()}",
            preset.describe_data(),
        ]
    )
