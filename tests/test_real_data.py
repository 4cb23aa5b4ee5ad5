"""Real data (``--data``): the up-front check, labels, split, the run's cached copy, presets and the CLI.

Synthetic subjects written in the NeRSemble/VHAP layout (the repository's ``data_samples/``, copied)
stand in for a user's export; the two real NeRSemble subjects in ``../shared/data/nersemble_samples``
are used where present (skipped cleanly otherwise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook
from PIL import Image

from fastavatar_nb import cli, pipeline, presets
from fastavatar_nb.data import SubjectDataset, read_subject
from fastavatar_nb.data.real import (
    DatasetCheckError,
    check_dataset,
    default_real_counts,
    prepare_real_dataset,
    read_labels,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
_ENVS = (presets.RUN_DIR_ENV, presets.PRESET_ENV, presets.ALLOW_CPU_FULL_ENV, presets.DATA_ENV,
         presets.DATA_SPLIT_ENV, presets.DATA_LABELS_ENV, presets.DATA_TIMESTEP_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Four synthetic subjects in the NeRSemble/VHAP layout (a copy of ``data_samples/``, 69x100, K = 2,500)."""
    root = tmp_path / "export"
    root.mkdir()
    for d in sorted(SAMPLES.glob("synth_*")):
        shutil.copytree(d, root / d.name)
    return root


def _set_frame(folder: Path, camera: int, **changes) -> None:
    path = folder / "transforms.json"
    meta = json.loads(path.read_text())
    for f in meta["frames"]:
        if f["camera_index"] == camera:
            f.update(changes)
    path.write_text(json.dumps(meta))


# ------------------------------------------------------------------ the check
def test_check_accepts_a_clean_export(source: Path) -> None:
    check = check_dataset(source)
    assert check.ok, check.report()
    assert check.subject_ids == ["synth_000", "synth_001", "synth_002", "synth_003"]
    assert (check.num_views, check.image_size, check.num_points) == (16, (69, 100), 2500)
    assert "no problems found" in check.report()


def test_check_lists_every_problem_with_subject_and_file(source: Path) -> None:
    (source / "synth_000" / "images" / "00000_03.png").unlink()                      # a missing view
    masks = source / "synth_001" / "fg_masks"
    shutil.copy(masks / "00000_00.png", masks / "00000_05.png")                        # the mask of another view
    Image.open(masks / "00000_07.png").resize((40, 60)).save(masks / "00000_07.png")   # a mask of another size
    ply = source / "synth_002" / "points3d.ply"
    lines = ply.read_text().splitlines()
    n = int(lines[2].split()[2])
    body = lines[lines.index("end_header") + 1:]
    ply.write_text("\n".join([*lines[:2], f"element vertex {n - 10}", *lines[3:lines.index("end_header") + 1],
                              *body[:n - 10]]) + "\n")                                 # another K
    meta = json.loads((source / "synth_003" / "transforms.json").read_text())
    m = np.array(meta["frames"][2]["transform_matrix"])
    m[:3, :3] *= 1.1
    _set_frame(source / "synth_003", 2, transform_matrix=m.tolist())                    # a scaled camera
    m[0, 0] = float("nan")
    _set_frame(source / "synth_003", 4, transform_matrix=m.tolist())                   # NaN in a camera
    img = source / "synth_003" / "images" / "00000_09.png"
    Image.open(img).resize((70, 100)).save(img)                                         # an image of another size
    (source / "SYNTH_000").mkdir()                                                      # a duplicate id (case)
    shutil.copy(source / "synth_000" / "transforms.json", source / "SYNTH_000" / "transforms.json")

    check = check_dataset(source)
    text = check.report()
    problems = [(p.subject, p.path.relative_to(source).as_posix(), p.problem) for p in check.problems]

    def has(subject: str, file: str, words: str) -> bool:
        return any(s == subject and f == file and words in p for s, f, p in problems)

    assert has("synth_000", "synth_000/images/00000_03.png", "missing"), text
    assert has("synth_001", "synth_001/fg_masks/00000_05.png", "does not match its image"), text
    assert has("synth_001", "synth_001/fg_masks/00000_07.png", "mask is 40x60"), text
    assert has("synth_002", "synth_002/points3d.ply", "K = 2490"), text
    assert has("synth_003", "synth_003/transforms.json", "not rigid"), text
    assert has("synth_003", "synth_003/transforms.json", "non-finite"), text
    assert has("synth_003", "synth_003/images/00000_09.png", "70x100"), text
    assert has("SYNTH_000", "SYNTH_000", "duplicate subject id"), text
    assert "problem(s) in 5 subject(s)" in text
    with pytest.raises(DatasetCheckError, match="synth_000/images/00000_03.png"):
        check.raise_if_problems()


