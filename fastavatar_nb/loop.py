"""What every training loop of the package shares, around its own step.

Each stage writes its step as a pure function (``fitting.fit_loss``, ``decoder.decoder_loss``,
``encoder.encoder_batch_loss``, ``refine.refine_loss``) and runs it in a loop of this shape::

    with StepLoop(total, desc="training the decoder", done=step0, seconds=seconds0,
                  progress=progress, callback=callback) as loop:
        for step in loop.steps(step0, total, decay=(opt, base_lrs, config.lr_final)):
            ...                                  # the stage's step: its loss, backward, optimiser
            if loop.due(step + 1, config.checkpoint_every, total):
                save_checkpoint(...)             # one optimiser-state format: optimizer_tensors
            loop.record({"step": step + 1, "steps": total, "loss": ...}, loss=..., psnr=...)

:class:`StepLoop` owns the progress bar (over every step of the run, resumed ones included), the
exponential decay of the learning rates, the checkpoint cadence, the callback and the seconds spent
(the callback's own time left out, so live figures do not count as training). Every callback record
carries ``step`` (steps done) and ``steps`` (of how many), then the stage's own values (documented by each
stage, e.g. :class:`~fastavatar_nb.decoder.DecoderStepInfo`).

A checkpoint stores an optimiser's state as ``opt.<group name>.<index in group>.<step | exp_avg | exp_avg_sq>``
(:func:`optimizer_tensors`, read back by :func:`load_optimizer_tensors`): every parameter group of a training
loop is named.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepLoop", "decay_lrs", "optimizer_tensors", "load_optimizer_tensors", "OPTIMIZER_FIELDS"]

OPTIMIZER_FIELDS = ("step", "exp_avg", "exp_avg_sq")
"""What a checkpoint keeps of each parameter's Adam state."""


class StepLoop:
    """The progress bar, learning-rate decay, checkpoint cadence, callback and timing of one training loop.

    Args:
        total: every step of the run (what the bar counts to).
        desc: the bar's label. done: steps already taken (a resumed run). seconds: seconds already spent.
        progress: show the bar. callback: called by :meth:`record` with each step's record.
    """

    def __init__(self, total: int, *, desc: str, done: int = 0, seconds: float = 0.0, progress: bool = True,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        from ._live import progress_bar

        self.total, self.callback = int(total), callback
        # few redraws: a notebook's output channel keeps ~1,000 messages
        self._bar = progress_bar(total=self.total, initial=done, desc=desc, disable=not progress, unit="step",
                                 mininterval=0.5)
        self._seconds0, self._t0, self._in_callback = float(seconds), time.perf_counter(), 0.0

    def __enter__(self) -> StepLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar (the ``with`` block does)."""
        self._bar.close()

    @property
    def seconds(self) -> float:
        """Seconds of training: those given (a resumed run's) plus this loop's, the callback's time left out."""
        return self._seconds0 + time.perf_counter() - self._t0 - self._in_callback

    def steps(self, start: int, stop: int,
              decay: tuple[torch.optim.Optimizer, Sequence[float], float] | None = None) -> Iterator[int]:
        """The steps ``start .. stop - 1``. With ``decay = (optimizer, base_lrs, final)`` each group's learning
        rate is set before the step to ``base_lr * final ** (step / (stop - 1))``: an exponential decay from the
        base rates to ``final`` times them at the last step."""
        for step in range(start, stop):
            if decay is not None:
                decay_lrs(*decay, step, stop)
            yield step

    @staticmethod
    def due(done: int, every: int, last: int) -> bool:
        """Whether a checkpoint is due after ``done`` steps: every ``every`` steps (0: never) and after the last."""
        return done == last or (every > 0 and done % every == 0)

    def record(self, info: Mapping[str, Any] | None = None, **postfix: float) -> None:
        """One step taken: advance the bar (``postfix``: the values it shows) and call the callback with ``info``."""
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}" for k, v in postfix.items()},
                                  refresh=False)
        if self.callback is not None and info is not None:
            t = time.perf_counter()
            self.callback(dict(info))
            self._in_callback += time.perf_counter() - t


def decay_lrs(opt: torch.optim.Optimizer, base_lrs: Sequence[float], final: float, step: int, total: int) -> None:
    """Set each group's learning rate for ``step`` of ``total``: ``base_lr * final ** (step / (total - 1))``, an
    exponential decay from the base rates to ``final`` times them at the last step."""
    for group, lr in zip(opt.param_groups, base_lrs, strict=True):
        group["lr"] = lr * final ** (step / max(1, total - 1))


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """An Adam optimiser's state as checkpoint tensors: ``opt.<group name>.<index>.<field>`` for every parameter
    that has a state (its groups must carry a ``"name"``)."""
    out: dict[str, Tensor] = {}
    for group in opt.param_groups:
        name = _group_name(group)
        for i, p in enumerate(group["params"]):
            st = opt.state.get(p)
            if st:
                for field in OPTIMIZER_FIELDS:
                    v = st[field]
                    out[f"opt.{name}.{i}.{field}"] = torch.as_tensor(v).reshape(1) if field == "step" else v
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    """Give ``opt`` the state :func:`optimizer_tensors` stored (parameters without one start afresh); the
    moments go to each parameter's device, the step count stays a CPU scalar as Adam keeps it."""
    for group in opt.param_groups:
        name = _group_name(group)
        for i, p in enumerate(group["params"]):
            key = f"opt.{name}.{i}"
            if f"{key}.step" in tensors:
                opt.state[p] = {"step": tensors[f"{key}.step"].reshape(()).to("cpu", torch.float32).clone(),
                                "exp_avg": tensors[f"{key}.exp_avg"].to(p.device).clone(),
                                "exp_avg_sq": tensors[f"{key}.exp_avg_sq"].to(p.device).clone()}


def _group_name(group: Mapping[str, Any]) -> str:
    name = group.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("optimizer_tensors: every parameter group needs a 'name' (the checkpoint's keys use it)")
    return name
