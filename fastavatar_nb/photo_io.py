"""Photos in: any image a user has (a file, bytes, a PIL image, an array, a tensor) -> one upright RGB
:class:`Photo` in [0, 1], with what loading changed said in its notes, or a :class:`PhotoError` that names the
photo and the fix. EXIF orientation and the 35 mm-equivalent focal length are read here.

:mod:`fastavatar_nb.photo` takes it from there (the face, the camera, the head).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import MIN_FACE_PHOTO_SIDE, RANGE_SLACK

__all__ = ["PhotoError", "Photo", "ImageSize", "load_photo", "as_photo", "MAX_PHOTO_SIDE", "MIN_PHOTO_SIDE",
           "FULL_FRAME_DIAGONAL_MM"]

MAX_PHOTO_SIDE = 2048
"""Longer side (pixels) above which :func:`load_photo` downscales a photo: detection and the
working view need far less, and a 48-megapixel phone photo would only cost memory."""
MIN_PHOTO_SIDE = MIN_FACE_PHOTO_SIDE
"""Shorter side (pixels) below which a photo is refused: MTCNN finds faces of about 20 pixels."""
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
"""Diagonal of a 35 mm film frame: EXIF's ``FocalLengthIn35mmFilm`` is relative to it."""
_EXIF_ORIENTATION = 0x0112
_EXIF_FOCAL_35MM = 0xA405
_EXIF_IFD = 0x8769


class PhotoError(ValueError):
    """A photo that cannot be used (not an image, damaged, empty, too small, wrong values); the
    message names it and says what to do."""


class ImageSize:
    """``width`` and ``height`` of an ``image`` ``[H, W, 3]`` attribute."""

    image: Tensor

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass
class Photo(ImageSize):
    """A loaded photo.

    Attributes:
        image: ``[H, W, 3]`` float32 RGB in ``[0, 1]``, upright.
        name: what to call it in messages (the file name, or ``"photo"``).
        notes: what loading changed (rotated by EXIF, grey -> RGB, alpha on white, downscaled).
        original_size: ``(width, height)`` as stored, before any change.
        focal_35mm: EXIF ``FocalLengthIn35mmFilm`` in mm, when the file has one.
    """

    image: Tensor
    name: str = "photo"
    notes: list[str] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)
    focal_35mm: float | None = None

    def focal_px(self) -> float | None:
        """Focal length in pixels of :attr:`image` from the EXIF 35 mm-equivalent focal length."""
        if self.focal_35mm is None:
            return None
        return self.focal_35mm / FULL_FRAME_DIAGONAL_MM * math.hypot(self.width, self.height)


def _exif(img) -> tuple[int, float | None]:
    """``(orientation, focal_35mm)`` from a PIL image's EXIF (1 and None when absent or unreadable)."""
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - damaged EXIF must not stop a readable photo
        return 1, None
    orientation = exif.get(_EXIF_ORIENTATION, 1)
    focal = None
    try:
        f = exif.get_ifd(_EXIF_IFD).get(_EXIF_FOCAL_35MM)
        focal = float(f) if f else None
    except Exception:  # noqa: BLE001
        focal = None
    return int(orientation) if isinstance(orientation, int) else 1, focal


