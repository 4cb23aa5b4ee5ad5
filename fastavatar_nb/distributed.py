"""Scale-out on PyTorch's distributed runtime: the per-subject fits and the decoder on many GPUs.

Launch one process per GPU with ``torchrun`` (NCCL on CUDA, gloo on CPU)::

    torchrun --nproc_per_node 8 -m fastavatar_nb.distributed fit --preset full
    torchrun --nproc_per_node 8 -m fastavatar_nb.distributed decoder --preset full

**Fits, sharded by subject** (:func:`fit_subjects_distributed`). :func:`~fastavatar_nb.fitting.fit_subjects`
optimises ``FitConfig.batch_size`` subjects together, and a subject's view schedule depends on its
index in the list of subjects. So the subjects are cut into the batches a single process would
make, and every rank gets a contiguous block of whole batches (:func:`shard_batches`; batch
``b`` of ``B`` goes to rank ``r`` when ``r B // W <= b < (r + 1) B // W``); the rank fits them with
``subject_indices=`` their indices in the whole list. Same batches, same schedule, same
floating-point order: every subject's fit equals the single-process fit **bitwise**.
Each rank writes its shard into its own folder ``<folder>/subjects-<first>-<last>/`` (a
resumable fit checkpoint, ``fit_checkpoint.safetensors``, and the shard's result, ``fits.safetensors``); once
every rank is done (a barrier), the shards are read back and concatenated in the original
subject order (:func:`merge_fit_shards`). A rerun resumes each unfinished shard from its
checkpoint and reuses the finished ones. The folder must be visible to every rank (one machine,
or a shared file system).

**Decoder, data-parallel** (:func:`train_decoder_distributed`, i.e.
``train_decoder(..., distributed=True)``). Every rank holds the whole model, the codes ``w_i``
and the embeddings ``e_k``, initialised identically from ``DecoderConfig.seed``. Each step's
items (:func:`~fastavatar_nb.decoder.step_items`, ``subjects_per_step`` of them, the *global*
batch) are split into contiguous parts, one per rank; a rank decodes and renders its part and
normalises its loss by the *global* number of renders (and its share of the residual penalty
by its share of the decoded subjects), so the sum over the ranks is the single-process loss.
The gradients of every parameter (MLP, codes and embeddings, zeros where a rank did not touch
them) are then summed with one explicit ``all_reduce`` (:class:`~fastavatar_nb.comm.ProcessGroupComm`), clipped, and every
rank takes the same Adam step, so all copies stay identical. We use an explicit ``all_reduce``
rather than :class:`torch.nn.parallel.DistributedDataParallel`: the codes and embeddings are
plain tensors outside the module, a rank may have no item in a step (it must still join the
reduction) and the clipping must see the summed gradient; one flat all-reduce per step is the
whole of what DDP would do here. Only rank 0 writes checkpoints (every rank reads one when
resuming) and the result; the final evaluation is sharded by batch and gathered. The result
equals the single-process one up to floating-point summation order: after 10 steps on 2 gloo
ranks the largest difference in any weight, code or embedding was 2.3e-6
(``tests/test_distributed.py`` allows 1e-5).

Command line (``python -m fastavatar_nb.distributed STAGE``, :func:`main`, :func:`run_stage`):
``fit`` writes ``fits.safetensors`` and ``template.safetensors``, ``decoder`` writes
``decoder.safetensors`` and ``latents.safetensors`` (fitting first when there is no template),
into the run folder, from rank 0, exactly as :mod:`fastavatar_nb.pipeline` would; options
``--preset``, ``--run-dir``, ``--set FIELD=VALUE``, ``--dist-backend``, ``--timeout-minutes``
(ranks wait at a barrier for the slowest shard), ``--no-progress``. Without a process group
(a plain ``python``), everything runs as rank 0 of 1.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .data.subject import MultiViewSubject
from .decoder import DecoderConfig, DecoderResult, train_decoder
from .fitting import FitConfig, FitResult, fit_subjects
from .gaussians import Gaussians
from .objective import subject_ids
from .render import Backend

__all__ = ["FIT_SHARDS", "SHARD_FITS_FILE", "world", "shard_batches", "shard_folder", "fit_shard", "merge_fit_shards",
           "fit_subjects_distributed", "train_decoder_distributed", "run_stage", "build_parser", "main"]

FIT_SHARDS = "fit_shards"
"""The ranks' fit shards (one folder each), in the run folder."""
SHARD_FITS_FILE = "fits.safetensors"
"""A finished shard's :class:`~fastavatar_nb.fitting.FitResult`, in its shard folder."""
_PROG = "python -m fastavatar_nb.distributed"


