"""Scale-out on torch.distributed (fastavatar_nb.distributed): two gloo processes on the CPU.

One module fixture launches 2 ranks (``torch.multiprocessing``, forked where the platform can,
``MASTER_ADDR=127.0.0.1``, a free port, one thread each) that fit 5 tiny subjects sharded by batch (rank 1 resuming the
shard a previous, interrupted run left behind), fit them again (the finished shards are reused),
and train a tiny decoder data-parallel. The tests compare what the ranks wrote with
single-process runs in this process.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scenes import rig_scene

from fastavatar_nb.decoder import DecoderConfig, DecoderResult, train_decoder
from fastavatar_nb.distributed import (
    SHARD_FITS_FILE,
    fit_shard,
    fit_subjects_distributed,
    main,
    shard_batches,
    shard_folder,
    train_decoder_distributed,
)
from fastavatar_nb.fitting import CHECKPOINT_FILE, FitConfig, FitResult, checkpoint_state, fit_subjects
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.template import build_template

RANKS = 2
K = 150
FIT_SEEDS = (21, 22, 23, 24, 25)  # batches of 2: [0, 1] on rank 0, [2, 3] + [4] on rank 1
FIT = dict(iterations=4, batch_size=2, checkpoint_every=2, tile_size=4, normal_neighbours=8)
DEC_SEEDS = (1, 2, 3)
# 3 subjects x 3 chunks of 5 views = 9 items, 2 per step: 5 steps per epoch, the last one with a
# single item (rank 0 idles in it); evaluation batches [0, 1] on rank 0 and [2] on rank 1
DEC = DecoderConfig(epochs=2, latent_dim=8, embed_dim=15, hidden_dim=32, depth=2, subjects_per_step=2,
                    views_per_step=5, decoder_lr=1e-2, embeddings_lr=1e-2, codes_lr=1e-1, tile_size=4,
                    checkpoint_every=4)
DECODER_ATOL = 1e-5
"""Largest absolute difference allowed between the 2-rank and the single-process decoder after its
10 steps, over every MLP weight, code, embedding and the loss history. Measured on a 2-core CPU
(torch 2.14, gloo): 2.3e-6 (an embedding), codes 7e-7, MLP weights <= 1.7e-6, losses 4e-8; the
summation order of the split batch and of the all-reduce is all that differs."""


@functools.cache
def _problems() -> tuple[list, list, Gaussians]:
    """The subjects to fit, and the subjects and template of the decoder (made once per process)."""
    subjects, truths = zip(*(rig_scene(s, K=K) for s in DEC_SEEDS), strict=True)
    return [rig_scene(s, K=K)[0] for s in FIT_SEEDS], list(subjects), build_template(Gaussians.stack(list(truths)))


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        root = Path(out)
        to_fit, dec_subjects, template = torch.load(root / "problems.pt", weights_only=False)
        steps: list[tuple[int, int]] = []
        again: list[int] = []
        fits = fit_subjects_distributed(to_fit, root / "shards", FitConfig(**FIT), backend="torch", progress=False,
                                        callback=lambda i: steps.append((i["batch_start"], i["step"])))
        fits2 = fit_subjects_distributed(to_fit, root / "shards", FitConfig(**FIT), backend="torch", progress=False,
                                         callback=lambda i: again.append(i["step"]))
        if rank == 0:
            fits.save(root / "fits.safetensors")
            fits2.save(root / "fits_again.safetensors")
        res = train_decoder_distributed(dec_subjects, template, DEC, backend="torch", progress=False,
                                        checkpoint=root / "decoder_checkpoint")
        res.save(root / f"decoder-rank{rank}")
        (root / f"rank{rank}.json").write_text(json.dumps({"steps": steps, "again": again}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")

    # an earlier run that died in rank 1's shard (subjects 2..4): its last batch (subject 4) at step 3
    def stop(info):
        if info["batch_start"] == 2 and info["step"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        fit_shard(_problems()[0], 1, RANKS, root / "shards", FitConfig(**FIT), backend="torch", progress=False,
                  callback=stop)
    state = checkpoint_state(root / "shards" / "subjects-00002-00004")
    assert (state["num_done"], state["batch_start"], state["step"]) == (2, 2, 2)
    torch.save(_problems(), root / "problems.pt")  # the ranks load the scenes instead of rendering them again
    # fork where there is one: the ranks start at once with this process's modules (each sets one thread,
    # as DataLoader workers do); spawn elsewhere
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(RANKS, _free_port(), str(root)), nprocs=RANKS, join=True, start_method=method)
    return root


def _same(a: torch.Tensor, b: torch.Tensor, msg: str, atol: float = 0.0) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol, equal_nan=True, msg=msg)


def test_shard_batches_are_whole_contiguous_batches():
    assert shard_batches(5, 2, 2) == [[0, 1], [2, 3, 4]]
    assert shard_batches(3, 2, 4) == [[], [0, 1], [], [2]]
    for n, bs, w in ((17, 4, 3), (16, 4, 4), (1, 3, 2), (40, 3, 7)):
        shards = shard_batches(n, bs, w)
        assert sum(shards, []) == list(range(n))
        assert all(s[0] % bs == 0 for s in shards if s)
        assert all(len(s) % bs == 0 for s in shards[:-1] if s and s[-1] != n - 1)
    assert shard_folder("x", [2, 3, 4]) == Path("x") / "subjects-00002-00004"
    with pytest.raises(ValueError, match="world_size"):
        shard_batches(4, 2, 0)
    with pytest.raises(ValueError, match="subject_indices must be 1 distinct indices"):
        fit_subjects(_problems()[0][:1], FitConfig(**FIT), backend="torch", progress=False, subject_indices=[3, 4])


def test_sharded_fits_equal_the_single_process_fits_bitwise(run, one_thread):
    subjects = _problems()[0]
    ref = fit_subjects(subjects, FitConfig(**FIT), backend="torch", progress=False)
    got = FitResult.load(run / "fits.safetensors")
    assert got.subject_ids == ref.subject_ids == [s.subject_id for s in subjects]
    assert got.config == ref.config and json.loads(got.extra["world_size"]) == RANKS
    for name, v in ref.gaussians.parameters().items():
        _same(getattr(got.gaussians, name), v, name)
    for name in ("anchors", "init_train_psnr", *FitResult.score_names(), "loss_history", "psnr_history"):
        _same(getattr(got, name), getattr(ref, name), name)
    assert torch.isfinite(got.loss_history).all() and torch.isfinite(got.heldout_psnr).all()
    # each rank wrote its own shard: a checkpoint and its result
    for folder in ("subjects-00000-00001", "subjects-00002-00004"):
        assert (run / "shards" / folder / SHARD_FITS_FILE).is_file()
        assert (run / "shards" / folder / CHECKPOINT_FILE).is_file()


def test_a_shard_resumes_and_finished_shards_are_reused(run):
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in range(RANKS))
    assert [tuple(s) for s in r0["steps"]] == [(0, 1), (0, 2), (0, 3), (0, 4)]  # rank 0: its batch from scratch
    assert [tuple(s) for s in r1["steps"]] == [(2, 3), (2, 4)]  # rank 1: from its checkpoint at step 2
    assert r0["again"] == r1["again"] == []  # the second call fitted nothing
    first, again = FitResult.load(run / "fits.safetensors"), FitResult.load(run / "fits_again.safetensors")
    for name, v in first.gaussians.parameters().items():
        _same(getattr(again.gaussians, name), v, name)
    _same(again.loss_history, first.loss_history, "loss_history")


def test_data_parallel_decoder_equals_the_single_process_one(run, one_thread):
    _, subjects, template = _problems()
    ref = train_decoder(subjects, template, DEC, backend="torch", progress=False)
    ranks = [DecoderResult.load(run / f"decoder-rank{r}") for r in range(RANKS)]
    # every rank holds the same model, bit for bit
    for other in ranks[1:]:
        _same(other.codes, ranks[0].codes, "codes")
        _same(other.embeddings, ranks[0].embeddings, "embeddings")
        for (k, a), b in zip(other.decoder.state_dict().items(), ranks[0].decoder.state_dict().values(), strict=True):
            _same(a, b, k)
        for m in ("loss_history", *DecoderResult.score_names()):
            _same(getattr(other, m), getattr(ranks[0], m), m)
    got = ranks[0]
    assert got.subject_ids == ref.subject_ids and got.config == ref.config
    assert len(ref.loss_history) == 10
    diffs = {"codes": (got.codes - ref.codes).abs().max(), "embeddings": (got.embeddings - ref.embeddings).abs().max(),
             "loss_history": (got.loss_history - ref.loss_history).abs().max()}
    for (k, a), b in zip(got.decoder.state_dict().items(), ref.decoder.state_dict().values(), strict=True):
        diffs[f"decoder.{k}"] = (a - b).abs().max()
    worst = max(diffs, key=lambda k: float(diffs[k]))
    print(f"largest 2-rank vs 1-process difference: {worst} {float(diffs[worst]):.3g}")
    assert float(diffs[worst]) <= DECODER_ATOL, diffs
    _same(got.psnr_history, ref.psnr_history, "psnr_history", atol=1e-3)  # dB
    for m in DecoderResult.score_names():  # PSNR in dB, SSIM: the decoded heads score the same
        _same(getattr(got, m), getattr(ref, m), m, atol=1e-3)
    # only rank 0 wrote the checkpoint, at the end of training
    from fastavatar_nb.decoder import checkpoint_state as decoder_checkpoint_state

    assert decoder_checkpoint_state(run / "decoder_checkpoint")["step"] == 10


def test_cli_argument_errors_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "the following arguments are required: stage" in capsys.readouterr().err
    assert main(["fit", "--preset", "smoke", "--dist-backend", "nccl", "--run-dir", str(tmp_path)]) == 2
    assert "--dist-backend nccl needs CUDA devices" in capsys.readouterr().err
    assert main(["decoder", "--preset", "smoke", "--timeout-minutes", "0", "--run-dir", str(tmp_path)]) == 2
    assert "--timeout-minutes must be positive" in capsys.readouterr().err
    assert main(["fit", "--preset", "smoke", "--set", "bogus=1", "--run-dir", str(tmp_path)]) == 2
    assert "Unknown preset field(s) ['bogus']" in capsys.readouterr().err
    assert main(["fit", "--preset", "smoke", "--set", "num_subjects", "--run-dir", str(tmp_path)]) == 2
    assert "--set needs FIELD=VALUE (e.g. decoder.epochs=4), got 'num_subjects'" in capsys.readouterr().err
    assert main(["fit", "--preset", "smoke", "--set", "decoder.epoch=3", "--run-dir", str(tmp_path)]) == 2
    assert "DecoderConfig: unknown fields ['epoch']" in capsys.readouterr().err  # a stage field, by its dotted name
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_the_local_communicator_is_the_identity_and_a_missing_group_is_named():
    from fastavatar_nb.comm import LocalComm, make_comm

    comm = make_comm(False, "cpu")
    assert isinstance(comm, LocalComm) and (comm.rank, comm.world_size) == (0, 1)
    items = [(0, [1, 2]), (3, [4])]
    assert comm.part(items) == items
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    q = torch.nn.Parameter(torch.ones(2))  # no gradient: stays without one (Adam then skips it, as before)
    comm.sum_grads_([p, q])
    assert p.grad.tolist() == [1.0, 2.0, 3.0] and q.grad is None
    assert comm.sum_stats([1, 2.5]) == [1.0, 2.5]
    rows, owned = torch.arange(4.0), torch.tensor([True, False, True, False])
    comm.gather_rows_(rows, owned)
    assert rows.tolist() == [0.0, 1.0, 2.0, 3.0]
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="distributed=True needs an initialised torch.distributed process group"):
            make_comm(True, "cpu")
