"""How a training loop talks to its peers: :class:`LocalComm` in one process, :class:`ProcessGroupComm`
across the ranks of a ``torch.distributed`` process group (``torchrun``, :mod:`fastavatar_nb.distributed`).

A loop (:func:`~fastavatar_nb.decoder.train_decoder`) is written once, for any number of ranks: it
takes its part of a step's items (:meth:`part`), normalises its loss by the *global* batch, sums
the gradients (:meth:`sum_grads_`) and a few statistics (:meth:`sum_stats`) over the ranks, and
gathers the rows of a result each rank scored (:meth:`gather_rows_`). In one process every one of
these is the identity, so the same lines give the single-process numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "LocalComm", "ProcessGroupComm", "make_comm"]


class LocalComm:
    """One process: rank 0 of 1; every item is this rank's, and every sum is the value itself."""

    rank: int = 0
    world_size: int = 1

    def part(self, items: Sequence[Any]) -> list[Any]:
        """This rank's part of ``items``: all of them."""
        return list(items)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sums over one rank: nothing changes."""

    def sum_grads_(self, params: Sequence[Tensor]) -> None:
        """Sums over one rank: the gradients stay as they are (a missing one stays missing)."""

    def sum_stats(self, values: Sequence[float]) -> list[float]:
        """The values themselves, as floats."""
        return [float(v) for v in values]

    def gather_rows_(self, tensor: Tensor, owned: Tensor) -> None:
        """This rank owns every row: nothing to gather."""


class ProcessGroupComm:
    """What :func:`~fastavatar_nb.decoder.train_decoder` needs of the process group: the rank,
    its part of a step's items, and in-place sums over the ranks (on ``device``: NCCL reduces
    CUDA tensors only)."""

    def __init__(self, device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group "
                               "(torchrun + torch.distributed.init_process_group); see fastavatar_nb.distributed")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)

    def part(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous part of ``items`` (sizes differ by at most one; may be empty)."""
        n = len(items)
        return list(items[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size])

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Replace every tensor by its sum over the ranks (one flat all-reduce)."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for t in tensors:
            with torch.no_grad():
                t.copy_(flat[i:i + t.numel()].view(t.shape))
            i += t.numel()

    def sum_grads_(self, params: Sequence[Tensor]) -> None:
        """Sum the gradients of ``params`` over the ranks (a missing gradient counts as zeros)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.sum_([p.grad for p in params])

    def sum_stats(self, values: Sequence[float]) -> list[float]:
        """Sums over the ranks of a few numbers (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def gather_rows_(self, tensor: Tensor, owned: Tensor) -> None:
        """Every rank filled the rows ``owned`` (a ``[N]`` bool mask) of ``tensor``; give every
        rank every row (a sum with zeros elsewhere: exact)."""
        local = torch.where(owned.reshape(-1, *[1] * (tensor.ndim - 1)).to(tensor.device), tensor,
                            torch.zeros_like(tensor))
        if self.world_size > 1:
            local = local.to(self.device)
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        tensor.copy_(local.to(tensor.device))


Comm = LocalComm | ProcessGroupComm
"""Either communicator: what a training loop is given."""


def make_comm(distributed: bool, device: torch.device | str) -> Comm:
    """:class:`ProcessGroupComm` on ``device`` when ``distributed``, else :class:`LocalComm`."""
    return ProcessGroupComm(torch.device(device)) if distributed else LocalComm()