# ---------------------------------------------------------------------------------- runtime
def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------- fits
def shard_batches(num_subjects: int, batch_size: int, world_size: int) -> list[list[int]]:
    """Subject indices of each rank's shard: contiguous blocks of whole fitting batches.

    The ``B = ceil(num_subjects / batch_size)`` batches are those :func:`fit_subjects` makes; rank
    ``r`` gets batches ``r B // W .. (r + 1) B // W - 1`` (counts differ by at most one; a rank
    gets none when there are fewer batches than ranks). Only the last batch can be short and it
    ends the last shard, so each shard splits into the same batches again.
    """
    for name, v in (("num_subjects", num_subjects), ("batch_size", batch_size), ("world_size", world_size)):
        if not isinstance(v, int) or v < (0 if name == "num_subjects" else 1):
            raise ValueError(f"shard_batches: {name} must be a {'non-negative' if name == 'num_subjects' else 'positive'} "
                             f"int, got {v!r}")
    B = -(-num_subjects // batch_size)
    out = []
    for r in range(world_size):
        b0, b1 = r * B // world_size, (r + 1) * B // world_size
        out.append(list(range(b0 * batch_size, min(num_subjects, b1 * batch_size))))
    return out


def shard_folder(folder: str | os.PathLike, indices: Sequence[int]) -> Path:
    """``<folder>/subjects-<first>-<last>``: the shard of subjects ``indices`` (a contiguous range)."""
    return Path(folder) / f"subjects-{indices[0]:05d}-{indices[-1]:05d}"


class _Subset:
    """Subjects ``indices`` of a list or lazy dataset, read on access (like ``SubjectDataset``)."""

    def __init__(self, subjects: Sequence[MultiViewSubject], indices: Sequence[int], ids: list[str]) -> None:
        self.subjects, self.indices = subjects, list(indices)
        self.subject_ids = [ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> MultiViewSubject:
        return self.subjects[self.indices[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def fit_shard(subjects: Sequence[MultiViewSubject], rank: int, world_size: int, folder: str | os.PathLike,
              config: FitConfig | None = None, backend: Backend = "auto", device: torch.device | str | None = None,
              overwrite: bool = False, progress: bool = True,
              callback: Callable[[dict[str, Any]], None] | None = None) -> FitResult | None:
    """Fit rank ``rank``'s shard of ``subjects`` (:func:`shard_batches`) into its shard folder.

    Needs no process group (e.g. to redo one shard by hand). The fit resumes from the shard's
    checkpoint when there is one (``overwrite``: start afresh) and its result is (re)written to
    ``<shard folder>/fits.safetensors``. Returns it, or ``None`` when the rank has no subjects.
    Arguments as :func:`~fastavatar_nb.fitting.fit_subjects`.
    """
    config = (config or FitConfig()).validate()
    ids = subject_ids(subjects, "fit_shard")
    if not ids:
        raise ValueError("fit_shard: no subjects given")
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"fit_shard: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    idx = shard_batches(len(ids), config.batch_size, world_size)[rank]
    if not idx:
        return None
    where = shard_folder(folder, idx)
    result = fit_subjects(_Subset(subjects, idx, ids), config, backend=backend, device=device, checkpoint=where,
                          overwrite=overwrite, progress=progress, callback=callback, subject_indices=idx)
    result.save(where / SHARD_FITS_FILE, overwrite=True)
    return result


def merge_fit_shards(ids: Sequence[str], folder: str | os.PathLike, world_size: int, config: FitConfig,
                     device: torch.device | str = "cpu") -> FitResult:
    """The fits of subjects ``ids`` from the ``world_size`` shards in ``folder``, in that order.

    ``seconds`` is the slowest shard's (the wall time of the parallel run); ``extra`` records
    the world size and each shard's seconds.

    Raises:
        FileNotFoundError: a shard is missing (its rank has not finished).
        ValueError: a shard holds other subjects or another config.
    """
    ids = list(ids)
    config = config.validate()
    parts: list[FitResult] = []
    for idx in shard_batches(len(ids), config.batch_size, world_size):
        if not idx:
            continue
        path = shard_folder(folder, idx) / SHARD_FITS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"merge_fit_shards: {path} is missing: the shard of subjects {idx[0]}..{idx[-1]} "
                                    "has not finished; run the fit again to complete it")
        r = FitResult.load(path, device=device)
        want = [ids[i] for i in idx]
        if r.subject_ids != want or r.config != config:
            raise ValueError(f"merge_fit_shards: {path} holds fits of {r.subject_ids} with another config or other "
                             f"subjects than expected ({want}); delete {path.parent} to fit that shard again")
        parts.append(r)

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    g = Gaussians(**{k: torch.cat([getattr(p.gaussians, k) for p in parts])
                     for k in ("means", "log_scales", "quats", "opacity_logits", "sh")})
    metrics = {m: cat(m) for m in ("init_train_psnr", *FitResult.score_names())}
    extra = {"world_size": str(world_size), "shard_seconds": json.dumps([p.seconds for p in parts])}
    return FitResult(subject_ids=ids, gaussians=g, anchors=cat("anchors"), loss_history=cat("loss_history"),
                     psnr_history=cat("psnr_history"), config=config, backend=parts[0].backend,
                     seconds=max(p.seconds for p in parts), extra=extra, **metrics)


def fit_subjects_distributed(subjects: Sequence[MultiViewSubject], folder: str | os.PathLike,
                             config: FitConfig | None = None, backend: Backend = "auto",
                             device: torch.device | str | None = None, overwrite: bool = False,
                             progress: bool = True,
                             callback: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """:func:`~fastavatar_nb.fitting.fit_subjects` over the ranks of the process group.

    Every rank calls it with the same subjects, folder and config: each fits its shard
    (:func:`fit_shard`, into ``<folder>/subjects-<first>-<last>/``), waits for the others (a
    barrier: the process group's timeout must exceed the slowest shard's fit) and returns the
    merged :class:`~fastavatar_nb.fitting.FitResult` of all subjects in their order
    (:func:`merge_fit_shards`), bitwise equal to a single-process fit. ``callback`` sees this
    rank's steps (``batch_start`` is then the index within the shard).
    """
    config = (config or FitConfig()).validate()
    ids = subject_ids(subjects, "fit_subjects_distributed")
    if not ids:
        raise ValueError("fit_subjects_distributed: no subjects given")
    rank, size = world()
    fit_shard(subjects, rank, size, folder, config, backend=backend, device=device, overwrite=overwrite,
              progress=progress, callback=callback)
    _barrier()
    return merge_fit_shards(ids, folder, size, config, device=device if device is not None else "cpu")


# ---------------------------------------------------------------------------------- decoder
def train_decoder_distributed(subjects: Sequence[MultiViewSubject], template: Gaussians,
                              config: DecoderConfig | None = None, backend: Backend = "auto",
                              device: torch.device | str | None = None, checkpoint: str | os.PathLike | None = None,
                              overwrite: bool = False, progress: bool = True,
                              callback: Callable[[dict[str, Any]], None] | None = None) -> DecoderResult:
    """:func:`~fastavatar_nb.decoder.train_decoder` data-parallel over the ranks of the process group.

    Every rank calls it with the same arguments and gets the same :class:`DecoderResult`;
    ``config.subjects_per_step`` is the global batch, split over the ranks (ranks beyond it idle).
    Only rank 0 shows progress, calls ``callback`` and writes the checkpoint; every rank resumes
    from it (so it must be on a file system they all see). Without a process group this is
    plain ``train_decoder``.
    """
    rank, size = world()
    if size == 1 and not (dist.is_available() and dist.is_initialized()):
        return train_decoder(subjects, template, config, backend, device, checkpoint, overwrite, progress, callback)
    return train_decoder(subjects, template, config, backend, device, checkpoint, overwrite,
                         progress=progress and rank == 0, callback=callback if rank == 0 else None, distributed=True)


# -------------------------------------------------------------------------------------- CLI
class _UsageError(Exception):
    """A usage problem: one line on stderr and exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastavatar_nb.distributed``."""
    from . import presets

    p = argparse.ArgumentParser(
        prog=_PROG,
        description="Run a stage on every process of a torchrun launch (one per GPU): 'fit' fits the training "
        "subjects sharded by whole batches and writes fits.safetensors + template.safetensors; 'decoder' trains the "
        "auto-decoder data-parallel (fitting first when the run folder has no template) and writes "
        "decoder.safetensors + latents.safetensors. Rank 0 writes the run folder's files, as the notebooks would.",
        epilog="example: torchrun --nproc_per_node 8 -m fastavatar_nb.distributed fit --preset full")
    p.add_argument("stage", choices=("fit", "decoder"), help="what to run: fit or decoder")
    p.add_argument("--preset", choices=presets.PRESET_NAMES, default="auto",
                   help="preset: smoke (CPU), full (CUDA), auto = full if CUDA is available else smoke (default)")
    p.add_argument("--run-dir", metavar="DIR", default=None,
                   help="the run folder (default: $FASTAVATAR_RUN_DIR, else <repository>/runs/<preset>); every "
                   "rank must see it")
    p.add_argument("--allow-cpu", action="store_true", help="allow --preset full without CUDA")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a preset field or a stage's, e.g. --set num_subjects=40 --set decoder.epochs=4 "
                        "(repeatable)")
    p.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="process-group backend: auto = nccl on CUDA, gloo on CPU")
    p.add_argument("--timeout-minutes", type=float, default=24 * 60.0, metavar="M",
                   help="process-group timeout; ranks wait at a barrier for the slowest shard (default: 1440)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _setup(args: argparse.Namespace) -> tuple[Any, torch.device]:
    """The preset and this rank's device; initialises the process group when launched by torchrun."""
    from . import presets

    overrides: dict[str, Any] = {"run_dir": Path(args.run_dir).resolve()} if args.run_dir is not None else {}
    try:
        overrides.update(presets.parse_sets(args.set))
    except presets.PresetError as err:
        raise _UsageError(str(err)) from err
    try:
        preset = presets.get(args.preset, allow_cpu=args.allow_cpu or None, **overrides)
    except (presets.PresetError, ValueError, TypeError) as err:
        raise _UsageError(str(err)) from err
    if args.timeout_minutes <= 0:
        raise _UsageError(f"--timeout-minutes must be positive, got {args.timeout_minutes}")
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if preset.device == "cuda":
        if not torch.cuda.is_available():
            raise _UsageError(f"preset {preset.name!r} runs on CUDA, which is not available here")
        if local >= torch.cuda.device_count():
            raise _UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; use "
                              "--nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = args.dist_backend if args.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise _UsageError(f"--dist-backend nccl needs CUDA devices; preset {preset.name!r} runs on {device.type} "
                          "(use gloo)")
    if launched and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return preset, device


def _say(msg: str) -> None:
    if world()[0] == 0:
        print(f"[{_PROG}] {msg}", flush=True)


def _fit_stage(preset: Any, train: Any, device: torch.device, progress: bool) -> None:
    from .pipeline import FITS_FILE, ensure_fits, ensure_template
    from .template import TEMPLATE_SAFETENSORS

    run = preset.run_dir
    if (run / TEMPLATE_SAFETENSORS).is_file():
        _say(f"{run} already has {TEMPLATE_SAFETENSORS}; not fitting again")
    else:  # the pipeline's fits (reused when they match the run, refused when not), fitted over the ranks
        fit = functools.partial(fit_subjects_distributed, folder=run / FIT_SHARDS, backend=preset.backend, device=device)
        fits = ensure_fits(preset, train, progress=progress, fit=fit, save=world()[0] == 0)
        _say(f"{run / FITS_FILE}: {len(fits.subject_ids)} subjects, {world()[1]} shard(s)")
    if world()[0] == 0:  # the template from fits.safetensors (or the stored one, checked), as the notebooks make it
        ensure_template(preset, train, progress=progress)
    _barrier()


def _decoder_stage(preset: Any, train: Any, device: torch.device, progress: bool) -> None:
    from .decoder import DECODER_FILE
    from .pipeline import DECODER_CHECKPOINT, ensure_decoder
    from .template import load_template

    run = preset.run_dir
    if not (run / DECODER_FILE).is_file():
        _fit_stage(preset, train, device, progress)
        if world()[1] > preset.decoder.subjects_per_step:
            _say(f"warning: {world()[1]} ranks but {preset.decoder.subjects_per_step} items per step; "
                 f"{world()[1] - preset.decoder.subjects_per_step} ranks will idle")
    train_fn = functools.partial(train_decoder_distributed, backend=preset.backend, device=device,
                                 checkpoint=run / DECODER_CHECKPOINT)
    result = ensure_decoder(preset, train, progress=progress, train_fn=train_fn, save=world()[0] == 0,
                            make_template=lambda: load_template(run, device=device))  # reuse: checked on every rank
    _say(f"{run / DECODER_FILE}: the codes of {len(result.subject_ids)} subjects")
    _barrier()


def run_stage(stage: str, preset: Any, device: torch.device | str | None = None, progress: bool = True) -> None:
    """Run ``stage`` ("fit" or "decoder") of ``preset`` on every rank of the process group (or
    alone without one), as the CLI does: rank 0 makes the dataset (:func:`~fastavatar_nb.pipeline.prepare_dataset`),
    every rank reads the training split like the notebooks (``SubjectDataset``), and rank 0 writes
    ``fits.safetensors`` + ``template.safetensors`` ("fit") and ``decoder.safetensors`` +
    ``latents.safetensors`` ("decoder", fitting first when there is no template) into
    ``preset.run_dir``, as :func:`~fastavatar_nb.pipeline.ensure_template` and
    :func:`~fastavatar_nb.pipeline.ensure_decoder` would. Files already there are kept (and checked)."""
    from .data import SubjectDataset
    from .pipeline import prepare_dataset

    if stage not in ("fit", "decoder"):
        raise ValueError(f"run_stage: stage must be 'fit' or 'decoder', got {stage!r}")
    device = torch.device(device) if device is not None else preset.torch_device
    progress = progress and world()[0] == 0
    if world()[0] == 0:
        prepare_dataset(preset, progress=progress)
    _barrier()
    train = SubjectDataset(preset.run_dir / "dataset", "train", cache_size=preset.num_subjects)
    _say(f"{stage}: preset {preset.name}, {len(train)} training subjects, {world()[1]} rank(s), device {device}, "
         f"run folder {preset.run_dir}")
    (_fit_stage if stage == "fit" else _decoder_stage)(preset, train, device, progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fastavatar_nb.distributed``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        preset, device = _setup(args)
    except _UsageError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        run_stage(args.stage, preset, device, progress=not args.no_progress)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
