"""Interrupted work: a fit or a decoder training killed at any moment resumes to the result of an
uninterrupted run, bitwise, and a checkpoint that is damaged, foreign, inconsistent or left over
from the earlier two-file layout is refused with a clear error.

The kill tests fork a child process (from this test process: it inherits the data and the
imports, so a trial costs no interpreter start) that runs a tiny checkpointed fit or decoder
training, a checkpoint after every step; the test SIGKILLs it, then resumes in this process
and compares with one uninterrupted reference run. Ten trials per kind, from a seeded random
plan: most kill the child after a random number of steps plus a random delay (anywhere: inside
a step, inside a checkpoint write, between runs of subjects); the others make the child kill
itself at a chosen point of its n-th checkpoint write: with half a temporary file written
("torn"), with the temporary file complete but not yet renamed ("unrenamed"), or just after the
rename ("renamed").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from scenes import rig_scene

from fastavatar_nb import _io
from fastavatar_nb._io import CheckpointError, load_checkpoint, save_checkpoint
from fastavatar_nb.cameras import Cameras
from fastavatar_nb.decoder import CHECKPOINT_FILE as DECODER_CKPT
from fastavatar_nb.decoder import DecoderConfig, train_decoder
from fastavatar_nb.fitting import CHECKPOINT_FILE as FIT_CKPT
from fastavatar_nb.fitting import FitConfig, checkpoint_state, fit_subjects
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.template import build_template

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork a child process")

TRIALS = 10
FIT_CFG = FitConfig(iterations=6, batch_size=1, checkpoint_every=1, tile_size=4, normal_neighbours=8, holdout_view=3)
DEC_CFG = DecoderConfig(epochs=3, latent_dim=8, embed_dim=15, hidden_dim=32, depth=2, subjects_per_step=1,
                        views_per_step=2, decoder_lr=1e-2, embeddings_lr=1e-2, codes_lr=1e-1, tile_size=4,
                        checkpoint_every=1, holdout_view=3)  # 2 subjects x 2 chunks of the 3 training views: 12 steps
STEPS = {"fit": 2 * 6, "decoder": 3 * 4}
WRITES = {"fit": 2 * 6, "decoder": 3 * 4}  # checkpoint writes of a whole run
FMT = {"fit": "fastavatar-nb fit checkpoint v4", "decoder": "fastavatar-nb decoder checkpoint v4"}


@pytest.fixture(scope="module")
def data():
    """Two small subjects seen by 4 cameras of the rig (view 3 held out), and their template."""
    cams = Cameras.nersemble_rig(16, 24)[[0, 5, 8, 12]]
    subjects, truths = zip(*(rig_scene(seed, K=100, cams=cams) for seed in (21, 22)), strict=True)
    return list(subjects), build_template(Gaussians.stack(list(truths)))


def _run(kind: str, data, folder: Path | None, **kw):
    subjects, template = data
    if kind == "fit":
        return fit_subjects(subjects, FIT_CFG, backend="torch", checkpoint=folder, progress=False, **kw)
    return train_decoder(subjects, template, DEC_CFG, backend="torch", checkpoint=folder, progress=False, **kw)


def _same(kind: str, a, b) -> None:
    """Bitwise equality of two results (NaN equals NaN)."""
    def eq(x, y, what):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{kind} {what}: {m}")

    for m in ("train_psnr", "train_ssim", "heldout_psnr", "heldout_ssim", "heldout_psnr_head", "loss_history",
              "psnr_history"):
        eq(getattr(a, m), getattr(b, m), m)
    if kind == "fit":
        eq(a.init_train_psnr, b.init_train_psnr, "init_train_psnr")
        for name, v in a.gaussians.parameters().items():
            eq(v, getattr(b.gaussians, name), name)
    else:
        eq(a.codes, b.codes, "codes")
        eq(a.embeddings, b.embeddings, "embeddings")
        for (name, v), w in zip(a.decoder.state_dict().items(), b.decoder.state_dict().values(), strict=True):
            eq(v, w, name)


@pytest.fixture(scope="module")
def references(data):
    """One uninterrupted run of each kind (no checkpoint), on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {kind: _run(kind, data, None) for kind in ("fit", "decoder")}
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------- the child
def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def _install_write_kill(phase: str, nth: int) -> None:
    """Make this process kill itself at the ``nth`` checkpoint write, at ``phase``."""
    count = [0]
    save_file, fsync_dir = _io.save_file, _io._fsync_dir

    def counting_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        count[0] += 1
        if count[0] == nth and phase == "torn":        # half the temporary file written
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            _kill_self()
        if count[0] == nth and phase == "unrenamed":   # complete but not yet renamed
            _kill_self()

    def killing_fsync_dir(folder):
        fsync_dir(folder)
        if count[0] == nth and phase == "renamed":     # just renamed into place
            _kill_self()

    _io.save_file = counting_save_file
    _io._fsync_dir = killing_fsync_dir


