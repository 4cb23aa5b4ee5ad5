"""Small file helpers shared by the stages that write checkpoints and results.

Every file a stage writes goes through a temporary file, ``fsync`` and a rename
(:func:`atomic_save_tensors`), so an interrupted write leaves the previous file or none, never
half a file. Reading goes through :func:`read_artifact` (results: fits, decoder, encoder,
template) or :func:`load_checkpoint` (resumable training state), which turn a damaged, truncated,
foreign or incomplete file into an :class:`ArtifactError` (a ``ValueError``) naming the file, what
was expected, what was found and what to do.

A checkpoint is **one** safetensors file: the tensors, with the JSON training state and a CRC-32
of state and tensors in its string metadata (:func:`save_checkpoint`). One file replaced by one
rename is atomic by construction: the state and the tensors always come from the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor

C = TypeVar("C")

_TMP_SUFFIX = ".tmp"


class ArtifactError(ValueError):
    """A file that cannot be read as what it should be: damaged or truncated, of another kind, or
    missing a piece. The message names the file, what was expected, what was found and what to do."""


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be resumed (damaged, foreign, inconsistent or of an old layout);
    the message says how to start afresh."""


# --------------------------------------------------------------------------------- writing
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, written to ``filename`` alone: safetensors' own ``save_file`` (0.7 and
    later) writes through a randomly named ``.tmpXXXXXX`` beside its target, which a killed process
    leaves behind in the user's folder; here the bytes are serialised in memory (a transient copy of
    the tensors) and written by this function, so :func:`atomic_save_tensors`' one temporary name is
    the only one."""
    data = _safetensors_bytes(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def tmp_path(path: Path) -> Path:
    """The temporary file :func:`atomic_save_tensors` and :func:`atomic_write_text` write first."""
    return path.with_name(path.name + _TMP_SUFFIX)


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) as safetensors with string ``metadata``,
    through a temporary file, ``fsync`` and a rename, so an interrupted write (even a killed
    process or a lost machine) never leaves half a file: ``path`` is the old file or the new one."""
    path = Path(path)
    tmp = tmp_path(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file, ``fsync`` and a rename."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------- reading
def load_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file, each copied into memory of its own.

    Tensors read straight from a file can sit at any memory alignment, and CPU kernels may then take
    other code paths: a model or checkpoint read back would differ from the one saved in the last
    bits. Copies are allocated (and aligned) by torch, so a resumed run equals an uninterrupted one.

    Raises:
        ArtifactError: a damaged or truncated file (the message names it).
    """
    try:
        raw = load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); the file is damaged or truncated "
                            "(an interrupted copy?): write it again") from e
    return {k: v.clone() for k, v in raw.items()}


def checked_metadata(path: Path, fmt: str, missing_hint: str, required: Iterable[str] = ()) -> dict[str, str]:
    """The string metadata of a safetensors file written with ``{"format": fmt}``.

    Args:
        path: the file.
        fmt: the ``format`` tag it must carry.
        missing_hint: how to make the file (e.g. which notebook); ends every message.
        required: metadata keys it must have besides ``format``.

    Raises:
        FileNotFoundError: no file (the message ends with ``missing_hint``).
        ArtifactError: a damaged file, a file of another format, or one without a ``required`` key.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}; {missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); the file is damaged or truncated "
                            f"(an interrupted copy?); {missing_hint}") from e
    if meta.get("format") != fmt:
        raise ArtifactError(f"{path}: not a {fmt} file (format {meta.get('format')!r}); {missing_hint}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ArtifactError(f"{path}: a {fmt} file without its {', '.join(map(repr, missing))} metadata (it has "
                            f"{sorted(meta)}); the file is damaged or was not written by fastavatar-nb; {missing_hint}")
    return meta


def require_tensors(path: Path, tensors: dict[str, Tensor], names: Iterable[str], what: str, hint: str) -> None:
    """Raise :class:`ArtifactError` naming ``path`` and the tensors of ``names`` it lacks."""
    missing = [n for n in names if n not in tensors]
    if missing:
        shown = missing if len(missing) <= 8 else [*missing[:8], f"... ({len(missing)} in all)"]
        raise ArtifactError(f"{path}: a {what} without the tensors {shown} (it has {len(tensors)} tensors); the file "
                            f"is damaged or was not written by fastavatar-nb; {hint}")


def meta_json(path: Path, meta: dict[str, str], key: str, hint: str) -> Any:
    """``json.loads(meta[key])`` with an :class:`ArtifactError` naming the file and key."""
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: metadata {key!r} is missing or not valid JSON ({e!r}); the file is damaged or "
                            f"was not written by fastavatar-nb; {hint}") from e


