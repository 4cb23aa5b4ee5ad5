"""Read and write subjects in the NeRSemble folder format exported by the VHAP head tracker.

One folder per subject::

    <subject>/
      transforms.json              cameras and frames (below)
      transforms_{train,val,test}.json   split of the cameras: val = camera 8 (written; never read)
      images/00000_XX.png          RGB composited on white, XX = camera index 00..15
      fg_masks/00000_XX.png        soft foreground alpha, 0..255 grey
      points3d.ply                 K corresponded points (ASCII: x y z nx ny nz red green blue)
      attributes.json              optional, fastavatar-nb's per-subject labels ({} if absent)
      flame_param/, canonical_flame_param.npz   VHAP's FLAME tracking (ignored)

``transforms.json`` holds top-level defaults (``fl_x fl_y cx cy w h camera_angle_x/y``,
``camera_indices``, ``timestep_indices``) and ``frames``; each frame has ``camera_index``,
``camera_id``, its own intrinsics, ``transform_matrix`` (OpenGL camera-to-world: the camera
looks along its -z, +y up; converted once by :meth:`Cameras.from_opengl_c2w`), ``file_path``
and ``fg_mask_path`` (relative to the folder). Per-frame values override the top-level ones.

Only one timestep is read (a MultiViewSubject is one instant): the first timestep in the
file (``timestep_index`` 0 in every VHAP export we know), or the one asked for. Frames are
sorted by ``camera_index``.

A dataset is a root folder of subject folders; :class:`SubjectDataset` splits it into train, val
and test *by subject* (never by view): from ``<root>/split.json`` if present, else with the
deterministic hash rule of :func:`split_subjects`. Train subjects make the template, the decoder,
the encoder and the attribute directions; every choice made by looking at numbers (learning rates,
steps, C) is made on val subjects; test subjects are only scored (notebook 07, the README).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..cameras import Cameras, intrinsics, rotvec_to_matrix
from ..gaussians import read_points_ply, write_points_ply
from ..ply import PlyError
from .subject import MultiViewSubject, target_size

__all__ = [
    "SubjectFormatError", "MissingSubjectFileError", "read_subject", "write_subject", "list_subject_dirs",
    "split_subjects", "write_split", "SubjectDataset", "Split", "HOLDOUT_VIEW", "default_num_test",
    "tracked_head_rotation", "head_relative_cameras", "frame_value", "select_frames",
]

Split = Literal["train", "val", "test", "all"]
HOLDOUT_VIEW = 8
"""The held-out view: NeRSemble's official validation camera (``transforms_val.json``, the frontal
camera of the lower row) when a subject has 16 cameras. Fits and the decoder never train on it."""

_SPLITS = ("train", "val", "test", "all")
_PARTS = ("train", "val", "test")


class SubjectFormatError(ValueError):
    """A subject folder does not follow the NeRSemble/VHAP format; the message names the file."""


class MissingSubjectFileError(SubjectFormatError, FileNotFoundError):
    """A file or folder a subject needs does not exist (both a ``SubjectFormatError`` and a
    ``FileNotFoundError``)."""


# ------------------------------------------------------------------------ reading
def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingSubjectFileError(f"{path} does not exist (expected a NeRSemble/VHAP subject file)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SubjectFormatError(f"{path}: not valid JSON ({e})") from e


def _read_png(path: Path, kind: Literal["image", "mask"]) -> np.ndarray:
    """Image -> ``[H, W, 3]`` float32 in [0, 1] (RGBA composited on white); mask -> ``[H, W]``."""
    if not path.is_file():
        raise MissingSubjectFileError(f"{path} does not exist (the {kind} of a frame in transforms.json)")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if kind == "mask":
                if mode in ("I;16", "I;16B", "I;16L", "I"):
                    return (np.asarray(im, dtype=np.float32) / 65535.0).clip(0, 1)
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in im.info):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
                return rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as e:
        raise SubjectFormatError(f"{path}: unreadable {kind} file ({type(e).__name__}: {e})") from e


def frame_value(frame: dict, top: dict, key: str, path: Path, i: int) -> Any:
    if key in frame:
        return frame[key]
    if key in top:
        return top[key]
    raise SubjectFormatError(f"{path}: frame {i} has no {key!r} (and no top-level default)")


def select_frames(meta: dict, path: Path, timestep: int | None) -> list[dict]:
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SubjectFormatError(f"{path}: no frames (expected a non-empty 'frames' list)")
    for i, f in enumerate(frames):
        if not isinstance(f, dict):
            raise SubjectFormatError(f"{path}: frame {i} is not an object")
        try:
            int(f.get("timestep_index", 0)), int(f.get("camera_index", 0))
        except (TypeError, ValueError) as e:
            raise SubjectFormatError(f"{path}: frame {i} has a non-integer timestep_index or camera_index ({e})") from e
    steps = sorted({int(f.get("timestep_index", 0)) for f in frames})
    ts = steps[0] if timestep is None else int(timestep)
    if ts not in steps:
        raise SubjectFormatError(f"{path}: no frames of timestep {ts} (timesteps present: {steps})")
    chosen = [f for f in frames if int(f.get("timestep_index", 0)) == ts]
    for i, f in enumerate(chosen):
        if "camera_index" not in f:
            raise SubjectFormatError(f"{path}: frame {i} of timestep {ts} has no 'camera_index'")
    chosen.sort(key=lambda f: int(f["camera_index"]))
    idx = [int(f["camera_index"]) for f in chosen]
    if len(set(idx)) != len(idx):
        raise SubjectFormatError(f"{path}: timestep {ts} lists a camera_index twice: {idx}")
    return chosen


def read_subject(folder: str | os.PathLike, width: int | None = None, height: int | None = None,
                 timestep: int | None = None) -> MultiViewSubject:
    """Read one NeRSemble/VHAP subject folder (format in the module docstring).

    Args:
        folder: the subject folder; its name becomes ``subject_id``.
        width, height: resize on load (see :meth:`MultiViewSubject.resize`; give one to keep
            the aspect ratio). Default: the stored size (550x802 for NeRSemble).
        timestep: which timestep to read (default the first one in ``transforms.json``).

    Returns:
        A :class:`MultiViewSubject` with views sorted by ``camera_index``; ``camera_ids`` are
        the frames' ``camera_id`` (or the zero-padded index when absent).

    Raises:
        MissingSubjectFileError: the folder, ``transforms.json``, ``points3d.ply`` or a frame's
            image or mask does not exist.
        SubjectFormatError: malformed JSON or PLY, an unreadable image, an image whose size
            differs from the frame's ``w``/``h`` or from its mask, frames of different sizes,
            or no frames.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingSubjectFileError(f"subject folder {folder} does not exist or is not a folder")
    tpath = folder / "transforms.json"
    if not tpath.is_file():
        raise MissingSubjectFileError(f"{tpath} does not exist: {folder} is not a NeRSemble/VHAP subject folder "
                                      "(expected transforms.json, images/, fg_masks/, points3d.ply)")
    meta = _load_json(tpath)
    if not isinstance(meta, dict):
        raise SubjectFormatError(f"{tpath}: expected a JSON object at the top level")
    frames = select_frames(meta, tpath, timestep)

    images, masks, c2ws, Ks, ids, sizes = [], [], [], [], [], set()
    for i, f in enumerate(frames):
        try:
            w, h = int(frame_value(f, meta, "w", tpath, i)), int(frame_value(f, meta, "h", tpath, i))
            fx, fy, cx, cy = (float(frame_value(f, meta, k, tpath, i)) for k in ("fl_x", "fl_y", "cx", "cy"))
            c2w = np.asarray(f["transform_matrix"], dtype=np.float64)
            img_rel, mask_rel = f["file_path"], f["fg_mask_path"]
        except KeyError as e:
            raise SubjectFormatError(f"{tpath}: frame {i} (camera_index {f['camera_index']}) has no {e}") from e
        except (TypeError, ValueError) as e:
            raise SubjectFormatError(f"{tpath}: frame {i} (camera_index {f['camera_index']}) has malformed "
                                     f"values ({e})") from e
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise SubjectFormatError(f"{tpath}: frame {i} transform_matrix must be a finite 4x4, "
                                     f"got shape {c2w.shape}")
        img = _read_png(folder / img_rel, "image")
        mask = _read_png(folder / mask_rel, "mask")
        if img.shape[:2] != (h, w):
            raise SubjectFormatError(f"{folder / img_rel}: image is {img.shape[1]}x{img.shape[0]} (WxH) but "
                                     f"transforms.json says w={w}, h={h}")
        if mask.shape != img.shape[:2]:
            raise SubjectFormatError(f"{folder / mask_rel}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its "
                                     f"image {img_rel} is {img.shape[1]}x{img.shape[0]}")
        sizes.add((w, h))
        images.append(img)
        masks.append(mask)
        c2ws.append(c2w)
        Ks.append((fx, fy, cx, cy))
        ids.append(str(f.get("camera_id", f"{int(f['camera_index']):02d}")))
    if len(sizes) != 1:
        raise SubjectFormatError(f"{tpath}: frames have different image sizes {sorted(sizes)}; "
                                 "a subject needs one size")
    W, H = sizes.pop()

    ply = folder / "points3d.ply"
    if not ply.is_file():
        raise MissingSubjectFileError(f"{ply} does not exist (the subject's corresponded points)")
    try:
        points, _, _ = read_points_ply(ply)
    except PlyError as e:
        raise SubjectFormatError(str(e)) from e

    attributes: dict = {}
    apath = folder / "attributes.json"
    if apath.exists():
        attributes = _load_json(apath)
        if not isinstance(attributes, dict):
            raise SubjectFormatError(f"{apath}: expected a JSON object of attributes, got {type(attributes).__name__}")

    k = torch.tensor(Ks, dtype=torch.float32)
    cams = Cameras.from_opengl_c2w(torch.from_numpy(np.stack(c2ws)).float(),
                                   intrinsics(k[:, 0], k[:, 1], k[:, 2], k[:, 3]), W, H)
    try:
        subject = MultiViewSubject(
            subject_id=folder.name, images=torch.from_numpy(np.stack(images)), masks=torch.from_numpy(np.stack(masks)),
            cameras=cams, points=points, attributes=attributes, camera_ids=ids)
    except (TypeError, ValueError) as e:
        raise SubjectFormatError(f"{folder}: {e}") from e
    if width is not None or height is not None:
        subject = subject.resize(*target_size(width, height, W, H))
    return subject


