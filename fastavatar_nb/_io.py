"""Small file helpers shared by the stages that write checkpoints and results."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_file, save_file
from torch import Tensor

C = TypeVar("C")


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) as safetensors with string ``metadata``,
    through a temporary file and a rename, so an interrupted write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file, each copied into memory of its own.

    Tensors read straight from a file can sit at any memory alignment, and CPU kernels may then take
    other code paths: a model or checkpoint read back would differ from the one saved in the last
    bits. Copies are allocated (and aligned) by torch, so a resumed run equals an uninterrupted one.
    """
    return {k: v.clone() for k, v in load_file(str(path), device=str(device)).items()}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """``cls(**d).validate()`` for a config dataclass, naming unknown fields instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**d).validate()  # type: ignore[attr-defined]


def checked_metadata(path: Path, fmt: str, missing_hint: str) -> dict[str, str]:
    """The string metadata of a safetensors file written with ``{"format": fmt}``.

    Raises:
        FileNotFoundError: no file (the message ends with ``missing_hint``, e.g. which notebook makes it).
        ValueError: a damaged file, or a file of another format.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}; {missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file (format {meta.get('format')!r})")
    return meta


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
