"""loop: what every training loop shares (steps, learning-rate decay, checkpoint cadence, callback, timing) and
the one optimiser-state format of the checkpoints."""

from __future__ import annotations

import time

import pytest
import torch

from fastavatar_nb.loop import StepLoop, load_optimizer_tensors, optimizer_tensors


def _adam(seed: int = 0) -> tuple[torch.optim.Adam, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, generator=g, requires_grad=True), torch.randn(2, 2, generator=g, requires_grad=True)
    opt = torch.optim.Adam([{"params": [a], "lr": 0.1, "name": "a"}, {"params": [b], "lr": 0.01, "name": "b.c"}])
    return opt, [a, b]


def _step(opt: torch.optim.Adam, params: list[torch.Tensor]) -> None:
    opt.zero_grad()
    (params[0].pow(2).sum() + params[1].sin().sum()).backward()
    opt.step()


def test_steps_decay_the_rates_exponentially_and_the_cadence_is_every_n_and_the_last():
    opt, _ = _adam()
    seen = []
    with StepLoop(5, desc="t", progress=False) as loop:
        for step in loop.steps(2, 5, decay=(opt, [0.1, 0.01], 0.25)):
            seen.append((step, opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
    assert [s for s, _, _ in seen] == [2, 3, 4]
    for step, lr_a, lr_b in seen:  # lr * final ** (step / (stop - 1)): from the base at 0 to final x base at 4
        assert lr_a == pytest.approx(0.1 * 0.25 ** (step / 4)) and lr_b == pytest.approx(0.01 * 0.25 ** (step / 4))
    assert seen[-1][1] == pytest.approx(0.025)
    assert [n for n in range(1, 11) if StepLoop.due(n, 4, 10)] == [4, 8, 10]
    assert [n for n in range(1, 6) if StepLoop.due(n, 0, 5)] == [5]


def test_record_calls_back_with_the_record_and_leaves_the_callbacks_time_out():
    got = []

    def slow(info):
        got.append(info)
        time.sleep(0.05)

    with StepLoop(3, desc="t", progress=False, seconds=10.0, callback=slow) as loop:
        for step in loop.steps(0, 3):
            loop.record({"step": step + 1, "steps": 3, "loss": 0.5}, loss=0.5)
    assert [g["step"] for g in got] == [1, 2, 3] and all(g["steps"] == 3 for g in got)
    assert 10.0 <= loop.seconds < 10.05  # three sleeps of 0.05 s are the callback's, not training's
    with StepLoop(1, desc="t", progress=False) as quiet:
        quiet.record(None, loss=1.0)  # no callback, no record: only the bar moves


def test_optimizer_state_round_trips_and_the_next_step_is_the_same():
    opt, params = _adam()
    for _ in range(3):
        _step(opt, params)
    saved = optimizer_tensors(opt)
    assert sorted(saved) == sorted(f"opt.{g}.0.{f}" for g in ("a", "b.c") for f in ("step", "exp_avg", "exp_avg_sq"))
    assert saved["opt.a.0.step"].tolist() == [3.0]
    opt2, params2 = _adam()
    with torch.no_grad():
        for p, q in zip(params2, params, strict=True):
            p.copy_(q)
    load_optimizer_tensors(opt2, {k: v.clone() for k, v in saved.items()})
    _step(opt, params)
    _step(opt2, params2)
    for p, q in zip(params, params2, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    unnamed = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="every parameter group needs a 'name'"):
        optimizer_tensors(unnamed)


def test_a_checkpoint_of_the_earlier_optimizer_format_is_refused_by_name(tmp_path):
    """Checkpoints before the one optimiser-state format (v3) cannot be resumed; the message names the format and
    the way out instead of failing on a missing tensor."""
    from fastavatar_nb._io import CheckpointError, save_checkpoint
    from fastavatar_nb.decoder import CHECKPOINT_FILE, checkpoint_state

    save_checkpoint(tmp_path / CHECKPOINT_FILE, "fastavatar-nb decoder checkpoint v3", {"step": 1}, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not a fastavatar-nb decoder checkpoint v4 file \(format "
                                              r"'fastavatar-nb decoder checkpoint v3'\).*overwrite=True"):
        checkpoint_state(tmp_path)