def _from_pil(img, name: str) -> tuple[np.ndarray, list[str], tuple[int, int], float | None]:
    from PIL import Image, ImageOps

    notes: list[str] = []
    size = img.size
    orientation, focal = _exif(img)
    if orientation not in (1, 0):
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # noqa: BLE001
            raise PhotoError(f"{name}: its EXIF orientation ({orientation}) could not be applied ({e}); re-save the "
                             "photo upright") from None
        notes.append(f"rotated upright by its EXIF orientation tag ({orientation})")
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append(f"transparency ({mode}) composited on white")
    elif mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(arr / top, 0, 1)
            img = Image.fromarray((arr * 255).round().astype(np.uint8), "L")
        img = img.convert("RGB")
        notes.append(f"grey-scale ({mode}) repeated into RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
        notes.append(f"converted from {mode} to RGB")
    return np.asarray(img, dtype=np.uint8), notes, size, focal


def _from_array(a: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise PhotoError(f"{name}: pixels must be numbers (uint8 0..255 or floats in [0, 1]), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise PhotoError(f"{name}: got shape {a.shape}, which looks channels-first; pass [H, W, 3] "
                         "(e.g. array.transpose(1, 2, 0) or tensor.permute(1, 2, 0))")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise PhotoError(f"{name}: expected an image [H, W], [H, W, 3] (RGB) or [H, W, 4] (RGBA), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise PhotoError(f"{name}: the image is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise PhotoError(f"{name}: integer pixels must be 0..255, found [{a.min()}, {a.max()}]; pass 8-bit "
                             "values or floats in [0, 1]")
        x = a.astype(np.float32) / 255.0
    else:
        x = a.astype(np.float32)
        if not np.isfinite(x).all():
            raise PhotoError(f"{name}: {int((~np.isfinite(x)).sum())} pixel values are NaN or infinite (a damaged "
                             "photo or a failed conversion)")
        lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            if hi > 1.5 and lo >= 0 and hi <= 255 + RANGE_SLACK:
                raise PhotoError(f"{name}: float pixels must be in [0, 1], found [{lo:.4g}, {hi:.4g}]: they look like "
                                 "0..255: divide by 255")
            raise PhotoError(f"{name}: float pixels must be in [0, 1], found [{lo:.4g}, {hi:.4g}]; clip or rescale them")
        x = x.clip(0, 1)
    if x.shape[-1] == 4:
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + (1 - alpha)
        notes.append("alpha channel composited on white")
    elif x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
        notes.append("grey-scale repeated into RGB")
    return x, notes


def load_photo(source: Any, name: str | None = None, max_side: int = MAX_PHOTO_SIDE) -> Photo:
    """Load a photo as float RGB ``[H, W, 3]`` in ``[0, 1]``, upright and on white where transparent.

    Args:
        source: a file path, the file's bytes, a PIL image, or an array/tensor ``[H, W]``,
            ``[H, W, 3]`` or ``[H, W, 4]`` (uint8 0..255 or floats in [0, 1]). Files and PIL images
            are turned upright by their EXIF orientation; arrays are taken as they are.
        name: what messages call it (default: the file name, else ``"photo"``).
        max_side: a photo whose longer side exceeds this is downscaled (noted in ``Photo.notes``).

    Returns:
        A :class:`Photo`.

    Raises:
        FileNotFoundError: no such file. PhotoError: not an image, damaged, empty, smaller than
        :data:`MIN_PHOTO_SIDE`, NaN pixels, floats outside [0, 1] (with the fix: e.g. divide by 255).
    """
    from PIL import Image, UnidentifiedImageError

    focal, size = None, None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        if not path.exists():
            raise FileNotFoundError(f"photo {path}: no such file")
        if path.is_dir():
            raise PhotoError(f"photo {path} is a folder; pass an image file (JPEG, PNG, ...)")
        source = path.read_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "photo"
        if len(source) == 0:
            raise PhotoError(f"{name}: the file is empty (0 bytes)")
        try:
            img = Image.open(io.BytesIO(bytes(source)))
            img.load()
        except UnidentifiedImageError:
            head = bytes(source[:40])
            kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
            raise PhotoError(f"{name} is not an image: it starts with {kind} ({head[:20]!r}) that no image format "
                             "PIL reads matches; pass a JPEG, PNG, WebP, BMP or TIFF photo") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise PhotoError(f"{name}: the image file is damaged or truncated ({e}); re-export or re-download it") \
                from None
        source = img
    name = name or "photo"
    if isinstance(source, Image.Image):
        pixels, notes, size, focal = _from_pil(source, name)
        image = pixels.astype(np.float32) / 255.0
    elif isinstance(source, (np.ndarray, Tensor)):
        arr = source.detach().cpu().numpy() if isinstance(source, Tensor) else np.asarray(source)
        size = (arr.shape[1], arr.shape[0]) if arr.ndim >= 2 else (0, 0)
        image, notes = _from_array(arr, name)
    else:
        raise PhotoError(f"{name}: expected a file path, bytes, a PIL image or an array [H, W, 3], got "
                         f"{type(source).__name__}")
    H, W = image.shape[:2]
    if H == 0 or W == 0:
        raise PhotoError(f"{name}: the image is empty ({W}x{H} pixels)")
    if min(H, W) < MIN_PHOTO_SIDE:
        raise PhotoError(f"{name} is {W}x{H} pixels; need at least {MIN_PHOTO_SIDE} on each side (a face must be "
                         "about 20 pixels across to be found): pass a larger photo")
    out = torch.from_numpy(np.ascontiguousarray(image))
    if max(H, W) > max_side:
        k = max_side / max(H, W)
        w2, h2 = max(1, round(W * k)), max(1, round(H * k))
        out = F.interpolate(out.permute(2, 0, 1)[None], size=(h2, w2), mode="bilinear", antialias=True,
                            align_corners=False)[0].permute(1, 2, 0).clamp(0, 1).contiguous()
        notes.append(f"downscaled from {W}x{H} to {w2}x{h2} (longer side > {max_side})")
    return Photo(out, name, notes, tuple(int(v) for v in size), focal)


def as_photo(photo: Photo | Any, name: str | None = None) -> Photo:
    """``photo`` itself when it is a :class:`Photo`, else :func:`load_photo` of it."""
    return photo if isinstance(photo, Photo) else load_photo(photo, name)
