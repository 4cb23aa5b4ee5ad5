"""Minimal, strict PLY reading and writing (binary little-endian and ASCII).

Only what fastavatar-nb needs: one or more elements whose properties are scalars
(no list properties, so no meshes). Every problem with a file raises
:class:`PlyError` naming the file and what was wrong, never a numpy traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PlyError", "PlyElement", "read_ply", "write_ply", "parse_header"]

_PLY_TO_NUMPY = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NUMPY_TO_PLY = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int",
                 "u4": "uint", "f4": "float", "f8": "double"}


class PlyError(ValueError):
    """A PLY file could not be read or written: the message names the file and the problem."""


@dataclass
class PlyElement:
    """One PLY element (e.g. ``vertex``): ``data`` is a numpy structured array, one field per property."""

    name: str
    data: np.ndarray

    @property
    def properties(self) -> tuple[str, ...]:
        return tuple(self.data.dtype.names or ())


def parse_header(f, path: Path) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], list[str]]:
    magic = f.readline()
    if magic.strip() != b"ply":
        raise PlyError(f"{path}: not a PLY file (first line is {magic[:40]!r}, expected b'ply')")
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    comments: list[str] = []
    while True:
        raw = f.readline()
        if not raw:
            raise PlyError(f"{path}: header ends before 'end_header' (file truncated?)")
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError as e:
            raise PlyError(f"{path}: header line {raw[:40]!r} is not ASCII") from e
        if line == "end_header":
            break
        if not line:
            continue
        words = line.split()
        key = words[0]
        if key == "format":
            if len(words) < 2 or words[1] not in ("ascii", "binary_little_endian", "binary_big_endian"):
                raise PlyError(f"{path}: unknown PLY format line {line!r}")
            fmt = words[1]
        elif key in ("comment", "obj_info"):
            comments.append(line.partition(" ")[2])
        elif key == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise PlyError(f"{path}: malformed element line {line!r}")
            elements.append((words[1], int(words[2]), []))
        elif key == "property":
            if not elements:
                raise PlyError(f"{path}: property before any element: {line!r}")
            if words[1] == "list":
                raise PlyError(
                    f"{path}: element {elements[-1][0]!r} has a list property ({line!r}); "
                    "fastavatar-nb reads point clouds and Gaussian splats, not meshes"
                )
            if len(words) != 3 or words[1] not in _PLY_TO_NUMPY:
                raise PlyError(f"{path}: malformed or unsupported property line {line!r}")
            if any(words[2] == q for q, _ in elements[-1][2]):
                raise PlyError(f"{path}: element {elements[-1][0]!r} declares property {words[2]!r} twice")
            elements[-1][2].append((words[2], _PLY_TO_NUMPY[words[1]]))
        else:
            raise PlyError(f"{path}: unexpected header line {line!r}")
    if fmt is None:
        raise PlyError(f"{path}: header has no 'format' line")
    return fmt, elements, comments


def read_ply(path: str | os.PathLike) -> dict[str, PlyElement]:
    """Read every element of a PLY file.

    Args:
        path: the file.

    Returns:
        ``{element name: PlyElement}`` in file order.

    Raises:
        PlyError: missing file, bad header, truncated or malformed body.
    """
    path = Path(path)
    if not path.is_file():
        raise PlyError(f"{path}: no such file")
    with open(path, "rb") as f:
        fmt, specs, _ = parse_header(f, path)
        body = f.read()
    out: dict[str, PlyElement] = {}
    if fmt == "ascii":
        lines = body.decode("ascii", errors="replace").split("\n")
        lines = [ln for ln in lines if ln.strip()]
        start = 0
        for name, count, props in specs:
            dtype = np.dtype([(p, t) for p, t in props])
            chunk = lines[start:start + count]
            if len(chunk) < count:
                raise PlyError(f"{path}: element {name!r} declares {count} rows but the file has {len(chunk)} (truncated?)")
            for i, ln in enumerate(chunk):
                if len(ln.split()) != len(props):
                    raise PlyError(f"{path}: element {name!r} row {i} has {len(ln.split())} values, expected "
                                   f"{len(props)} (file truncated or header and data disagree?)")
            try:
                values = np.array([ln.split() for ln in chunk], dtype=np.float64)
            except ValueError as e:
                raise PlyError(f"{path}: element {name!r}: rows are not all {len(props)} numbers ({e})") from e
            if values.ndim != 2 or values.shape[1] != len(props):
                raise PlyError(f"{path}: element {name!r}: expected {len(props)} values per row")
            arr = np.empty(count, dtype=dtype)
            for i, (p, _) in enumerate(props):
                arr[p] = values[:, i]
            out[name] = PlyElement(name, arr)
            start += count
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        offset = 0
        for name, count, props in specs:
            dtype = np.dtype([(p, endian + t) for p, t in props])
            need = dtype.itemsize * count
            if offset + need > len(body):
                have = (len(body) - offset) // max(dtype.itemsize, 1)
                raise PlyError(
                    f"{path}: element {name!r} declares {count} rows of {dtype.itemsize} bytes "
                    f"but only {max(have, 0)} complete rows are present (file truncated?)"
                )
            arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            out[name] = PlyElement(name, arr.astype(dtype.newbyteorder("=")))
            offset += need
        if len(body) - offset > 1:  # one stray newline is tolerated
            raise PlyError(
                f"{path}: {len(body) - offset} bytes follow the {len(specs)} element(s) the header declares "
                "(header and data disagree: a property missing from the header?)"
            )
    return out


def write_ply(path: str | os.PathLike, elements: list[PlyElement], ascii: bool = False,
              comments: tuple[str, ...] = ()) -> None:
    """Write elements to a PLY file (binary little-endian unless ``ascii``).

    The file is written to a temporary name and moved into place, so an interrupted
    write never leaves a half file under ``path``.
    """
    path = Path(path)
    header = ["ply", "format ascii 1.0" if ascii else "format binary_little_endian 1.0"]
    header += [f"comment {c}" for c in comments]
    for el in elements:
        header.append(f"element {el.name} {len(el.data)}")
        for p in el.properties:
            kind = el.data.dtype[p].str.lstrip("<>|=")
            if kind not in _NUMPY_TO_PLY:
                raise PlyError(f"{path}: property {p!r} has unsupported dtype {el.data.dtype[p]}")
            header.append(f"property {_NUMPY_TO_PLY[kind]} {p}")
    header.append("end_header")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        for el in elements:
            if ascii:
                cols = [el.data[p] for p in el.properties]
                fmts = ["%d" if el.data.dtype[p].kind in "iu" else "%.9g" for p in el.properties]
                np.savetxt(f, np.stack(cols, axis=1) if cols else np.zeros((len(el.data), 0)),
                           fmt=fmts, delimiter=" ")
            else:
                le = np.dtype([(p, el.data.dtype[p].newbyteorder("<")) for p in el.properties])
                f.write(el.data.astype(le).tobytes())
    os.replace(tmp, path)
