"""How long torch's OpenMP threads spin after each parallel region, set before torch is loaded.

After every parallel region, a GNU OpenMP worker (torch's CPU thread pool on Linux) busy-waits for
the next one: ``GOMP_SPINCOUNT`` loops, 300,000 by default, several milliseconds of a core. That is
harmless while torch does all the work, but the compiled CPU renderer
(:mod:`fastavatar_nb.render.numba_rasterizer`) runs its kernels on threads of its own between torch's
operations, and a spinning torch worker then takes one of their cores: on a 2-core machine its
forward pass became 2-20x slower, at random. With a short spin (1,000 loops; ``KMP_BLOCKTIME`` = 1 ms
for LLVM/Intel OpenMP) torch's own times did not change measurably (``benchmarks/render.py``, the
decoder's MLP) and the kernels keep both cores.

OpenMP reads these variables once, when torch loads it, so :func:`limit_spin` must run before
``import torch``: ``import fastavatar_nb`` does it first thing, and the processes that the package
starts (notebook kernels, ``torchrun`` workers) inherit it. A value set by the user always wins.
Where torch was imported first with the default spin, :func:`spin_limited` is False and the compiled
renderer runs on one thread (still several times faster than the torch backend) and says how to
get both cores once.
"""

from __future__ import annotations

import os
import sys

__all__ = ["SPIN_ENV", "limit_spin", "spin_limited"]

SPIN_ENV = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}
"""The variables and values set when absent: GNU OpenMP's spin loop count, LLVM/Intel OpenMP's spin time (ms)."""
_USER_SET = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
_LIMITED: bool | None = None


def limit_spin() -> bool:
    """Set :data:`SPIN_ENV` where absent, before torch loads OpenMP; return :func:`spin_limited`."""
    global _LIMITED
    if _LIMITED is None:
        user = any(k in os.environ for k in _USER_SET)
        _LIMITED = user or "torch" not in sys.modules
        for key, value in SPIN_ENV.items():
            os.environ.setdefault(key, value)
    return _LIMITED


def spin_limited() -> bool:
    """Whether torch's OpenMP threads stop spinning quickly in this process (see the module's text)."""
    return limit_spin()