def read_artifact(path: Path, fmt: str, missing_hint: str, *, device: torch.device | str = "cpu",
                  meta_keys: Iterable[str] = (), tensor_names: Iterable[str] = ()
                  ) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of a result file, checked: ``(meta, tensors)``.

    One check for every saved artifact: the file exists (``FileNotFoundError`` ending with
    ``missing_hint``), is readable safetensors, carries ``format == fmt``, has the metadata
    keys ``meta_keys`` and the tensors ``tensor_names``; anything else is an
    :class:`ArtifactError` naming the file, what was expected and what was found.
    """
    path = Path(path)
    meta = checked_metadata(path, fmt, missing_hint, meta_keys)
    try:
        tensors = load_tensors(path, str(device))
    except ArtifactError as e:
        raise ArtifactError(f"{e}; {missing_hint}") from e.__cause__
    require_tensors(path, tensors, tensor_names, f"{fmt} file", missing_hint)
    return meta, tensors


# ------------------------------------------------------------------------------ checkpoints
_STATE_KEY, _CHECKSUM_KEY = "state", "checksum"
AFRESH = "pass overwrite=True to start afresh (it deletes the checkpoint)"
"""The way out every checkpoint error names."""


def _checksum(state_json: str, tensors: dict[str, Tensor]) -> str:
    """CRC-32 of the state and of every tensor's name, dtype, shape and bytes (CPU, contiguous)."""
    crc = zlib.crc32(state_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(f"\n{name}|{t.dtype}|{list(t.shape)}\n".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


def save_checkpoint(path: Path, fmt: str, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write a checkpoint as ONE safetensors file, atomically (:func:`atomic_save_tensors`).

    The metadata holds ``format = fmt``, ``state`` (``state`` as JSON) and ``checksum`` (CRC-32 of
    the state and the tensors), so state and tensors can only be replaced together, and
    :func:`load_checkpoint` notices a damaged file.
    """
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    state_json = json.dumps(state, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(cpu, path, {"format": fmt, _STATE_KEY: state_json, _CHECKSUM_KEY: _checksum(state_json, cpu)})


def _checkpoint_meta(path: Path, fmt: str, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``(metadata, state)`` of a checkpoint file, or a :class:`CheckpointError`."""
    try:
        meta = checked_metadata(path, fmt, AFRESH, (_STATE_KEY, _CHECKSUM_KEY))
    except ArtifactError as e:
        raise CheckpointError(f"cannot resume from this {what}: {e}") from e.__cause__
    try:
        state = json.loads(meta[_STATE_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot resume from this {what}: {path}: its state is not valid JSON ({e}); "
                              f"{AFRESH}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from this {what}: {path}: its state is a {type(state).__name__}, "
                              f"expected a JSON object; {AFRESH}")
    return meta, state


def checkpoint_state(path: Path, fmt: str, what: str = "checkpoint") -> dict[str, Any]:
    """The JSON state of a checkpoint written by :func:`save_checkpoint`, without reading its tensors
    (nor checking them: :func:`load_checkpoint` does).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a readable checkpoint of format ``fmt``.
    """
    return _checkpoint_meta(Path(path), fmt, what)[1]


def load_checkpoint(path: Path, fmt: str, device: torch.device | str = "cpu", *, what: str = "checkpoint",
                    state_keys: Iterable[str] = (), tensor_names: Iterable[str] = ()
                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, tensors)``.

    Checks, in order: readable safetensors of format ``fmt`` (a truncated file fails here), state
    and tensors matching the stored CRC-32 (a damaged file), the state keys ``state_keys`` and the
    tensors ``tensor_names``. Tensors are read into torch-allocated memory (:func:`load_tensors`,
    so a resumed run equals an uninterrupted one bitwise), then moved to ``device``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: naming the file, what was expected and found, and :data:`AFRESH`.
    """
    path = Path(path)
    meta, state = _checkpoint_meta(path, fmt, what)
    try:
        tensors = load_tensors(path, "cpu")
    except ArtifactError as e:
        raise CheckpointError(f"cannot resume from this {what}: {e}; {AFRESH}") from e.__cause__
    found = _checksum(meta[_STATE_KEY], tensors)
    if found != meta[_CHECKSUM_KEY]:
        raise CheckpointError(f"cannot resume from this {what}: {path} is damaged: its content has checksum {found}, "
                              f"the file says {meta[_CHECKSUM_KEY]}; {AFRESH}")
    missing = [k for k in state_keys if k not in state]
    if missing:
        raise CheckpointError(f"cannot resume from this {what}: {path}: its state lacks {missing} (it has "
                              f"{sorted(state)}); {AFRESH}")
    try:
        require_tensors(path, tensors, tensor_names, what, AFRESH)
    except ArtifactError as e:
        raise CheckpointError(f"cannot resume from this {what}: {e}") from None
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return state, tensors


class CheckpointFile:
    """The resumable checkpoint of a training stage: the file ``folder/name``.

    ``legacy``: file names an earlier version kept in the same folder (the two-file layout, a JSON
    beside a safetensors file); such leftovers are refused with a message naming them (they cannot
    be resumed safely), and :meth:`discard` deletes them. A stray ``name.tmp`` (a write that was
    interrupted) is ignored: the file itself is the last complete checkpoint.
    """

    def __init__(self, folder: str | os.PathLike, name: str, fmt: str, what: str,
                 legacy: Iterable[str] = ()) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.fmt, self.what = fmt, what
        self.legacy = [self.folder / n for n in legacy]

    def exists(self) -> bool:
        """Whether there is a checkpoint (or a leftover of the old layout) to resume or refuse."""
        return self.path.exists() or any(p.exists() for p in self.legacy)

    def discard(self) -> None:
        """Delete the checkpoint, its temporary file and any leftovers of the old layout."""
        for p in (self.path, *self.legacy):
            p.unlink(missing_ok=True)
            tmp_path(p).unlink(missing_ok=True)

    def _check_legacy(self) -> None:
        old = [p.name for p in self.legacy if p.exists()]
        if old:
            raise CheckpointError(
                f"{self.folder} holds a {self.what} in the two-file layout of an earlier fastavatar-nb version "
                f"({', '.join(old)}), which cannot be resumed safely (its two files may come from different "
                f"steps); expected one file, {self.path.name}. Delete {', '.join(old)} or {AFRESH}")

    def state(self) -> dict[str, Any]:
        """The checkpoint's JSON state (progress, config), without reading its tensors."""
        self._check_legacy()
        return checkpoint_state(self.path, self.fmt, self.what)

    def load(self, device: torch.device | str = "cpu", state_keys: Iterable[str] = (),
             tensor_names: Iterable[str] = ()) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(state, tensors)`` checked by :func:`load_checkpoint`; refuses leftovers of the old layout."""
        self._check_legacy()
        return load_checkpoint(self.path, self.fmt, device, what=self.what, state_keys=state_keys,
                               tensor_names=tensor_names)

    def save(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Replace the checkpoint atomically (:func:`save_checkpoint`)."""
        save_checkpoint(self.path, self.fmt, state, tensors)

    def require_same_run(self, state: dict[str, Any], want: dict[str, Any], run: str) -> None:
        """Refuse a checkpoint of another ``run`` (e.g. ``"fit"``): one whose state differs from
        ``want`` (this call's ``config`` and subjects) in any of ``want``'s keys; the message names
        the differing config fields, else the differing subject keys."""
        got = {k: state.get(k) for k in want}
        if got == want:
            return
        what = (f"config {mismatch(want['config'], got['config'])}" if got.get("config") != want.get("config")
                else f"subjects {mismatch(want, got)}")
        raise self.refuse(f"it holds a checkpoint of another {run} ({what})")

    def refuse(self, problem: str) -> CheckpointError:
        """A :class:`CheckpointError` for a checkpoint that does not match this run: names the file,
        says ``problem`` (what was expected and found) and the way out."""
        return CheckpointError(f"cannot resume from {self.path}: {problem}; use another folder or {AFRESH}")


def _short(v: Any, width: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= width else r[:width - 5] + " ...]" if r[:1] == "[" else r[:width - 4] + " ..."


def mismatch(expected: dict[str, Any], found: Any, limit: int = 4, found_name: str = "the checkpoint") -> str:
    """Which keys of two JSON objects differ, as ``"iterations: this call 4, the checkpoint 6; ..."``
    (``expected``: this call's, ``found``: the checkpoint's, or what ``found_name`` names; at most
    ``limit`` keys, long values cut)."""
    if not isinstance(found, dict):
        return f"this call {_short(expected)}, {found_name} {_short(found)}"
    absent = "<absent>"
    keys = sorted(k for k in set(expected) | set(found) if expected.get(k, absent) != found.get(k, absent))
    parts = [f"{k}: this call {_short(expected.get(k, absent))}, {found_name} {_short(found.get(k, absent))}"
             for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... ({len(keys)} fields differ)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------- configs
class StageConfig:
    """What every stage's config shares (``FitConfig``, ``DecoderConfig``, ... : ``presets.STAGES``; frozen
    dataclasses, each with its own ``validate()``): a changed copy, JSON out and a dict in.

    A preset holds one config per stage (``preset.decoder``); a variant is ``preset.decoder.replace(epochs=4)``."""

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with ``changes``; an unknown field raises ``ValueError`` naming it and the fields."""
        known = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown fields {unknown}; fields are {sorted(known)}")
        return dataclasses.replace(self, **changes).validate()  # type: ignore[type-var, attr-defined]

    def to_json(self) -> str:
        """Every field as JSON, keys sorted (the form artifacts store and reuse compares)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """The config of a dict (``to_json``'s, read back), validated; unknown fields are named."""
        return config_from_dict(cls, dict(d))


def config_from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """``cls(**d).validate()`` for a config dataclass, naming unknown fields instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**d).validate()  # type: ignore[attr-defined]


def check_fields(config: Any, *, positive_int: Iterable[str] = (), positive: Iterable[str] = (),
                 non_negative: Iterable[str] = (), optional: Iterable[str] = ()) -> None:
    """The field checks every config dataclass shares: raise ``ValueError`` naming ``Class.field``,
    what it must be and what it is. Fields named in ``optional`` may also be ``None``.

    ``positive_int``: an int (not a bool) >= 1; ``positive``: a finite number > 0;
    ``non_negative``: a finite number >= 0.
    """
    cls, may_be_none = type(config).__name__, set(optional)

    def bad(name: str, ok, what: str) -> None:
        v = getattr(config, name)
        if v is None and name in may_be_none:
            return
        if not ok(v):
            raise ValueError(f"{cls}.{name} must be {'None or ' if name in may_be_none else ''}{what}, got {v!r}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in positive_int:
        bad(name, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int")
    for name in positive:
        bad(name, lambda v: number(v) and v > 0, "a positive number")
    for name in non_negative:
        bad(name, lambda v: number(v) and v >= 0, "a non-negative number")
