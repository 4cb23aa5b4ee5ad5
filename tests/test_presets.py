"""Presets: numbers, name resolution, run folders, environment overrides, setup()."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavatar_nb import presets, runtime
from fastavatar_nb.presets import Preset, PresetError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (presets.RUN_DIR_ENV, presets.PRESET_ENV, presets.ALLOW_CPU_FULL_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastavatar_nb.render import gsplat_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gsplat_backend, "gsplat_status", lambda: (True, "fake: kernels loaded"))


def test_full_falls_back_to_the_torch_backend_where_gsplat_cannot_build(fake_cuda: None,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fastavatar_nb.render import gsplat_backend

    monkeypatch.setattr(gsplat_backend, "gsplat_status", lambda: (False, "nvcc not found"))
    with pytest.warns(UserWarning, match=r"gsplat cannot run here \(nvcc not found\); using the torch backend"):
        p = presets.get("full")
    assert (p.device, p.backend, p.num_gaussians) == ("cuda", "torch", 12_680)


def test_smoke_numbers(no_cuda: None) -> None:
    p = presets.get("smoke")
    assert (p.name, p.device, p.backend) == ("smoke", "cpu", "auto")
    assert (p.num_subjects, p.num_train_subjects, p.num_val_subjects, p.num_test_subjects) == (14, 10, 2, 2)
    assert (p.image_width, p.image_height) == (69, 100)
    assert (p.num_gaussians, p.fit.iterations, p.refine.steps) == (2_500, 200, 50)
    assert (p.decoder.latent_dim, p.decoder.embed_dim, p.num_views) == (512, 32, 16)


def test_full_numbers_match_paper(fake_cuda: None) -> None:
    p = presets.get("full")
    assert (p.name, p.device, p.backend) == ("full", "cuda", "gsplat")
    # the paper's 410 training and 7 test subjects, plus 10 val subjects to choose settings on
    assert (p.num_subjects, p.num_train_subjects, p.num_val_subjects, p.num_test_subjects) == (427, 410, 10, 7)
    assert (p.image_width, p.image_height) == (275, 401)
    # K: FLAME's 10,144 head points (the paper's K) plus the bust points over the shoulders
    from fastavatar_nb.data.bust import num_bust_points

    assert p.num_gaussians - num_bust_points(p.num_gaussians) == 10_144
    assert (p.num_gaussians, p.fit.iterations, p.refine.steps) == (12_680, 5_000, 300)
    assert (p.decoder.latent_dim, p.decoder.embed_dim) == (512, 32)
    # 275x401 is the 550x802 NeRSemble frame halved (rounded), keeping its aspect ratio.
    assert abs(p.image_width / p.image_height - 550 / 802) < 2e-3


def test_auto_follows_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastavatar_nb.render import gsplat_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert presets.get("auto").name == "smoke"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gsplat_backend, "gsplat_status", lambda: (True, "fake: kernels loaded"))
    assert presets.get("auto").name == "full"
    assert presets.get("  AUTO ").name == "full"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'laptop'.*smoke, course, full, auto"):
        presets.get("laptop")


def test_full_without_cuda_raises_unless_allowed(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PresetError, match="CUDA is not available"):
        presets.get("full")
    with pytest.warns(UserWarning, match="very slow"):
        p = presets.get("full", allow_cpu=True)
    assert (p.device, p.backend, p.num_gaussians) == ("cpu", "auto", 12_680)
    monkeypatch.setenv(presets.ALLOW_CPU_FULL_ENV, "1")
    with pytest.warns(UserWarning):
        assert presets.get("full").device == "cpu"
    with pytest.raises(PresetError):
        presets.get("full", allow_cpu=False)


def test_run_dir_default_is_repo_runs_even_from_notebooks_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cuda: None
) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "fastavatar_nb").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert presets.project_root() == tmp_path.resolve()
    assert presets.get("smoke").run_dir == tmp_path.resolve() / "runs" / "smoke"


def test_run_dir_falls_back_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cuda: None) -> None:
    monkeypatch.chdir(tmp_path)
    assert presets.get("smoke").run_dir == tmp_path.resolve() / "runs" / "smoke"


def test_run_dir_env_and_argument_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cuda: None
) -> None:
    monkeypatch.setenv(presets.RUN_DIR_ENV, str(tmp_path / "from_env"))
    assert presets.get("smoke").run_dir == (tmp_path / "from_env").resolve()
    assert presets.get("smoke", run_dir=tmp_path / "arg").run_dir == (tmp_path / "arg").resolve()
    assert presets.get("smoke").run_dir.is_absolute()


def test_overrides_and_validation(no_cuda: None, tmp_path: Path) -> None:
    p = presets.get("smoke", num_subjects=4, num_test_subjects=1, num_val_subjects=0, run_dir=tmp_path)
    assert (p.num_subjects, p.num_train_subjects) == (4, 3)
    with pytest.raises(PresetError, match="Unknown preset field"):
        presets.get("smoke", num_subject=4)
    with pytest.raises(PresetError, match="num_test_subjects"):
        presets.get("smoke", num_subjects=2, num_test_subjects=2, num_val_subjects=0)
    with pytest.raises(PresetError, match=r"num_val_subjects \(2\) must be smaller"):
        presets.get("smoke", num_subjects=4, num_test_subjects=2)
    assert presets.get("smoke", num_subjects=5, num_test_subjects=1).num_train_subjects == 2
    with pytest.raises(PresetError, match="num_gaussians"):
        p.replace(num_gaussians=0)
    with pytest.raises(PresetError, match="gsplat"):
        p.replace(backend="gsplat")
    with pytest.raises(PresetError, match="device"):
        p.replace(device="tpu")
    with pytest.raises(PresetError, match=r"fit: FitConfig.iterations must be a positive int, got 1.5"):
        p.replace(**{"fit.iterations": 1.5})
    with pytest.raises(PresetError, match=r"decoder: DecoderConfig: unknown fields \['epoch'\]"):
        p.replace(**{"decoder.epoch": 3})
    with pytest.raises(PresetError, match=r"Unknown stage 'decoders' in 'decoders.epochs'; stages are fit, template, decoder, encoder, editing, "):
        p.replace(**{"decoders.epochs": 3})
    with pytest.raises(PresetError, match=r"Unknown preset field\(s\) \['decoder_epochs'\].*decoder.FIELD"):
        p.replace(decoder_epochs=3)  # the earlier flat name: the message shows the stage form
    with pytest.raises(PresetError, match="refine: must be a RefineConfig"):
        p.replace(refine=3)


def test_frozen(no_cuda: None) -> None:
    p = presets.get("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_gaussians = 3  # type: ignore[misc]


def test_every_field_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(Preset))
    body = tree.body[0].body  # type: ignore[attr-defined]
    documented = set()
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            documented.add(stmt.target.id)  # type: ignore[union-attr]
    fields = {f.name for f in dataclasses.fields(Preset)}
    assert fields == documented
    required = {
        "name", "device", "backend", "num_subjects", "num_test_subjects", "image_width", "image_height",
        "num_gaussians", "fit", "template", "decoder", "encoder", "editing", "refine", "evaluation", "seed", "run_dir",
    }  # fmt: skip
    assert required <= fields


def test_describe_names_the_numbers(no_cuda: None, tmp_path: Path) -> None:
    line = presets.get("smoke", run_dir=tmp_path).describe()
    assert "\n" not in line
    for part in (
        "smoke",
        "14 subjects",
        "10 train / 2 val / 2 test",
        "69x100",
        "K=2,500",
        "200 it",
        "refine 50",
        "cpu",
        "auto",
    ):
        assert part in line


def test_save_load_round_trip(no_cuda: None, tmp_path: Path) -> None:
    p = presets.get("smoke", run_dir=tmp_path / "r", seed=7)
    path = p.save()
    assert path == tmp_path / "r" / "preset.json"
    assert json.loads(path.read_text())["num_gaussians"] == 2_500
    assert Preset.load(path) == p
    course = presets.base("course").replace(run_dir=tmp_path / "c")
    assert Preset.load(course.save()) == course  # the stage settings and the lesson survive JSON
    assert json.loads((tmp_path / "c" / "preset.json").read_text())["lesson"]["checkpoint"] is None
    # a preset.json of the earlier flat layout (stage sizes as preset fields, the rest in <stage>_settings, or
    # neither, as before the settings existed) reads as the stage configs it gave then
    flat = {k: v for k, v in p.to_dict().items() if k not in (*presets.STAGES, "lesson")}
    flat.update(fit_iterations=200, fit_batch_size=4, decoder_epochs=20, encoder_epochs=50, refine_iterations=50,
                latent_dim=512, embed_dim=32, mlp_dtype="auto", eval_input_views=4)
    (tmp_path / "old.json").write_text(json.dumps(flat))
    assert Preset.load(tmp_path / "old.json") == p and p.decoder.seed == p.encoder.seed == p.fit.seed == 7
    flat_course = {**flat, "name": "course", "seed": 0, "decoder_epochs": 48, "template_subjects": 32,
                   "num_subjects": 300, "num_test_subjects": 16, "num_val_subjects": 16, "eval_input_views": 2,
                   "run_dir": str(tmp_path / "c"), "lesson": {"image_fit_steps": 400, "checkpoint": None},
                   "decoder_settings": {"subjects_per_step": 4, "views_per_step": 4, "codes_init_std": 0.01},
                   "encoder_settings": {"mse_weight": 100.0, "photo_grid": [25, 17], "photo_weight": 20.0,
                                        "photo_jitter": 0.05},
                   "refine_settings": {"schedule": "code"}}
    (tmp_path / "old_course.json").write_text(json.dumps(flat_course))
    assert Preset.load(tmp_path / "old_course.json") == course


def test_presets_differ_in_listed_settings_only() -> None:
    from fastavatar_nb.decoder import DecoderConfig
    from fastavatar_nb.encoder import EncoderConfig
    from fastavatar_nb.fitting import FitConfig
    from fastavatar_nb.presets import Lesson
    from fastavatar_nb.refine import RefineConfig

    smoke, course, full = (presets.base(n) for n in ("smoke", "course", "full"))

    def differ(a, b):
        return {k for k, v in dataclasses.asdict(a).items() if dataclasses.asdict(b)[k] != v}

    # smoke: the configs' defaults (but for the MLP's dtype); course and full: smoke except the fields they list
    assert (differ(smoke.fit, FitConfig()), differ(smoke.decoder, DecoderConfig()), differ(smoke.encoder, EncoderConfig()),
            differ(smoke.refine, RefineConfig())) == (set(), {"mlp_dtype"}, set(), set())
    assert smoke.lesson == Lesson()
    assert differ(course.decoder, smoke.decoder) == {"epochs", "subjects_per_step", "views_per_step", "codes_init_std"}
    assert differ(course.encoder, smoke.encoder) == {"mse_weight", "photo_grid", "photo_weight", "photo_jitter"}
    assert (differ(course.fit, smoke.fit), differ(course.refine, smoke.refine)) == (set(), {"schedule"})
    assert (differ(course.template, smoke.template), differ(course.evaluation, smoke.evaluation),
            differ(course.editing, smoke.editing)) == ({"subjects"}, {"input_views"}, set())
    assert (course.template.subjects, course.evaluation.input_views, full.evaluation.input_views) == (
        presets.COURSE_TEMPLATE_SUBJECTS, presets.COURSE_EVAL_INPUT_VIEWS, None)
    assert course.decoder.codes_init_std == presets.COURSE_CODES_INIT_STD
    assert course.encoder.photo_grid == presets.COURSE_PHOTO_GRID
    assert differ(full.decoder, smoke.decoder) == {"epochs", "subjects_per_step", "views_per_step", "decoder_lr",
                                                   "codes_lr", "embeddings_lr"}
    assert (differ(full.fit, smoke.fit), differ(full.encoder, smoke.encoder), differ(full.refine, smoke.refine)) == (
        {"iterations", "batch_size"}, {"epochs", "lr"}, {"steps"})
    # a stage field by its dotted name (as --set gives it); a new seed reaches every stage
    tweaked = smoke.replace(**{"decoder.epochs": 3, "refine.schedule": "code"}, seed=4)
    assert (tweaked.decoder.epochs, tweaked.refine.schedule, tweaked.decoder.views_per_step) == (3, "code", 2)
    assert tweaked.seed == tweaked.fit.seed == tweaked.decoder.seed == tweaked.encoder.seed == tweaked.editing.seed == 4
    assert smoke.replace(seed=4, decoder=smoke.decoder).decoder.seed == 0  # a stage given whole is kept as given

    assert course.refine.schedule == presets.COURSE_REFINE_SCHEDULE != smoke.refine.schedule
    assert course.refine.replace(schedule="joint", steps=3) == RefineConfig(steps=3, schedule="joint")
    with pytest.raises(ValueError, match=r"RefineConfig: unknown fields \['mode'\]"):
        smoke.refine.replace(mode="code")
    assert (course.lesson.checkpoint, full.lesson.checkpoint, smoke.lesson.checkpoint) == (None, None, "course")
    assert full.lesson.head_fit_steps > 0 == course.lesson.head_fit_steps
    with pytest.raises(presets.PresetError, match=r"decoder: DecoderConfig: unknown fields \['epoch'\]"):
        smoke.replace(decoder={"epoch": 3})  # a dict (as preset.json holds it) is read as the stage's config
    with pytest.raises(presets.PresetError, match="lesson has unknown fields"):
        smoke.replace(lesson={"steps": 3})
    with pytest.raises(presets.PresetError, match="Lesson.viewer_width must be a positive int"):
        Lesson(viewer_width=0)


def test_setup_seeds_and_reports(no_cuda: None, tmp_path: Path) -> None:
    p = presets.get("smoke", run_dir=tmp_path / "run", seed=3)
    text = runtime.setup(p)
    first = (torch.rand(3), np.random.rand(), random.random())
    runtime.setup(p)
    second = (torch.rand(3), np.random.rand(), random.random())
    torch.testing.assert_close(first[0], second[0])
    assert first[1:] == second[1:]
    assert f"torch {torch.__version__}" in text and "numpy" in text and "gsplat" in text
    assert "device cpu" in text and "backend auto -> numba" in text and "seed 3" in text
    assert Preset.load(tmp_path / "run" / "preset.json") == p


def test_base_is_untouched_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(presets.RUN_DIR_ENV, str(tmp_path))
    assert presets.base("full").run_dir == Path("runs") / "full"
    assert presets.base("full").device == "cuda"
    with pytest.raises(PresetError, match="smoke, course, full"):
        presets.base("auto")


def test_set_values_are_parsed_once_and_read_from_the_environment(no_cuda: None, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    assert presets.parse_sets(["decoder.epochs=4", "refine.schedule=code", "encoder.photo_grid=[5, 3]",
                               "template_subjects=null", "seed=2"]) == {
        "decoder.epochs": 4, "refine.schedule": "code", "encoder.photo_grid": [5, 3], "template_subjects": None,
        "seed": 2}
    with pytest.raises(PresetError, match=r"--set needs FIELD=VALUE \(e.g. decoder.epochs=4\), got 'epochs'"):
        presets.parse_sets(["epochs"])
    monkeypatch.setenv(presets.SET_ENV, '{"decoder.epochs": 4, "num_subjects": 20}')
    p = presets.get("smoke", run_dir=tmp_path)
    assert (p.decoder.epochs, p.num_subjects, p.encoder.photo_grid) == (4, 20, (0, 0))
    assert presets.get("smoke", run_dir=tmp_path, num_subjects=30).num_subjects == 30  # an argument wins
    monkeypatch.setenv(presets.SET_ENV, "decoder.epochs=4")
    with pytest.raises(PresetError, match="FASTAVATAR_SET='decoder.epochs=4': not JSON"):
        presets.get("smoke", run_dir=tmp_path)
