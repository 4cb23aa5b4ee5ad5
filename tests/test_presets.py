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
    assert (p.num_gaussians, p.fit_iterations, p.refine_iterations) == (2_500, 200, 50)
    assert (p.latent_dim, p.embed_dim, p.num_views) == (512, 32, 16)


def test_full_numbers_match_paper(fake_cuda: None) -> None:
    p = presets.get("full")
    assert (p.name, p.device, p.backend) == ("full", "cuda", "gsplat")
    # the paper's 410 training and 7 test subjects, plus 10 val subjects to choose settings on
    assert (p.num_subjects, p.num_train_subjects, p.num_val_subjects, p.num_test_subjects) == (427, 410, 10, 7)
    assert (p.image_width, p.image_height) == (275, 401)
    # K: FLAME's 10,144 head points (the paper's K) plus the bust points over the shoulders
    from fastavatar_nb.data.bust import num_bust_points

    assert p.num_gaussians - num_bust_points(p.num_gaussians) == 10_144
    assert (p.num_gaussians, p.fit_iterations, p.refine_iterations) == (12_680, 5_000, 300)
    assert (p.latent_dim, p.embed_dim) == (512, 32)
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
    with pytest.raises(PresetError, match="fit_iterations"):
        p.replace(fit_iterations=1.5)


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
        "num_gaussians", "fit_iterations", "fit_batch_size", "decoder_epochs", "encoder_epochs",
        "refine_iterations", "latent_dim", "embed_dim", "seed", "run_dir",
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
    # a preset.json written before the stage settings existed reads with the smoke preset's (empty) ones
    old = json.loads(path.read_text())
    for key in ("decoder_settings", "encoder_settings", "refine_settings", "lesson"):
        del old[key]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Preset.load(tmp_path / "old.json") == p


def test_presets_differ_in_listed_settings_only() -> None:
    from fastavatar_nb.presets import Lesson

    smoke, course, full = (presets.base(n) for n in ("smoke", "course", "full"))
    assert smoke.decoder_settings == smoke.encoder_settings == smoke.refine_settings == {} and smoke.lesson == Lesson()
    assert course.decoder_settings["codes_init_std"] == presets.COURSE_CODES_INIT_STD
    assert course.encoder_settings == {"mse_weight": presets.COURSE_MSE_WEIGHT, "photo_grid": list(presets.COURSE_PHOTO_GRID),
                                       "photo_weight": presets.COURSE_PHOTO_WEIGHT,
                                       "photo_jitter": presets.COURSE_PHOTO_JITTER}
    from fastavatar_nb.refine import RefineConfig

    assert RefineConfig.for_preset(course).schedule == presets.COURSE_REFINE_SCHEDULE != RefineConfig.for_preset(smoke).schedule
    assert RefineConfig.for_preset(course, schedule="joint", steps=3) == RefineConfig(steps=3, schedule="joint")
    with pytest.raises(ValueError, match=r"refine_settings name unknown fields \['mode'\]"):
        RefineConfig.for_preset(smoke.replace(refine_settings={"mode": "code"}))
    assert (course.lesson.checkpoint, full.lesson.checkpoint, smoke.lesson.checkpoint) == (None, None, "course")
    assert full.lesson.head_fit_steps > 0 == course.lesson.head_fit_steps
    with pytest.raises(presets.PresetError, match="decoder_settings must map config field names"):
        smoke.replace(decoder_settings=["epochs"])
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
