"""Input checks shared by the public entry points that take photos or images.

One check, one wording: every message names the argument (and the function), what was
expected, what was found and what to do. Only torch is imported here, so every stage can use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

RANGE_SLACK = 1e-4
"""Rounding slack tolerated outside [0, 1] (pixels are often quantised to 8 bits and back)."""

MIN_FACE_PHOTO_SIDE = 40
"""Fewest pixels on each side of a photo given to face detection: MTCNN finds faces of about 20
pixels and more, and its first stage needs a 12-pixel window at several scales."""


class ImageDtypeError(TypeError, ValueError):
    """Images of a dtype that is not floating point (e.g. 8-bit photos not yet divided by 255).

    Both a ``TypeError`` and a ``ValueError``, so code written against either keeps working."""


def _where(fn: str | None, name: str) -> str:
    return f"{fn}: {name}" if fn else name


def check_images(images: Tensor, name: str = "images", *, fn: str | None = None, batched: bool = True,
                 unit_range: bool = True, min_side: int = 1) -> None:
    """Check RGB images ``[N, H, W, 3]`` (``batched``) or one image ``[H, W, 3]``: floats in [0, 1].

    Args:
        images: what the caller was given.
        name: the argument's name, as the caller's signature spells it.
        fn: the public function's name, put before ``name`` in messages.
        batched: expect a batch dimension (and at least one image in it).
        unit_range: also check that every value is finite and in [0, 1] (one pass over the pixels).
        min_side: the least height and width in pixels.

    Raises:
        TypeError: not a tensor; :class:`ImageDtypeError` (a TypeError and a ValueError): not floating
            point (uint8 photos: divide by 255).
        ValueError: wrong shape, no images, too small, NaN/inf pixels, values outside [0, 1].
    """
    what = _where(fn, name)
    layout = "[N, H, W, 3]" if batched else "[H, W, 3]"
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor {layout} of floats in [0, 1], got {type(images).__name__}; "
                        "convert with torch.as_tensor(...).float() / 255 for 8-bit pixels")
    ndim = 4 if batched else 3
    if images.ndim != ndim or images.shape[-1] != 3:
        hint = ""
        if images.ndim == ndim and images.shape[-3] == 3:
            hint = " (channels first? move them last with .permute(0, 2, 3, 1))" if batched else \
                " (channels first? move them last with .permute(1, 2, 0))"
        elif images.ndim == ndim - 1 and images.shape[-1] == 3 and batched:
            hint = " (one image? add the batch dimension with image[None])"
        raise ValueError(f"{what} must be {layout} RGB, got {tuple(images.shape)}{hint}")
    if batched and images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (shape {tuple(images.shape)}): pass at least one image")
    if not images.is_floating_point():
        raise ImageDtypeError(f"{what} must be floats in [0, 1], got dtype {images.dtype}"
                              + ("; divide uint8 images by 255 (.float() / 255)" if images.dtype == torch.uint8 else ""))
    H, W = images.shape[-3], images.shape[-2]
    if H < min_side or W < min_side:
        raise ValueError(f"{what} {'are' if batched else 'is'} {H}x{W} pixels; need at least {min_side}x{min_side} (a face must be about 20 "
                         "pixels across to be found): pass a larger photo or upsample it")
    if not unit_range:
        return
    finite = torch.isfinite(images).flatten(-3).all(-1)   # per image ([N] or [])
    if not bool(finite.all()):
        which = f" (images {torch.nonzero(~finite).flatten().tolist()[:10]})" if batched else ""
        count = int((~torch.isfinite(images)).sum())
        raise ValueError(f"{what} {'hold' if batched else 'holds'} {count} NaN or infinite pixel values{which}: a "
                         f"damaged photo or a failed conversion; fix or drop {'those images' if batched else 'it'}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        hint = "they look like 0..255: divide by 255" if hi > 1.5 else f"clamp them first ({name}.clamp(0, 1))"
        raise ValueError(f"{what} must hold values in [0, 1], found [{lo:.4g}, {hi:.4g}]; {hint}")