def _child(kind: str, data, folder: str, plan: tuple, conn) -> None:
    torch.set_num_threads(1)
    if plan[0] == "write":
        _install_write_kill(plan[1], plan[2])
    steps = [0]

    def progress(info) -> None:
        steps[0] += 1
        conn.send(steps[0])

    conn.send("ready")
    _run(kind, data, Path(folder), callback=progress)
    conn.send("done")


def _plans(kind: str, seed: int) -> list[tuple]:
    """Ten kill plans: seven after a random step and delay, three at a checkpoint write."""
    rng = random.Random(f"{kind}-{seed}")
    plans: list[tuple] = [("write", phase, rng.randint(1, WRITES[kind])) for phase in ("torn", "unrenamed", "renamed")]
    plans += [("after", rng.randint(0, STEPS[kind] - 1), rng.uniform(0.0, 0.05)) for _ in range(TRIALS - 3)]
    rng.shuffle(plans)
    return plans


def _interrupted_run(kind: str, data, folder: Path, plan: tuple) -> str:
    """Run the child under ``plan``; returns how it ended ('killed' or 'finished')."""
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child, args=(kind, data, str(folder), plan, theirs), daemon=True)
    child.start()
    try:
        assert ours.poll(60) and ours.recv() == "ready"
        if plan[0] == "after":
            got: object = 0
            while got != "done" and got < plan[1]:  # type: ignore[operator]
                if not ours.poll(60):
                    break
                got = ours.recv()
            time.sleep(plan[2])
            child.kill()
        child.join(60)
        assert child.exitcode is not None, f"{kind} child did not end ({plan})"
        assert child.exitcode in (0, -signal.SIGKILL), f"{kind} child failed with exit code {child.exitcode} ({plan})"
        return "finished" if child.exitcode == 0 else "killed"
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def _steps_done(kind: str, folder: Path) -> int:
    """Steps of the whole run the checkpoint in ``folder`` holds."""
    if kind == "decoder":
        from fastavatar_nb.decoder import checkpoint_state as decoder_state

        return decoder_state(folder)["step"]
    st = checkpoint_state(folder)
    return st["num_done"] * FIT_CFG.iterations + (st["step"] if st["batch_start"] is not None else 0)


@pytest.mark.parametrize("kind", ["fit", "decoder"])
def test_killed_runs_resume_to_the_uninterrupted_result(kind, data, references, tmp_path, one_thread):
    t0 = time.perf_counter()
    ckpt_name = FIT_CKPT if kind == "fit" else DECODER_CKPT
    outcomes = []
    for i, plan in enumerate(_plans(kind, 14)):
        folder = tmp_path / f"trial{i}"
        ended = _interrupted_run(kind, data, folder, plan)
        left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert set(left) <= {ckpt_name, ckpt_name + ".tmp"}, left
        done = _steps_done(kind, folder) if ckpt_name in left else 0
        steps = []
        try:
            resumed = _run(kind, data, folder, callback=lambda info, steps=steps: steps.append(1))
        except CheckpointError as e:  # allowed, if clear: never happened with one atomic file
            assert str(folder) in str(e) and "overwrite=True" in str(e), e
            outcomes.append((plan, ended, left, done, "refused"))
            continue
        _same(kind, resumed, references[kind])
        assert len(steps) == STEPS[kind] - done  # it resumed from the checkpoint, did not start again
        outcomes.append((plan, ended, left, done, "equal"))
    print(f"\n{kind}: {sum(o[-1] == 'equal' for o in outcomes)}/{TRIALS} resumed runs equal the uninterrupted one "
          f"bitwise, {sum(o[-1] == 'refused' for o in outcomes)} refused, in {time.perf_counter() - t0:.1f} s")
    for plan, ended, left, done, outcome in outcomes:
        print(f"  {plan!s:42} child {ended:8} left {left!s:66} resumed after step {done:2} of {STEPS[kind]} "
              f"-> {outcome}")
    assert [o[-1] for o in outcomes] == ["equal"] * TRIALS
    # the plans reached a stray temporary file and a run that had no checkpoint yet or had finished
    assert any(ckpt_name + ".tmp" in o[2] for o in outcomes)


