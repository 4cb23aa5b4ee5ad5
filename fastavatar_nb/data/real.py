"""Real NeRSemble/VHAP subjects as a run's dataset (``fastavatar-nb run --data DIR``).

A run on real data reads a *source* folder of subject folders in the NeRSemble/VHAP layout
(:mod:`fastavatar_nb.data.nersemble`) and never writes into it. Three steps, each a function:

1. :func:`check_dataset`: every subject folder is checked up front, before any compute, and one
   :class:`DatasetCheck` lists everything wrong and where (missing views, images of another
   size, masks that do not match their images, a ``points3d.ply`` with another ``K`` than the
   others, non-finite or non-rigid camera matrices, duplicate subject ids, a split file or label
   CSV naming unknown subjects). Reading headers only, except ``content=True`` (default), which
   also decodes every image and mask once to catch a mask that belongs to another photo.
2. :func:`real_split`: train/val/test by subject, from a user's split file (``{"train": [...],
   "val": [...], "test": [...]}``, e.g. the paper's 410 / 7) or from
   :func:`~fastavatar_nb.data.nersemble.split_subjects` with :func:`default_real_counts`.
3. :func:`prepare_real_dataset`: each subject read at the preset's size and timestep, given the
   preset's ``K`` corresponded points (its FLAME points thinned in index order to the head part,
   plus bust points from the visual hull of its masks, :func:`~fastavatar_nb.data.bust.with_bust`),
   labelled from the CSV, and cached in the run folder (``<run>/dataset/<id>/``, same layout), so
   later stages never decode the 550x802 frames again. ``<run>/dataset/source.json`` records where
   the cache came from; a run folder holding another dataset is refused, never overwritten.

Label CSV (:func:`read_labels`): a header row whose first column is ``subject`` (or ``subject_id``,
``id``), then one column per attribute; one row per subject. A column whose values are all
``0/1/true/false/yes/no`` is boolean (what notebook 05 learns directions from), a numeric one is a
float, anything else a string; an empty cell leaves that attribute unset for that subject.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..ply import PlyError, parse_header
from .nersemble import (
    SubjectFormatError,
    default_num_test,
    frame_value,
    read_subject,
    select_frames,
    split_subjects,
    write_split,
    write_subject,
)
from .subject import AttributeValue

__all__ = [
    "SOURCE_FILE", "DataProblem", "DatasetCheck", "DatasetCheckError", "check_dataset", "read_labels",
    "default_real_counts", "real_split", "source_record", "check_cache", "prepare_real_dataset",
]

NO_TRAIN_SUBJECT = ("nothing can be learnt: the template, the auto-decoder and the encoder learn from the training "
                    "subjects; put at least one subject in 'train'")
"""What a split without training subjects cannot do (one sentence of the refusal)."""
NO_TEST_SUBJECT = ("nothing can be scored: the feed-forward and refined heads are measured on people the models have "
                   "never seen (notebooks 06 and 07); put at least one subject in 'test'")
"""What a split without test subjects cannot do (one sentence of the refusal)."""
SOURCE_FILE = "source.json"
"""In ``<run>/dataset/``: where a cached real dataset came from (source folder, timestep, size, K, split, labels)."""

_ID_COLUMNS = ("subject", "subject_id", "id")
_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f"}


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a source dataset: which subject, which file, what."""

    subject: str
    """Subject id (folder name), or ``""`` for the dataset as a whole (split file, label CSV)."""
    path: Path
    """The file or folder at fault."""
    problem: str
    """What was expected and what was found."""

    def __str__(self) -> str:
        who = f"subject {self.subject}: " if self.subject else ""
        return f"{who}{self.path}: {self.problem}"