# ------------------------------------------------------------------------ writing
def _to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def _frame_dict(subject: MultiViewSubject, c: int, c2w: np.ndarray) -> dict:
    K = subject.cameras.Ks[c].detach().cpu().double().numpy()
    W, H = subject.width, subject.height
    fx, fy = float(K[0, 0]), float(K[1, 1])
    return {
        "timestep_index": 0, "timestep_index_original": 0, "timestep_id": "000000",
        "camera_index": c, "camera_id": subject.camera_ids[c],
        "cx": float(K[0, 2]), "cy": float(K[1, 2]), "fl_x": fx, "fl_y": fy, "h": H, "w": W,
        "camera_angle_x": 2 * math.atan(W / (2 * fx)), "camera_angle_y": 2 * math.atan(H / (2 * fy)),
        "transform_matrix": c2w.tolist(),
        "file_path": f"images/00000_{c:02d}.png", "fg_mask_path": f"fg_masks/00000_{c:02d}.png",
    }


def _transforms(frames: list[dict], all_indices: list[int]) -> dict:
    top = {k: frames[0][k] for k in ("cx", "cy", "fl_x", "fl_y", "h", "w", "camera_angle_x", "camera_angle_y")} \
        if frames else {}
    return {**top, "frames": frames, "timestep_indices": [0] if frames else [], "camera_indices": all_indices}


