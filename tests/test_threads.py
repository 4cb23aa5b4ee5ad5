"""torch's thread count follows the free cores; an explicit choice wins; bad values are named."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from fastavatar_nb import threads


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.THREADS_ENV):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(before)


def _machine(monkeypatch, cores: int, busy_fraction: float) -> None:
    """A machine of ``cores`` cores on which other jobs keep ``busy_fraction`` of them busy."""
    samples = iter([(0.0, 0.0), (busy_fraction * 1000.0, 1000.0)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)


def test_free_cores_of_a_busy_and_an_idle_machine(monkeypatch, caplog):
    _machine(monkeypatch, 2, 0.5)   # one of two cores busy: one thread, and a warning that says why
    with caplog.at_level(logging.WARNING, logger="fastavatar_nb.threads"):
        line = threads.configure_threads(sample_s=0.0)
    assert torch.get_num_threads() == 1
    assert line.startswith("threads: 1 of 2") and "other jobs use about 1.0 of its 2 cores" in line
    assert "FASTAVATAR_THREADS" in caplog.text
    _machine(monkeypatch, 8, 0.30)  # 2.4 of 8 busy: 5.6 free -> 6 threads
    assert threads.configure_threads(sample_s=0.0).startswith("threads: 6 of 8")
    assert torch.get_num_threads() == 6
    _machine(monkeypatch, 2, 0.02)  # idle: every core, no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastavatar_nb.threads"):
        assert threads.configure_threads(sample_s=0.0) == "threads: 2 (all 2 cores are free)"
    assert torch.get_num_threads() == 2 and not caplog.text
    _machine(monkeypatch, 2, 1.0)   # every core busy: still one thread
    threads.configure_threads(sample_s=0.0)
    assert torch.get_num_threads() == 1


def test_an_explicit_choice_wins(monkeypatch):
    monkeypatch.setattr(threads, "_cpu_times", lambda: pytest.fail("an explicit choice measures nothing"))
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    assert threads.configure_threads().startswith("threads: 1 (FASTAVATAR_THREADS=1")
    assert torch.get_num_threads() == 1
    monkeypatch.delenv(threads.THREADS_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)   # as torch read it: left alone
    assert "OMP_NUM_THREADS=1" in threads.configure_threads()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_bad_thread_counts_are_named(monkeypatch, value):
    monkeypatch.setenv(threads.THREADS_ENV, value)
    with pytest.raises(ValueError, match=f"FASTAVATAR_THREADS must be 'auto' or a positive number.*{value!r}"):
        threads.configure_threads()


def test_free_cores_reads_this_machine():
    free = threads.free_cores(sample_s=0.05)
    if free is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= free <= (os.cpu_count() or 1) + 1e-9
