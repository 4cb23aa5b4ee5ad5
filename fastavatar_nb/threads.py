"""How many CPU threads torch should use on a machine that other jobs may share.

torch's CPU kernels split their work over ``torch.get_num_threads()`` threads and wait for the
slowest one. When another job keeps one of two cores busy, one of our two threads keeps being
descheduled and every step waits for it: notebook 02 took 101 s on an idle 2-core machine and
1,228 s beside a one-thread job with two threads, against about 200 s with one thread. So before
a notebook or a run starts, :func:`configure_threads` looks at how busy the cores are now and
gives torch only the free ones (at least one), and says so.

An explicit choice always wins: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment, or
``FASTAVATAR_THREADS`` (a number, or ``auto``).
"""

from __future__ import annotations

import logging
import math
import os

import torch

__all__ = ["THREADS_ENV", "BUSY_SAMPLE_S", "available_cores", "free_cores", "configure_threads"]

THREADS_ENV = "FASTAVATAR_THREADS"
"""Environment variable: torch's thread count (a positive int), or ``auto`` (the default: free cores)."""

BUSY_SAMPLE_S = 0.3
"""Seconds over which the cores' use by other processes is measured."""

_log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """``(busy, total)`` jiffies of all cores from ``/proc/stat``, or None where it is absent."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def free_cores(sample_s: float = BUSY_SAMPLE_S) -> float | None:
    """Cores not used by any process during the next ``sample_s`` seconds (this one sleeps then).

    Returns None where the machine's CPU times cannot be read (not Linux).
    """
    import time

    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    busy = (second[0] - first[0]) / (second[1] - first[1])   # fraction of all the machine's cores
    cores = os.cpu_count() or 1
    return max(0.0, (1.0 - busy) * cores)


def configure_threads(sample_s: float = BUSY_SAMPLE_S) -> str:
    """Set torch's intra-op thread count for this process; returns a line saying what and why.

    - ``FASTAVATAR_THREADS=N``: N threads. ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set: left as
      torch read them.
    - Otherwise (``auto``): the cores this process may use that are free now (at least 1), and a
      warning when other jobs keep some of them busy.

    Raises:
        ValueError: ``FASTAVATAR_THREADS`` is neither ``auto`` nor a positive int.
    """
    cores = available_cores()
    choice = os.environ.get(THREADS_ENV, "auto").strip().lower() or "auto"
    if choice != "auto":
        try:
            n = int(choice)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV} must be 'auto' or a positive number of threads, got {choice!r}")
        torch.set_num_threads(n)
        return f"threads: {n} ({THREADS_ENV}={choice}; {cores} cores available)"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").strip():
            return f"threads: {torch.get_num_threads()} ({var}={os.environ[var].strip()}; {cores} cores available)"
    free = free_cores(sample_s)
    if free is None:
        torch.set_num_threads(cores)
        return f"threads: {cores} (all available cores)"
    n = max(1, min(cores, math.floor(free + 0.5)))
    torch.set_num_threads(n)
    if n < cores:
        msg = (f"the machine is busy: other jobs use about {cores - free:.1f} of its {cores} cores, so torch "
               f"uses {n} thread{'s' if n > 1 else ''} (two jobs on the same cores slow each other down up to "
               f"tenfold). Stop the other jobs for full speed, or set {THREADS_ENV}=N to choose.")
        _log.warning(msg)
        return f"threads: {n} of {cores} ({msg})"
    return f"threads: {n} (all {cores} cores are free)"