def test_check_split_file_and_labels(source: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["synth_000", "synth_001"], "test": ["synth_001", "nobody"]}))
    labels = tmp_path / "labels.csv"
    labels.write_text("subject,smiling\nsynth_000,1\nghost,0\n")
    text = check_dataset(source, split_file=split, labels_file=labels, content=False).report()
    assert "duplicate subject id 'synth_001'" in text and "['nobody']" in text and "['ghost']" in text


def test_check_names_points3d_too_small_for_the_presets_k(source: Path) -> None:
    check = check_dataset(source, content=False, num_points=5000)  # 4,000 head points needed, 2,500 there
    assert len(check.problems) == 4 and all("needs 4000 head points" in p.problem for p in check.problems)
    assert check_dataset(source, content=False, num_points=3000).ok  # 2,400 head points: enough


def test_missing_transforms_is_a_problem_not_a_silent_skip(source: Path) -> None:
    (source / "synth_002" / "transforms.json").unlink()
    check = check_dataset(source, content=False)
    assert [(p.subject, p.path.name) for p in check.problems] == [("synth_002", "transforms.json")]


def test_read_labels_types_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("subject,smiling,age,hair\n306,yes,31,dark\n369,no,,blond\n")
    assert read_labels(path) == {"306": {"smiling": True, "age": 31.0, "hair": "dark"},
                                 "369": {"smiling": False, "hair": "blond"}}
    path.write_text("name,smiling\n306,1\n")
    with pytest.raises(ValueError, match="first column must be the subject id"):
        read_labels(path)
    path.write_text("subject,smiling\n306,1\n306,0\n")
    with pytest.raises(ValueError, match=r"duplicate subject ids \['306'\]"):
        read_labels(path)
    path.write_text("subject,smiling\n306,1,2\n")
    with pytest.raises(ValueError, match="line 2 has 3 cells"):
        read_labels(path)


def test_default_real_counts() -> None:
    assert default_real_counts(2, 2) == (1, 0)
    assert default_real_counts(14, 2) == (2, 1)
    assert default_real_counts(417, 10) == (7, 10)