@dataclass
class DatasetCheck:
    """What :func:`check_dataset` found. ``ok`` when ``problems`` is empty."""

    root: Path
    subject_ids: list[str]
    """Every subject folder (a child of ``root`` holding ``transforms.json``), sorted."""
    num_views: int | None
    """Views per subject (the most common count)."""
    image_size: tuple[int, int] | None
    """``(width, height)`` of the frames (the most common size)."""
    num_points: int | None
    """``K`` of ``points3d.ply`` (the most common count)."""
    problems: list[DataProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        """A few lines: the summary, then one line per problem (grouped by subject)."""
        size = f"{self.image_size[0]}x{self.image_size[1]}" if self.image_size else "?"
        head = (f"{self.root}: {len(self.subject_ids)} subject folders, {self.num_views} views at {size}, "
                f"K = {self.num_points} points ({self.seconds:.1f} s to check)")
        if self.ok:
            return head + "; no problems found"
        bad = sorted({p.subject for p in self.problems if p.subject})
        lines = [head, f"{len(self.problems)} problem(s) in {len(bad)} subject(s) {bad}"
                 + (" and in the dataset's files" if any(not p.subject for p in self.problems) else "") + ":"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def raise_if_problems(self) -> DatasetCheck:
        if not self.ok:
            raise DatasetCheckError(self)
        return self


class DatasetCheckError(ValueError):
    """A source dataset with problems; the message is :meth:`DatasetCheck.report` and what to do."""

    def __init__(self, check: DatasetCheck) -> None:
        self.check = check
        super().__init__(check.report() + "\nFix or remove these subject folders (or the split/label file) and run "
                         "again; nothing was trained and nothing in the run folder was written.")


# ------------------------------------------------------------------------ checking
def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _check_matrix(c2w: Any) -> str | None:
    """Why ``transform_matrix`` is not a finite rigid 4x4 (None when it is)."""
    try:
        m = np.asarray(c2w, dtype=np.float64)
    except (TypeError, ValueError):
        return "transform_matrix is not a 4x4 array of numbers"
    if m.shape != (4, 4):
        return f"transform_matrix must be 4x4, found shape {m.shape}"
    if not np.isfinite(m).all():
        return "transform_matrix has non-finite values (NaN or inf)"
    if np.abs(m[3] - [0, 0, 0, 1]).max() > 1e-6:
        return f"transform_matrix's last row must be [0, 0, 0, 1], found {m[3].tolist()}"
    r = m[:3, :3]
    err = np.abs(r.T @ r - np.eye(3)).max()
    det = np.linalg.det(r)
    if err > 1e-3 or abs(det - 1) > 1e-3:
        return (f"transform_matrix is not rigid: its rotation part has |R^T R - I| = {err:.3g} and det = {det:.4f} "
                "(expected an orthonormal rotation, det +1, and no scale)")
    return None


def _check_mask_content(img_path: Path, mask_path: Path) -> str | None:
    """Why a mask does not belong to its image (None when it does): NeRSemble frames are composited on
    white, so the mask's background must be white in the image and its foreground mostly not."""
    img = np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float32) / 255.0
    with Image.open(mask_path) as im:
        mask = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    bg, fg = mask < 0.05, mask > 0.95
    if bg.sum() < 100 or fg.sum() < 100:
        return (f"mask has {int(fg.sum())} foreground and {int(bg.sum())} background pixels "
                "(expected a head in front of a white background)")
    nonwhite_bg = float((img[bg].min(-1) < 0.9).mean())
    white_fg = float((img[fg].min(-1) > 0.99).mean())
    if nonwhite_bg > 0.02 or white_fg > 0.5:
        return (f"mask does not match its image {img_path.name}: {nonwhite_bg:.1%} of the mask's background is "
                f"not white in the image and {white_fg:.1%} of its foreground is pure white (expected about 0% "
                "and well under 50%: images are composited on white with their own mask)")
    return None


def _check_subject(folder: Path, timestep: int | None, content: bool) -> tuple[list[DataProblem], dict]:
    """Problems of one subject folder and what it holds (views, size, K)."""
    sid = folder.name
    out: list[DataProblem] = []
    info: dict[str, Any] = {}
    tpath = folder / "transforms.json"
    try:
        meta = json.loads(tpath.read_text())
        if not isinstance(meta, dict):
            raise SubjectFormatError("expected a JSON object at the top level")
        frames = select_frames(meta, tpath, timestep)
    except (OSError, ValueError) as e:  # JSONDecodeError and SubjectFormatError are ValueErrors
        msg = str(e).removeprefix(f"{tpath}: ")
        return [DataProblem(sid, tpath, f"cannot read the frames: {msg}")], info
    info["views"] = len(frames)
    info["cameras"] = tuple(int(f["camera_index"]) for f in frames)
    sizes: set[tuple[int, int]] = set()
    for i, f in enumerate(frames):
        cam = f"frame of camera_index {f['camera_index']}"
        try:
            w, h = int(frame_value(f, meta, "w", tpath, i)), int(frame_value(f, meta, "h", tpath, i))
            k = [float(frame_value(f, meta, key, tpath, i)) for key in ("fl_x", "fl_y", "cx", "cy")]
            img_rel, mask_rel = f["file_path"], f["fg_mask_path"]
        except KeyError as e:
            out.append(DataProblem(sid, tpath, f"{cam} has no {e}"))
            continue
        except (SubjectFormatError, TypeError, ValueError) as e:
            out.append(DataProblem(sid, tpath, f"{cam}: {str(e).removeprefix(f'{tpath}: ')}"))
            continue
        if not all(math.isfinite(x) for x in k) or k[0] <= 0 or k[1] <= 0:
            out.append(DataProblem(sid, tpath, f"{cam} has intrinsics fl_x, fl_y, cx, cy = {k} (expected finite, "
                                               "positive focal lengths)"))
        why = _check_matrix(f.get("transform_matrix"))
        if why:
            out.append(DataProblem(sid, tpath, f"{cam}: {why}"))
        sizes.add((w, h))
        img, mask = folder / img_rel, folder / mask_rel
        img_size = mask_size = None
        for path, kind in ((img, "image"), (mask, "mask")):
            if not path.is_file():
                out.append(DataProblem(sid, path, f"{kind} of the {cam} is missing"))
                continue
            try:
                size = _image_size(path)
            except (OSError, SyntaxError, ValueError) as e:
                out.append(DataProblem(sid, path, f"unreadable {kind} ({type(e).__name__}: {e})"))
                continue
            if kind == "image":
                img_size = size
            else:
                mask_size = size
        if img_size is not None and img_size != (w, h):
            out.append(DataProblem(sid, img, f"image is {img_size[0]}x{img_size[1]} (WxH) but transforms.json says "
                                             f"w={w}, h={h}"))
        if img_size is not None and mask_size is not None:
            if mask_size != img_size:
                out.append(DataProblem(sid, mask, f"mask is {mask_size[0]}x{mask_size[1]} (WxH) but its image "
                                                  f"{img_rel} is {img_size[0]}x{img_size[1]}"))
            elif content:
                why = _check_mask_content(img, mask)
                if why:
                    out.append(DataProblem(sid, mask, why))
    if len(sizes) > 1:
        out.append(DataProblem(sid, tpath, f"frames have different image sizes {sorted(sizes)} (a subject needs one)"))
    elif sizes:
        info["size"] = sizes.pop()
    ply = folder / "points3d.ply"
    if not ply.is_file():
        out.append(DataProblem(sid, ply, "points3d.ply is missing (the subject's corresponded FLAME points)"))
    else:
        try:
            with open(ply, "rb") as fh:
                _, elements, _ = parse_header(fh, ply)
            vertex = [n for name, n, _ in elements if name == "vertex"]
            if not vertex:
                raise PlyError(f"{ply}: no 'vertex' element")
            info["K"] = vertex[0]
            if content:
                from ..gaussians import read_points_ply

                pts = read_points_ply(ply)[0]
                if not bool(pts.isfinite().all()):
                    out.append(DataProblem(sid, ply, "points have non-finite coordinates"))
        except (PlyError, OSError, ValueError) as e:
            out.append(DataProblem(sid, ply, f"unreadable PLY ({str(e).removeprefix(f'{ply}: ')})"))
    return out, info


def _majority(values: list) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


def check_dataset(root: str | os.PathLike, timestep: int | None = None, split_file: str | os.PathLike | None = None,
                  labels_file: str | os.PathLike | None = None, content: bool = True,
                  progress: bool = False, num_points: int | None = None) -> DatasetCheck:
    """Check every subject folder of ``root`` (and the split file and label CSV) before a long run.

    Reads every ``transforms.json`` and the headers of every image, mask and ``points3d.ply``;
    ``content=True`` also decodes each image and mask once (about 35 ms per view on one core) to
    find masks that belong to another photo, and reads the points to find non-finite ones.
    Never raises for a problem of the data: every problem is a :class:`DataProblem` in the result
    (call :meth:`DatasetCheck.raise_if_problems`).

    Args:
        root: folder of subject folders.
        timestep: the timestep every subject must have (default each one's first).
        split_file, labels_file: optional split JSON and label CSV, checked against the subjects.
        content: also decode images, masks and points (see above).
        progress: a progress bar over the subjects.
        num_points: the run's ``K``: every ``points3d.ply`` must then hold at least its head part
            (``K - num_bust_points(K)`` points; the rest are bust points fitted later).

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no subject folder.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: the folder does not exist; expected a folder of NeRSemble/VHAP "
                                "subject folders (each with transforms.json, images/, fg_masks/, points3d.ply)")
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    subjects = [p for p in children if (p / "transforms.json").is_file()]
    problems: list[DataProblem] = []
    for p in children:
        if p not in subjects and any((p / x).exists() for x in ("images", "fg_masks", "points3d.ply")):
            problems.append(DataProblem(p.name, p / "transforms.json", "transforms.json is missing: the folder has "
                                        "images/fg_masks/points3d.ply but no cameras"))
    if not subjects and not problems:
        raise FileNotFoundError(f"--data {root}: holds no subject folders (sub-folders with transforms.json); "
                                "expected the NeRSemble/VHAP layout <root>/<subject>/transforms.json")
    folded = Counter(p.name.casefold() for p in subjects)
    for p in subjects:
        if folded[p.name.casefold()] > 1:
            problems.append(DataProblem(p.name, p, "duplicate subject id: another folder has the same name up to "
                                        "upper/lower case"))
    infos: dict[str, dict] = {}
    for p in tqdm(subjects, desc="checking subjects", unit="subject", disable=not progress):
        found, info = _check_subject(p, timestep, content)
        problems += found
        infos[p.name] = info
    views = _majority([i["views"] for i in infos.values() if "views" in i])
    cameras = _majority([i["cameras"] for i in infos.values() if "cameras" in i])
    size = _majority([i["size"] for i in infos.values() if "size" in i])
    k = _majority([i["K"] for i in infos.values() if "K" in i])
    for sid, i in infos.items():
        folder = root / sid
        if "cameras" in i and i["cameras"] != cameras:
            missing = sorted(set(cameras) - set(i["cameras"]))
            extra = sorted(set(i["cameras"]) - set(cameras))
            problems.append(DataProblem(sid, folder / "transforms.json", f"has {i['views']} views, the others "
                                        f"{views}: missing camera_index {missing}" + (f", extra {extra}" if extra else "")))
        if "size" in i and i["size"] != size:
            problems.append(DataProblem(sid, folder / "images", f"frames are {i['size'][0]}x{i['size'][1]}, the "
                                        f"other subjects' {size[0]}x{size[1]} (inconsistent image sizes)"))
        if "K" in i and i["K"] != k:
            problems.append(DataProblem(sid, folder / "points3d.ply", f"has K = {i['K']} points, the other subjects "
                                        f"K = {k} (corresponded points must be the same count on every subject)"))
    if num_points is not None:
        from .bust import num_bust_points

        need = num_points - num_bust_points(num_points)
        for sid, i in infos.items():
            if "K" in i and i["K"] < need:
                problems.append(DataProblem(sid, root / sid / "points3d.ply", f"has K = {i['K']} points but the preset's "
                                            f"K = {num_points} needs {need} head points (plus {num_points - need} bust "
                                            "points); use a preset with a smaller num_gaussians"))
    ids = [p.name for p in subjects]
    if split_file is not None:
        problems += _check_split_file(Path(split_file), ids)
    if labels_file is not None:
        try:
            labels = read_labels(labels_file)
            unknown = sorted(set(labels) - set(ids))
            if unknown:
                problems.append(DataProblem("", Path(labels_file), f"labels subjects with no folder in {root}: "
                                            f"{unknown}"))
        except (OSError, ValueError) as e:
            problems.append(DataProblem("", Path(labels_file), str(e).removeprefix(f"{labels_file}: ")))
    order = {sid: n for n, sid in enumerate(ids)}
    problems.sort(key=lambda q: (q.subject == "", order.get(q.subject, -1)))  # stable: by subject, dataset last
    return DatasetCheck(root, ids, views, size, k, problems, time.perf_counter() - t0)


def _check_split_file(path: Path, ids: list[str]) -> list[DataProblem]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        return [DataProblem("", path, f"cannot read the split file ({e.strerror or e})")]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [DataProblem("", path, f"split file is not valid JSON ({e})")]
    shape = '{"train": [ids], "val": [ids], "test": [ids]} ("val" optional)'
    if not isinstance(data, dict) or not all(isinstance(data.get(k, []), list) for k in ("train", "val", "test")) \
            or "train" not in data or "test" not in data or set(data) - {"train", "val", "test"}:
        return [DataProblem("", path, f"expected {shape}, found keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")]
    out = []
    seen: dict[str, str] = {}
    for part in ("train", "val", "test"):
        for s in map(str, data.get(part, [])):
            if s in seen:
                out.append(DataProblem("", path, f"duplicate subject id {s!r}: listed in {seen[s]!r} and {part!r}"))
            seen[s] = part
    unknown = sorted(set(seen) - set(ids))
    if unknown:
        out.append(DataProblem("", path, f"names subjects with no folder in the data: {unknown}"))
    if not data["train"]:
        out.append(DataProblem("", path, f"lists no train subject: {NO_TRAIN_SUBJECT}"))
    if not data["test"]:
        out.append(DataProblem("", path, f"lists no test subject: {NO_TEST_SUBJECT}"))
    return out


# ------------------------------------------------------------------------ labels and split
def _parse_column(values: list[str]) -> list[AttributeValue | None]:
    present = [v.strip() for v in values if v.strip()]
    low = [v.lower() for v in present]
    if present and all(v in _TRUE | _FALSE for v in low):
        return [None if not v.strip() else v.strip().lower() in _TRUE for v in values]
    try:
        [float(v) for v in present]
        return [float(v) if v.strip() else None for v in values]
    except ValueError:
        return [v.strip() or None for v in values]


def read_labels(path: str | os.PathLike) -> dict[str, dict[str, AttributeValue]]:
    """Per-subject attribute labels from a CSV (format in the module docstring): ``{id: {name: value}}``.

    Raises:
        ValueError: no header, no subject column first, a duplicate column or subject id, or a row
            with another number of cells (the message names the file and the line).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty label CSV; expected a header 'subject,<attribute>,...' and one row per subject")
    header = [c.strip() for c in rows[0]]
    if header[0].lower() not in _ID_COLUMNS:
        raise ValueError(f"{path}: the first column must be the subject id, named one of {list(_ID_COLUMNS)}; "
                         f"found {header[0]!r}")
    if len(header) < 2:
        raise ValueError(f"{path}: no attribute columns after {header[0]!r}")
    dup = sorted(c for c, n in Counter(header).items() if n > 1)
    if dup:
        raise ValueError(f"{path}: duplicate columns {dup}")
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise ValueError(f"{path}: line {n} has {len(r)} cells, the header {len(header)}")
    ids = [r[0].strip() for r in rows[1:]]
    dup = sorted(s for s, n in Counter(ids).items() if n > 1)
    if dup:
        raise ValueError(f"{path}: duplicate subject ids {dup}")
    out: dict[str, dict[str, AttributeValue]] = {s: {} for s in ids}
    for j, name in enumerate(header[1:], start=1):
        for sid, value in zip(ids, _parse_column([r[j] for r in rows[1:]]), strict=True):
            if value is not None:
                out[sid][name] = value
    return out


def default_real_counts(num_subjects: int, max_val: int) -> tuple[int, int]:
    """``(num_test, num_val)`` for real data without a split file: the paper's 7 test subjects (at most a
    sixth, :func:`~fastavatar_nb.data.nersemble.default_num_test`) and up to ``max_val`` validation subjects,
    at most a tenth of the rest. Two subjects: 1 test, 0 val (validation then falls back to the training
    subjects, with a warning: see :func:`fastavatar_nb.pipeline.validation_subjects`)."""
    n_test = default_num_test(num_subjects)
    return n_test, min(int(max_val), (num_subjects - n_test) // 10)


def real_split(ids: Sequence[str], split_file: str | os.PathLike | None, num_test: int, num_val: int,
               seed: int) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` subject lists: the split file's (checked) or the hash rule's."""
    if split_file is not None:
        problems = _check_split_file(Path(split_file), list(ids))
        if problems:
            raise ValueError("; ".join(map(str, problems)))
        data = json.loads(Path(split_file).read_text())
        return {k: sorted(map(str, data.get(k, []))) for k in ("train", "val", "test")}
    train, val, test = split_subjects(list(ids), num_test=num_test, seed=seed, num_val=num_val)
    return {"train": train, "val": val, "test": test}


def _digest(path: str | os.PathLike | None) -> str | None:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------ the run's copy
def source_record(source: str | os.PathLike, width: int, height: int, num_points: int, timestep: int | None,
                  split_file: str | os.PathLike | None, labels_file: str | os.PathLike | None) -> dict[str, Any]:
    """What ``source.json`` records about a cached real dataset (compared by :func:`check_cache`)."""
    return {"source": str(Path(source).resolve()), "timestep": timestep, "width": width, "height": height,
            "num_points": num_points,
            "split_file": None if split_file is None else str(Path(split_file).resolve()),
            "split_sha256": _digest(split_file),
            "labels_file": None if labels_file is None else str(Path(labels_file).resolve()),
            "labels_sha256": _digest(labels_file)}


def check_cache(root: str | os.PathLike, record: dict[str, Any]) -> None:
    """Raise ``FileExistsError`` when ``root`` holds a dataset other than the one ``record`` describes
    (synthetic heads, or real data from another source, size, K, timestep, split or labels)."""
    root = Path(root)
    src_file = root / SOURCE_FILE
    if src_file.is_file():
        try:
            old = json.loads(src_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict) or {k: old.get(k) for k in record} != record:
            diff = sorted(k for k in record if not isinstance(old, dict) or old.get(k) != record[k])
            raise FileExistsError(f"{root} holds a dataset made with other settings ({', '.join(diff)} differ; see "
                                  f"{src_file}); use another run folder (--out DIR) or delete {root} to make it again")
    elif root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root} already holds a dataset that is not this run's real data (no {SOURCE_FILE}: "
                              "probably synthetic heads); use another run folder (--out DIR) or delete it")


def prepare_real_dataset(source: str | os.PathLike, root: str | os.PathLike, width: int, height: int,
                         num_points: int, timestep: int | None = None, split_file: str | os.PathLike | None = None,
                         labels_file: str | os.PathLike | None = None, num_test: int = 1, num_val: int = 0,
                         seed: int = 0, check: bool = True, progress: bool = True) -> Path:
    """Cache the real subjects of ``source`` at ``width x height`` with ``num_points`` points in ``root``.

    ``root`` (the run's ``dataset/``) gets one NeRSemble/VHAP folder per subject (images resized
    once, antialiased; intrinsics scaled), each with ``K = num_points`` points
    (:func:`~fastavatar_nb.data.bust.with_bust`) and its CSV labels as ``attributes.json``, plus
    ``split.json`` and ``source.json``. Subjects already cached (by an interrupted or earlier run
    with the same ``source.json``) are kept; ``source`` is only read.

    Args:
        source: folder of subject folders (``--data``).
        root: the cache folder.
        width, height: the preset's image size.
        num_points: the preset's ``K``.
        timestep: which timestep of each subject (default the first, ``00000`` in VHAP's exports).
        split_file: a split JSON; default :func:`real_split`'s hash rule with ``num_test``, ``num_val``.
        labels_file: a label CSV (:func:`read_labels`).
        seed: for the hash split.
        check: run :func:`check_dataset` first (``content=True``) and refuse on any problem.

    Raises:
        DatasetCheckError: ``source`` has problems (all of them listed); nothing is written.
        FileExistsError: ``root`` holds another dataset (synthetic, or from another source, size,
            K, timestep, split or labels); nothing is overwritten.
    """
    from tqdm.auto import tqdm

    from .bust import with_bust

    source, root = Path(source).resolve(), Path(root)
    record = source_record(source, width, height, num_points, timestep, split_file, labels_file)
    check_cache(root, record)
    src_file = root / SOURCE_FILE
    if check:
        check_dataset(source, timestep, split_file, labels_file, content=True, progress=progress,
                      num_points=num_points).raise_if_problems()
    labels = read_labels(labels_file) if labels_file is not None else {}
    from .nersemble import list_subject_dirs

    dirs = list_subject_dirs(source)
    parts = real_split([d.name for d in dirs], split_file, num_test, num_val, seed)
    root.mkdir(parents=True, exist_ok=True)
    src_file.write_text(json.dumps(record, indent=1) + "\n")
    for d in tqdm(dirs, desc="caching real subjects", unit="subject", disable=not progress):
        if (root / d.name / "transforms.json").is_file():
            continue
        subject = read_subject(d, width, height, timestep)
        subject = with_bust(subject, num_points)
        subject.attributes = {**subject.attributes, **labels.get(d.name, {})}
        write_subject(subject.validate(), root / d.name)
    split_path = root / "split.json"
    try:
        same = json.loads(split_path.read_text()) == parts
    except (OSError, ValueError):
        same = False
    if not same:  # written last: a complete cache has one
        write_split(root, parts["train"], parts["test"], parts["val"])
    return root
