"""pipeline: the run folder's dataset and template are made once, then reused, never overwritten."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fastavatar_nb import pipeline, presets
from fastavatar_nb.data import SubjectDataset
from fastavatar_nb.fitting import FitResult
from fastavatar_nb.template import build_template, load_template


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return presets.get("smoke", num_subjects=4, num_test_subjects=1, num_val_subjects=1, image_width=20, image_height=29,
                       num_gaussians=300, run_dir=run_dir, **{"fit.iterations": 4, "fit.batch_size": 2})


def test_prepare_dataset_makes_subjects_and_split_once(tiny):
    root = pipeline.prepare_dataset(tiny, progress=False)
    assert root == tiny.run_dir / "dataset"
    split = json.loads((root / "split.json").read_text())
    assert len(split["train"]) == 2 and len(split["val"]) == 1 and len(split["test"]) == 1
    assert not set(split["train"]) & set(split["val"]) and not set(split["val"]) & set(split["test"])
    stamp = (root / "split.json").stat().st_mtime_ns
    assert pipeline.prepare_dataset(tiny, progress=False) == root  # second call: reused as it is
    assert (root / "split.json").stat().st_mtime_ns == stamp
    assert SubjectDataset(root, "train")[0].num_points == 300


def test_ensure_template_fits_averages_and_then_reuses(tiny, monkeypatch):
    root = pipeline.prepare_dataset(tiny, progress=False)
    train = SubjectDataset(root, "train")
    template = pipeline.ensure_template(tiny, train, progress=False)
    fits = FitResult.load(tiny.run_dir / pipeline.FITS_FILE)
    assert fits.subject_ids == train.subject_ids and fits.config.iterations == 4
    torch.testing.assert_close(template.means, build_template(fits.gaussians).means)
    torch.testing.assert_close(load_template(tiny.run_dir).sh, template.sh)

    def no_fitting(*args, **kwargs):
        raise AssertionError("ensure_template fitted again although the run folder has a template")

    monkeypatch.setattr(pipeline, "fit_subjects", no_fitting)
    with monkeypatch.context() as mp:  # reusing needs the subjects' ids only: no subject is read from disk
        mp.setattr(SubjectDataset, "__getitem__", lambda *a: pytest.fail("a subject was read to check a reuse"))
        again = pipeline.ensure_template(tiny, train, progress=False)
        assert pipeline.ensure_fits(tiny, train, progress=False).subject_ids == train.subject_ids
    torch.testing.assert_close(again.means, template.means, rtol=0, atol=0)
    # without the template, the stored fits are averaged again (still no fitting)
    for name in ("template.safetensors", "template.ply"):
        (tiny.run_dir / name).unlink()
    torch.testing.assert_close(pipeline.ensure_template(tiny, train, progress=False).means, template.means)


def test_ensure_template_refuses_fits_of_other_subjects(tiny):
    root = pipeline.prepare_dataset(tiny, progress=False)
    test = SubjectDataset(root, "test")
    for name in ("template.safetensors", "template.ply"):
        (tiny.run_dir / name).unlink(missing_ok=True)
    pipeline.ensure_template(tiny, SubjectDataset(root, "train"), progress=False)
    for name in ("template.safetensors", "template.ply"):
        (tiny.run_dir / name).unlink()
    with pytest.raises(ValueError, match=r"fits.safetensors was made with other subjects \(2 stored, 1 in this run's "
                                         r"split; first difference at position 0.*delete fits.safetensors \(and "
                                         r"fit_checkpoint/\) to make it again"):
        pipeline.ensure_template(tiny, test, progress=False)


def test_a_stored_template_is_checked_before_it_is_reused(tiny, monkeypatch):
    """The template records the subjects and the FitConfig it was averaged from: another run's template, or one
    holding other numbers, is refused (it used to be reused unchecked); one written before it recorded its
    FitConfig is checked on its subjects alone."""
    from fastavatar_nb.template import TEMPLATE_PLY, TEMPLATE_SAFETENSORS, save_template, template_metadata

    root = pipeline.prepare_dataset(tiny, progress=False)
    train = SubjectDataset(root, "train")
    template = pipeline.ensure_template(tiny, train, progress=False)
    meta = template_metadata(tiny.run_dir)
    assert meta["subjects"] == ",".join(train.subject_ids) and json.loads(meta["fit_config"]) == json.loads(
        tiny.fit.to_json())
    fits = pipeline.ensure_fits(tiny, train, progress=False)  # reused: the same subjects and config
    assert pipeline.store_template(tiny, template, fits).startswith("kept the template")
    other = tiny.replace(**{"fit.iterations": 5})
    with pytest.raises(ValueError, match=r"template.safetensors was made with another FitConfig \(iterations: this "
                                         r"call 5, the stored one 4\); delete template.safetensors and template.ply"):
        pipeline.ensure_template(other, train, progress=False)
    with pytest.raises(ValueError, match=r"fits.safetensors was made with another FitConfig \(iterations: this call 5"):
        pipeline.ensure_fits(other, train, progress=False)
    shifted = template.clone()
    shifted.means += 0.01
    with pytest.raises(ValueError, match="does not hold the average of these fits"):
        pipeline.store_template(tiny, shifted, fits)
    # a template written before templates recorded their FitConfig: its subjects are still checked
    for name in (TEMPLATE_PLY, TEMPLATE_SAFETENSORS):
        (tiny.run_dir / name).unlink()
    save_template(template, tiny.run_dir, metadata={"subjects": ",".join(train.subject_ids), "preset": "smoke"})
    torch.testing.assert_close(pipeline.ensure_template(other, train, progress=False).means, template.means)
    with pytest.raises(ValueError, match="was made with other subjects"):
        pipeline.ensure_template(tiny, SubjectDataset(root, "test"), progress=False)
    for name in (TEMPLATE_PLY, TEMPLATE_SAFETENSORS):  # leave the folder as the other tests expect it
        (tiny.run_dir / name).unlink()
    pipeline.ensure_template(tiny, train, progress=False)


def test_check_reuse_names_what_differs(tmp_path):
    from fastavatar_nb.refine import RefineConfig

    path = tmp_path / "x.safetensors"
    pipeline.check_reuse(path, ["a", "b"], ["a", "b"], RefineConfig(), RefineConfig(), "x")  # the same: reused
    pipeline.check_reuse(path, ["a"], ["a"], RefineConfig(), None, "x")  # no stored config: subjects only
    pipeline.check_reuse(path, None, None, RefineConfig(steps=3), RefineConfig(steps=3), "x")  # no subjects recorded
    with pytest.raises(ValueError, match=r"x.safetensors was made with other subjects \(3 stored, 2 in this run's "
                                         r"split; first difference at position 1: stored 'c', this run 'b'\); "
                                         r"delete x to make it again"):
        pipeline.check_reuse(path, ["a", "b"], ["a", "c", "d"], RefineConfig(), RefineConfig(), "x")
    with pytest.raises(ValueError, match=r"another RefineConfig \(schedule: this call 'code', the stored one 'joint'; "
                                         r"steps: this call 3, the stored one 50\)"):
        pipeline.check_reuse(path, ["a"], ["a"], RefineConfig(steps=3, schedule="code"), RefineConfig(), "x")


def test_ensure_decoder_refusal_names_what_differs(tiny, monkeypatch):
    from fastavatar_nb.decoder import DECODER_FILE

    root = pipeline.prepare_dataset(tiny, progress=False)
    train = SubjectDataset(root, "train")
    tiny.run_dir.mkdir(parents=True, exist_ok=True)
    (tiny.run_dir / DECODER_FILE).write_bytes(b"")  # a stored decoder (its loading is stubbed below)
    stored = SimpleNamespace(subject_ids=train.subject_ids, config=tiny.decoder.replace(mlp_dtype="float32"))
    monkeypatch.setattr(pipeline.DecoderResult, "load", lambda *a, **k: stored)
    with pytest.raises(ValueError, match=r"another DecoderConfig \(mlp_dtype: this call 'auto', the stored one "
                                         r"'float32'\); delete decoder.safetensors"):
        pipeline.ensure_decoder(tiny, train, progress=False)
    stored.config, stored.subject_ids = tiny.decoder, train.subject_ids[:-1]
    with pytest.raises(ValueError, match=rf"other subjects \({len(train) - 1} stored, {len(train)} in this run"):
        pipeline.ensure_decoder(tiny, train, progress=False)
    stored.subject_ids = train.subject_ids
    assert pipeline.ensure_decoder(tiny, train, progress=False) is stored  # the same config and subjects: reused


def test_ensure_encoder_distils_once_then_reuses(tiny, monkeypatch):
    root = pipeline.prepare_dataset(tiny, progress=False)
    train = SubjectDataset(root, "train")
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(train), 16, 512, generator=g), dim=-1)
    found = torch.ones(len(train), 16, dtype=torch.bool)
    found[0, 3] = False
    emb[0, 3] = float("nan")  # a view without a face is left out, not trained on
    avatars = SimpleNamespace(codes=torch.randn(len(train), 512, generator=g))
    small = tiny.replace(**{"encoder.epochs": 3})
    encoder = pipeline.ensure_encoder(small, train, avatars, (emb, found), progress=False)
    assert (small.run_dir / "encoder.safetensors").is_file()
    assert len(encoder.loss_history) == 3  # 31 pairs: one batch of 64 per epoch

    def boom(*args, **kwargs):
        raise AssertionError("ensure_encoder trained again although the run folder has an encoder")

    monkeypatch.setattr(pipeline, "train_encoder", boom)
    again = pipeline.ensure_encoder(small, train, avatars, (emb, found), progress=False)
    x = emb[found][:4]
    torch.testing.assert_close(again.encode(x), encoder.encode(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"another EncoderConfig \(epochs: this call 4, the stored one 3\)"):
        pipeline.ensure_encoder(tiny.replace(**{"encoder.epochs": 4}), train, avatars, (emb, found), progress=False)


def test_a_checkpoint_a_stage_cannot_resume_names_the_folder_to_delete(tiny, tmp_path):
    """The pipeline's functions take no overwrite: a checkpoint of an earlier format (or another run) is refused
    with the folder a notebook user deletes, not with an argument they cannot pass."""
    from fastavatar_nb._io import CheckpointError, save_checkpoint
    from fastavatar_nb.decoder import CHECKPOINT_FILE

    root = pipeline.prepare_dataset(tiny, progress=False)
    train = SubjectDataset(root, "train")
    pipeline.ensure_template(tiny, train, progress=False)
    run = tiny.replace(run_dir=tmp_path / "run")
    save_checkpoint(run.run_dir / pipeline.DECODER_CHECKPOINT / CHECKPOINT_FILE, "fastavatar-nb decoder checkpoint v3",
                    {"step": 1}, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"checkpoint v3'\); delete .*run/decoder_checkpoint/ to start this stage "
                                              r"afresh \(or pass overwrite=True to the training function\)"):
        pipeline.ensure_decoder(run, train, progress=False, make_template=lambda: load_template(tiny.run_dir))
    assert not (run.run_dir / "decoder.safetensors").exists()