# ------------------------------------------------------------------ the run's copy
def test_prepare_caches_resized_subjects_with_bust_labels_and_split(source: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("subject,glasses\nsynth_000,1\nsynth_001,0\nsynth_002,1\nsynth_003,0\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["synth_000", "synth_001"], "val": ["synth_002"], "test": ["synth_003"]}))
    root = tmp_path / "run" / "dataset"
    prepare_real_dataset(source, root, 20, 29, 300, split_file=split, labels_file=labels, progress=False)
    train = SubjectDataset(root, "train")
    assert train.subject_ids == ["synth_000", "synth_001"]
    assert SubjectDataset(root, "val").subject_ids == ["synth_002"]
    s = train[0]
    assert (s.width, s.height, s.num_points, s.num_views) == (20, 29, 300, 16)
    assert s.attributes["glasses"] is True and train[1].attributes["glasses"] is False
    assert s.mask_coverage(s.points[:-60]).min() > 0.8  # the head points (not the 60 bust points) land in the masks
    orig = read_subject(source / "synth_000", 20, 29)
    torch.testing.assert_close(s.cameras.Ks, orig.cameras.Ks, atol=1e-3, rtol=0)
    stamps = [(root / name).stat().st_mtime_ns for name in ("synth_000/transforms.json", "split.json")]
    prepare_real_dataset(source, root, 20, 29, 300, split_file=split, labels_file=labels, progress=False)
    assert [(root / name).stat().st_mtime_ns for name in ("synth_000/transforms.json", "split.json")] == stamps
    with pytest.raises(FileExistsError, match="width differ"):
        prepare_real_dataset(source, root, 30, 29, 300, split_file=split, labels_file=labels, progress=False)


def test_prepare_refuses_a_broken_export_and_writes_nothing(source: Path, tmp_path: Path) -> None:
    (source / "synth_001" / "fg_masks" / "00000_12.png").unlink()
    root = tmp_path / "run" / "dataset"
    with pytest.raises(DatasetCheckError, match=r"subject synth_001: .*00000_12.png: mask of the frame"):
        prepare_real_dataset(source, root, 20, 29, 300, num_test=1, progress=False)
    assert not root.exists()


def test_prepare_refuses_a_run_folder_with_synthetic_data(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "run" / "dataset"
    shutil.copytree(source / "synth_000", root / "synth_000")
    with pytest.raises(FileExistsError, match="not this run's real data"):
        prepare_real_dataset(source, root, 20, 29, 300, num_test=1, progress=False)


# ------------------------------------------------------------------ presets
def test_presets_with_data_take_counts_and_run_folder_from_it(source: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = presets.get("smoke", data=source)
    assert (p.num_subjects, p.num_test_subjects, p.num_val_subjects) == (4, 1, 0)
    assert p.run_dir == tmp_path.resolve() / "runs" / "smoke-export" and p.data == source.resolve()
    assert "4 real NeRSemble/VHAP subjects" in p.describe_data()
    assert presets.Preset.load(p.save(tmp_path / "p.json")) == p
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["synth_000", "synth_001"], "val": ["synth_002"], "test": ["synth_003"]}))
    monkeypatch.setenv(presets.DATA_ENV, str(source))
    monkeypatch.setenv(presets.DATA_SPLIT_ENV, str(split))
    monkeypatch.setenv(presets.DATA_TIMESTEP_ENV, "0")
    q = presets.get("smoke")
    assert (q.num_train_subjects, q.num_val_subjects, q.num_test_subjects, q.data_timestep) == (2, 1, 1, 0)
    split.write_text(json.dumps({"train": ["synth_000"], "test": ["synth_003"]}))
    with pytest.raises(presets.PresetError, match="lists 2 of the 4 subjects"):
        presets.get("smoke")
    monkeypatch.delenv(presets.DATA_SPLIT_ENV)
    monkeypatch.setenv(presets.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(presets.PresetError, match="nowhere"):
        presets.get("smoke")


def test_presets_without_data_are_unchanged(tmp_path: Path) -> None:
    p = presets.get("smoke", run_dir=tmp_path)
    assert p.data is None and p.num_subjects == 14 and p.describe_data().startswith("data: synthetic heads")
    with pytest.raises(presets.PresetError, match="need data"):
        presets.get("smoke", run_dir=tmp_path, data_labels=tmp_path / "x.csv")


# ------------------------------------------------------------------ the CLI
def _notebooks(folder: Path) -> Path:
    folder.mkdir()
    nb = new_notebook(cells=[new_code_cell("print('ran')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "00_a.ipynb")
    return folder


def test_cli_refuses_a_broken_export_before_running(source: Path, tmp_path: Path, capsys) -> None:
    (source / "synth_002" / "images" / "00000_06.png").unlink()
    out = tmp_path / "runs"
    (out / "smoke").mkdir(parents=True)
    (out / "smoke" / "preset.json").write_text("mine")
    code = cli.main(["run", "--preset", "smoke", "--data", str(source), "--out", str(out),
                     "--notebooks", str(_notebooks(tmp_path / "nb"))])
    err = capsys.readouterr().err
    assert code == 2
    assert "subject synth_002" in err and "images/00000_06.png" in err and "missing" in err
    assert "nothing was run" in err
    assert sorted(p.name for p in (out / "smoke").iterdir()) == ["preset.json"]
    assert (out / "smoke" / "preset.json").read_text() == "mine"


def test_cli_data_options_need_data(tmp_path: Path, capsys) -> None:
    code = cli.main(["run", "--preset", "smoke", "--labels", "x.csv", "--out", str(tmp_path), "--dry-run"])
    assert code == 2 and "--labels need --data" in capsys.readouterr().err


def test_cli_dry_run_with_data_checks_and_names_the_data(source: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["run", "--preset", "smoke", "--data", str(source), "--out", str(tmp_path / "runs"),
                     "--notebooks", str(_notebooks(tmp_path / "nb")), "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0 and "4 real NeRSemble/VHAP subjects" in printed and "no problems found" in printed
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["one subject", "all in test", "none in test"])
def test_cli_refuses_a_folder_that_cannot_train_or_score_before_writing(source: Path, tmp_path: Path, capsys,
                                                                         case: str) -> None:
    args = ["--data", str(source)]
    if case == "one subject":
        for d in ("synth_001", "synth_002", "synth_003"):
            shutil.rmtree(source / d)
    else:
        ids = sorted(p.name for p in source.iterdir() if p.is_dir())
        split = tmp_path / "split.json"
        split.write_text(json.dumps({"train": [] if case == "all in test" else ids,
                                     "test": ids if case == "all in test" else []}))
        args += ["--split", str(split)]
    out = tmp_path / "runs"
    code = cli.main(["run", "--preset", "smoke", *args, "--out", str(out), "--notebooks", str(_notebooks(tmp_path / "nb"))])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    want = {"one subject": "needs at least 2: a training subject", "all in test": "lists no train subject: nothing can be "
            "learnt", "none in test": "lists no test subject: nothing can be scored"}[case]
    assert want in " ".join(err.split()), err


def test_cli_says_up_front_what_few_training_subjects_cannot_teach(source: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["run", "--preset", "smoke", "--data", str(source), "--out", str(tmp_path / "runs"),
                     "--notebooks", str(_notebooks(tmp_path / "nb")), "--dry-run"])
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "Note: 3 training subject(s) and 1 test subject(s)" in printed
    assert "cannot learn from so few" in printed


# ------------------------------------------------------------------ the two real NeRSemble subjects
@pytest.fixture
def real_root(shared_dir: Path) -> Path:
    root = shared_dir / "data" / "nersemble_samples"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


def test_real_samples_pass_the_check(real_root: Path) -> None:
    check = check_dataset(real_root)
    assert check.ok, check.report()
    assert (check.num_views, check.image_size, check.num_points) == (16, (550, 802), 10144)


def test_real_samples_through_the_pipeline(real_root: Path, tmp_path: Path) -> None:
    """One train and one test subject: cached at a tiny size, a 4-step template, no val subjects."""
    p = presets.get("smoke", data=real_root, run_dir=tmp_path / "run", image_width=20, image_height=29,
                    num_gaussians=300, **{"fit.iterations": 4, "fit.batch_size": 1})
    assert (p.num_train_subjects, p.num_val_subjects, p.num_test_subjects) == (1, 0, 1)
    root = pipeline.prepare_dataset(p, progress=False)
    assert json.loads((root / "source.json").read_text())["source"] == str(real_root.resolve())
    train, test = SubjectDataset(root, "train"), SubjectDataset(root, "test")
    assert len(train) == 1 and len(test) == 1 and train.subject_ids != test.subject_ids
    s = test[0]
    assert (s.width, s.height, s.num_points) == (20, 29, 300) and s.attributes == {}
    with pytest.warns(pipeline.NoValidationSubjectsWarning, match="optimistic"):
        val = pipeline.validation_subjects(p, root)
    assert val.subject_ids == train.subject_ids
    template = pipeline.ensure_template(p, train, progress=False)
    assert template.num_gaussians == 300 and bool(torch.isfinite(template.means).all())
