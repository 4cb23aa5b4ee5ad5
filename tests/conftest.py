"""Shared pytest fixtures: seeds, the test device, the shared data folder, and the ``gpu`` marker.

- Every test starts from ``random``, ``numpy`` and ``torch`` seeded with 0 (autouse fixture).
- ``device``: ``torch.device("cpu")`` by default; ``pytest --device cuda`` (or the environment
  variable ``FASTAVATAR_TEST_DEVICE=cuda``) asks for CUDA, and tests using the fixture are
  skipped when CUDA is not available.
- ``shared_dir``: the project's shared folder beside the repository (``<repo>/../shared``),
  skipping the test when it is absent.
- Tests marked ``@pytest.mark.gpu`` are skipped when ``torch.cuda.is_available()`` is False.
"""

from __future__ import annotations

import os
import random
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
"""``<repository>/../shared``: data and docs shared by the project (may be absent)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default=os.environ.get("FASTAVATAR_TEST_DEVICE", "cpu"),
        help="device for tests using the `device` fixture (default: $FASTAVATAR_TEST_DEVICE or cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


NOTEBOOKS_GROUP = "notebooks"
"""The worker group of every notebook cell: one worker runs the notebooks in order (they share a run folder)."""
LONG_FIRST = ("tests/test_notebooks_real_data.py",)
"""Single long tests started right after the notebooks (on the other worker under ``make test``'s ``-n 2``)."""


def worker_group(nodeid: str) -> str:
    """The unit of work one pytest-xdist worker runs whole (``make test`` runs ``pytest -n 2``).

    Every notebook cell is in :data:`NOTEBOOKS_GROUP`: nbval runs a notebook's cells in one kernel, in
    order, and the notebooks build on each other's artifacts in one run folder, so one worker runs them
    all, one after another. The browser tests share one group (each starts JupyterLab and Chromium: two
    at once only compete for the cores). Every other test module is a group of its own, so module-scoped
    fixtures (a tiny trained run, a dataset) are made once."""
    path = nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        return NOTEBOOKS_GROUP
    if path.startswith("tests/browser/"):
        return "browser"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist (``-n N``) hands out :func:`worker_group` units, in the order collected.

    xdist's own ``--dist loadgroup`` cannot be used: it renames the tests with a private attribute that
    pytest 9 no longer reads, so a notebook's cells would be spread over workers."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkerGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order: longest units first
    return WorkerGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA; put the longest units of work first.

    Order: the notebooks, then :data:`LONG_FIRST`, then the rest as collected. With two workers the two
    longest units then start at once, one on each worker, and the short tests fill in behind them
    (:func:`pytest_xdist_make_scheduler`). In one process the order changes nothing else."""
    rank = {NOTEBOOKS_GROUP: 0, **{p: 1 for p in LONG_FIRST}}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid), 2))  # stable: collected order within a rank
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Each test leaves torch's thread count as it found it (``runtime.setup`` sets it to the free cores)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device tests run on: cpu unless cuda was requested (and is available)."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda was requested but CUDA is not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repository>/../shared``; skips the test when the folder is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared folder {SHARED_DIR} is absent")
    return SHARED_DIR


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored afterwards), for bitwise comparisons: with
    several threads the BLAS may pick its thread count by the machine's load (MKL's dynamic
    threads), which splits reductions differently and changes the last bits between two runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PeakTracker(TorchDispatchMode):
    """Peak live bytes of the tensor storages created by torch ops inside the mode."""

    def __init__(self):
        super().__init__()
        self.live, self.cur, self.peak = {}, 0, 0

    def _free(self, key):
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = (st.data_ptr(), id(st))
                if st.nbytes() and key not in self.live:
                    self.live[key] = st.nbytes()
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(st, self._free, key)
        return out


@pytest.fixture
def peak_tracker() -> type[PeakTracker]:
    """:class:`PeakTracker` (a fixture, so test modules need not import this conftest by name: the browser
    tests' folder has a conftest of its own)."""
    return PeakTracker