def _is_replaceable(folder: Path) -> bool:
    return not any(folder.iterdir()) or (folder / "transforms.json").is_file()


def write_subject(subject: MultiViewSubject, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a subject as a NeRSemble/VHAP folder that :func:`read_subject` reads back.

    Writes ``images/00000_XX.png`` (8-bit RGB), ``fg_masks/00000_XX.png`` (8-bit grey),
    ``transforms.json`` (camera ``c`` of the subject gets ``camera_index`` ``c``),
    ``transforms_{train,val,test}.json`` (val = camera 8 and train = the others when there are
    16 cameras, as in NeRSemble; otherwise train = all and val empty; test is empty as in
    VHAP's exports), ``points3d.ply`` (ASCII) and ``attributes.json``.

    The folder is written to a temporary sibling first and renamed into place, so an
    interrupted write never leaves a half-written subject.

    Args:
        subject: the subject (any device).
        folder: destination folder.
        overwrite: replace an existing non-empty folder. For safety only a previous subject
            folder (one holding ``transforms.json``) is ever replaced.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        FileExistsError: ``folder`` exists, is not empty and ``overwrite`` is False, or it is
            not a subject folder, or it is a file.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"write_subject: {folder} exists and is a file, not a folder")
        if any(folder.iterdir()):
            if not overwrite:
                raise FileExistsError(f"write_subject: {folder} exists and is not empty; pass overwrite=True to "
                                      "replace it or choose another folder")
            if not _is_replaceable(folder):
                raise FileExistsError(f"write_subject: {folder} is not empty and holds no transforms.json; "
                                      "refusing to delete a folder that is not a subject, even with overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "fg_masks").mkdir()
        imgs, masks = _to_u8(subject.images), _to_u8(subject.masks)
        c2ws = subject.cameras.opengl_c2w.detach().cpu().double().numpy()
        frames = []
        for c in range(subject.num_views):
            Image.fromarray(imgs[c], mode="RGB").save(tmp / "images" / f"00000_{c:02d}.png")
            Image.fromarray(masks[c], mode="L").save(tmp / "fg_masks" / f"00000_{c:02d}.png")
            frames.append(_frame_dict(subject, c, c2ws[c]))
        indices = list(range(subject.num_views))
        val = [HOLDOUT_VIEW] if subject.num_views == 16 else []
        parts = {"transforms": frames, "transforms_train": [f for f in frames if f["camera_index"] not in val],
                 "transforms_val": [f for f in frames if f["camera_index"] in val], "transforms_test": []}
        for name, fr in parts.items():
            (tmp / f"{name}.json").write_text(json.dumps(_transforms(fr, indices), indent=1))
        write_points_ply(tmp / "points3d.ply", subject.points, ascii=True)
        (tmp / "attributes.json").write_text(json.dumps(subject.attributes, indent=1, sort_keys=True))
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ------------------------------------------------------------------------ datasets
def tracked_head_rotation(folder: str | os.PathLike, timestep: int = 0) -> torch.Tensor:
    """``[3, 3]`` (float64) how the tracked head is turned in the rig's world at ``timestep``.

    VHAP's FLAME fit rotates the canonical head (face along +z, +y up) by its global ``rotation``
    and then by the ``neck_pose`` (axis-angle, ``flame_param/NNNNN.npz``): the subjects do not
    hold their heads straight (306: about 9 degrees of yaw; 369: about 13 degrees of pitch). A
    camera relative to the head, as a camera estimated from a photo is, is ``R_cam @ R_head``.
    """
    path = Path(folder) / "flame_param" / f"{timestep:05d}.npz"
    if not path.is_file():
        raise MissingSubjectFileError(f"{path}: missing (the FLAME fit of timestep {timestep}); a VHAP export "
                                      "holds flame_param/NNNNN.npz per timestep")
    try:
        with np.load(path) as d:
            rot, neck = (torch.as_tensor(np.asarray(d[k], dtype=np.float64).reshape(-1)[:3]) for k in
                         ("rotation", "neck_pose"))
    except (KeyError, ValueError, OSError) as e:
        raise SubjectFormatError(f"{path}: no FLAME 'rotation' and 'neck_pose' ({e})") from None
    return rotvec_to_matrix(rot) @ rotvec_to_matrix(neck)


def head_relative_cameras(cameras: Cameras, head_rotation: torch.Tensor) -> Cameras:
    """``cameras`` as seen from the tracked head: each rotation ``R_cam @ R_head`` (``head_rotation`` ``[3, 3]``,
    :func:`tracked_head_rotation`), translations and intrinsics unchanged; what a camera estimated from a photo
    (relative to the template's straight head) is compared with."""
    V = cameras.viewmats.double().clone()
    V[..., :3, :3] = V[..., :3, :3] @ head_rotation.double()
    return Cameras(V.to(cameras.viewmats.dtype), cameras.Ks, cameras.width, cameras.height)


def list_subject_dirs(root: str | os.PathLike) -> list[Path]:
    """Subject folders (direct children of ``root`` holding ``transforms.json``), sorted by name.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no subject folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
    dirs = sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "transforms.json").is_file())
    if not dirs:
        raise FileNotFoundError(f"dataset root {root} holds no subject folders (sub-folders with transforms.json)")
    return dirs


def default_num_test(num_subjects: int) -> int:
    """Test subjects when none are specified: the paper's 7, at most a sixth of the subjects,
    at least 1 when there are 2 or more (12 -> 2, 417 -> 7), 0 for a single subject."""
    if num_subjects < 2:
        return 0
    return max(1, min(7, num_subjects // 6))


def split_subjects(subject_ids: Sequence[str], num_test: int | None = None, seed: int = 0,
                   num_val: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Deterministic train/val/test split by subject.

    Rule: rank the ids by ``sha256(f"{seed}:{id}")``; the first ``num_test`` are test, the next
    ``num_val`` val, the rest train. It depends only on the ids, the counts and ``seed`` (not on
    their order, the platform or any random state), and the test subjects do not change with
    ``num_val``.

    Args:
        subject_ids: unique subject ids.
        num_test: test subjects (default :func:`default_num_test`).
        seed: changes the split.
        num_val: validation subjects (every choice made by looking at numbers is made on them).

    Returns:
        ``(train_ids, val_ids, test_ids)``, each sorted, disjoint, together all ids.
    """
    ids = [str(s) for s in subject_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"split_subjects: subject ids are not unique: {sorted(ids)}")
    n_test = default_num_test(len(ids)) if num_test is None else int(num_test)
    n_val = int(num_val)
    if n_test < 0 or n_val < 0 or n_test + n_val > len(ids):
        raise ValueError(f"split_subjects: num_test={n_test} and num_val={n_val} must be >= 0 and add up to at "
                         f"most the {len(ids)} subjects")
    ranked = sorted(ids, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    test, val = set(ranked[:n_test]), set(ranked[n_test:n_test + n_val])
    return sorted(s for s in ids if s not in test and s not in val), sorted(val), sorted(test)


def _check_parts(parts: dict[str, list[str]], where: str) -> None:
    """Raise naming ``where`` when a subject is listed twice, within a part or across parts."""
    seen: dict[str, str] = {}
    for part in _PARTS:
        for sid in parts[part]:
            if sid in seen:
                raise SubjectFormatError(
                    f"{where}: subject {sid!r} is in both {seen[sid]!r} and {part!r}" if seen[sid] != part else
                    f"{where}: subject {sid!r} is listed twice in {part!r}")
            seen[sid] = part


def write_split(root: str | os.PathLike, train: Sequence[str], test: Sequence[str],
                val: Sequence[str] = ()) -> Path:
    """Write ``<root>/split.json`` (``{"train": [...], "val": [...], "test": [...]}``), which
    :class:`SubjectDataset` then uses instead of :func:`split_subjects`.

    Raises:
        SubjectFormatError: a subject in two parts (or twice in one).
    """
    parts = {"train": [str(s) for s in train], "val": [str(s) for s in val], "test": [str(s) for s in test]}
    _check_parts(parts, "write_split")
    path = Path(root) / "split.json"
    path.write_text(json.dumps({k: sorted(v) for k, v in parts.items()}, indent=1))
    return path


def _read_split(path: Path, available: list[str]) -> dict[str, list[str]]:
    data = _load_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")) \
            or not isinstance(data.get("val", []), list):
        raise SubjectFormatError(f'{path}: expected {{"train": [ids], "val": [ids], "test": [ids]}} ("val" optional)')
    unknown = sorted(set(data) - set(_PARTS))
    if unknown:
        raise SubjectFormatError(f"{path}: unknown keys {unknown}; a split has train, val and test")
    parts = {k: [str(s) for s in data.get(k, [])] for k in _PARTS}
    _check_parts(parts, str(path))
    missing = sorted(set(sum(parts.values(), [])) - set(available))
    if missing:
        raise SubjectFormatError(f"{path}: names subjects with no folder in {path.parent}: {missing}")
    return {k: sorted(v) for k, v in parts.items()}


class SubjectDataset(Dataset):
    """The subjects of a root folder, read lazily (on ``__getitem__``) with a small LRU cache.

    Split by subject: ``<root>/split.json`` (``{"train": [...], "val": [...], "test": [...]}``) when
    present, else :func:`split_subjects` (``num_test``, ``seed``, ``num_val``). ``"all"`` is every
    subject folder.

    Args:
        root: folder of subject folders (see :func:`list_subject_dirs`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        width, height: resize every subject on load (e.g. to a preset's resolution; give one to
            keep the aspect ratio). Default: stored size.
        num_test, seed, num_val: for the hash split when there is no ``split.json``.
        cache_size: subjects kept in memory (0 disables the cache).

    Items are :class:`MultiViewSubject`; ``subject_ids`` and ``paths`` list them in order.
    Not meant for a ``DataLoader`` with batching: subjects are dataclasses, iterate directly.
    """

    def __init__(self, root: str | os.PathLike, split: Split = "train", width: int | None = None,
                 height: int | None = None, num_test: int | None = None, seed: int = 0, cache_size: int = 8,
                 num_val: int = 0) -> None:
        if split not in _SPLITS:
            raise ValueError(f"SubjectDataset: split must be one of {_SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split: Split = split
        self.width, self.height = width, height
        self.cache_size = int(cache_size)
        dirs = {p.name: p for p in list_subject_dirs(self.root)}
        split_file = self.root / "split.json"
        if split_file.is_file():
            parts = _read_split(split_file, list(dirs))
            self.split_source = str(split_file)
        else:
            train, val, test = split_subjects(list(dirs), num_test, seed, num_val)
            parts = {"train": train, "val": val, "test": test}
            self.split_source = f"split_subjects(num_test={num_test}, seed={seed}, num_val={num_val})"
        self.subject_ids: list[str] = sorted(dirs) if split == "all" else parts[split]
        self.paths: list[Path] = [dirs[s] for s in self.subject_ids]
        self._num_test, self._seed, self._num_val = num_test, seed, num_val
        self._cache: OrderedDict[int, MultiViewSubject] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> MultiViewSubject:
        if not -len(self) <= index < len(self):
            raise IndexError(f"SubjectDataset ({self.split}, {len(self)} subjects): index {index} out of range")
        index %= len(self)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        subject = read_subject(self.paths[index], self.width, self.height)
        if self.cache_size > 0:
            self._cache[index] = subject
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return subject

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def resized(self, width: int | None, height: int | None = None) -> SubjectDataset:
        """The same subjects, loaded at another size."""
        return SubjectDataset(self.root, self.split, width, height, self._num_test, self._seed, self.cache_size,
                              self._num_val)

    def __repr__(self) -> str:
        size = "stored size" if self.width is None and self.height is None else f"{self.width}x{self.height}"
        return (f"SubjectDataset({str(self.root)!r}, split={self.split!r}, {len(self)} subjects, {size}, "
                f"split from {self.split_source})")