# ----------------------------------------------------------------- damaged or foreign checkpoints
class _Stop(Exception):
    pass


def _stopped_at(kind: str, data, folder: Path, step: int) -> Path:
    """A checkpoint of ``kind`` written at (global) step ``step``: the run is stopped right after."""
    count = [0]

    def stop(info) -> None:
        count[0] += 1
        if count[0] == step:
            raise _Stop

    with pytest.raises(_Stop):
        _run(kind, data, folder, callback=stop)
    return folder / (FIT_CKPT if kind == "fit" else DECODER_CKPT)


@pytest.mark.parametrize("kind", ["fit", "decoder"])
def test_state_and_tensors_from_different_steps_are_refused(kind, data, tmp_path, one_thread):
    """The old failure: the JSON state of one step with the tensors of another. One file makes it
    impossible to write; a file made that way by hand is refused, naming the file and both steps."""
    path = _stopped_at(kind, data, tmp_path / "ck", 4)
    state, tensors = load_checkpoint(path, FMT[kind])
    assert state["step"] == 4
    save_checkpoint(path, FMT[kind], {**state, "step": 2}, tensors)  # state of step 2, tensors of step 4
    with pytest.raises(CheckpointError, match="the state says step 2.* holds \\[?4\\]? steps") as e:
        _run(kind, data, tmp_path / "ck")
    assert str(path) in str(e.value) and "overwrite=True" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "edited state", "foreign"])
def test_damaged_or_foreign_checkpoints_are_refused(damage, data, references, tmp_path, one_thread):
    path = _stopped_at("fit", data, tmp_path / "ck", 3)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:-100])
        match = "not a readable safetensors file"
    elif damage == "flipped byte":
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
        match = "is damaged: its content has checksum"
    elif damage == "edited state":
        assert raw.count(b'\\"step\\": 3') == 1
        path.write_bytes(raw.replace(b'\\"step\\": 3', b'\\"step\\": 2'))
        match = "is damaged: its content has checksum"
    else:  # a decoder checkpoint renamed into the fit's folder
        dec = _stopped_at("decoder", data, tmp_path / "dec", 2)
        path.write_bytes(dec.read_bytes())
        match = "not a fastavatar-nb fit checkpoint v4 file \\(format 'fastavatar-nb decoder checkpoint v4'\\)"
    with pytest.raises(CheckpointError, match=match) as e:
        _run("fit", data, tmp_path / "ck")
    assert str(path) in str(e.value) and "overwrite=True" in str(e.value)
    with pytest.raises(CheckpointError, match=match):
        checkpoint_state(tmp_path / "ck") if damage in ("truncated", "foreign") else _io.load_checkpoint(path, FMT["fit"])
    _same("fit", _run("fit", data, tmp_path / "ck", overwrite=True), references["fit"])


@pytest.mark.parametrize("kind", ["fit", "decoder"])
def test_old_two_file_layout_is_refused_and_overwrite_clears_it(kind, data, references, tmp_path, one_thread):
    folder = tmp_path / "ck"
    folder.mkdir()
    old = ("fit_state.json", "fit_state.safetensors") if kind == "fit" else ("decoder_state.json",
                                                                            "decoder_state.safetensors")
    for name in old:
        (folder / name).write_text("{}")
    with pytest.raises(CheckpointError, match=f"two-file layout .*{old[0]}, {old[1]}.*overwrite=True"):
        _run(kind, data, folder)
    _same(kind, _run(kind, data, folder, overwrite=True), references[kind])
    assert sorted(p.name for p in folder.iterdir()) == [FIT_CKPT if kind == "fit" else DECODER_CKPT]


def test_a_stray_temporary_file_is_ignored(data, references, tmp_path, one_thread):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / (FIT_CKPT + ".tmp")).write_bytes(b"half a checkpoint")  # a write killed before any checkpoint
    _same("fit", _run("fit", data, folder), references["fit"])
    path = _stopped_at("fit", data, tmp_path / "ck2", 5)
    (tmp_path / "ck2" / (FIT_CKPT + ".tmp")).write_bytes(b"half a checkpoint")  # beside a complete one
    assert checkpoint_state(path.parent)["step"] == 5
    _same("fit", _run("fit", data, path.parent), references["fit"])
