"""Image utilities: tensors and arrays to uint8 and PNG, colour maps, labelled grids, GIFs and data URIs.

Pure numpy, torch and Pillow (no plotly), so the report and the photo route can import it cheaply. Images are
``[H, W, 3]`` (or ``[H, W]`` scalar maps) with values in [0, 1] (floats) or 0..255 (uint8).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["to_uint8", "png_bytes", "colorize", "image_grid", "is_scalar_image", "save_gif", "data_uri"]


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """An image ``[H, W, 3]`` or ``[H, W]`` (float in [0, 1], or uint8) -> uint8 numpy array.

    Floats are clipped to [0, 1]; tensors are detached and moved to the CPU.
    """
    if isinstance(image, Tensor):
        image = image.detach().to("cpu")
        image = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"image must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(image: Tensor | np.ndarray | Image.Image, compress_level: int = 1) -> bytes:
    """Encode an image (see :func:`to_uint8`) or a PIL image as PNG bytes."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(to_uint8(image))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# Eight samples of matplotlib's viridis, interpolated linearly (no matplotlib dependency).
_VIRIDIS = np.array([
    [68, 1, 84], [70, 50, 127], [54, 92, 141], [39, 127, 142],
    [31, 161, 135], [74, 194, 109], [159, 218, 58], [253, 231, 37],
], dtype=np.float32)


def colorize(values: Tensor | np.ndarray, vmin: float = 0.0, vmax: float | None = None) -> np.ndarray:
    """Map a scalar image ``[H, W]`` to viridis colours ``[H, W, 3]`` uint8.

    Args:
        values: ``[H, W]`` scalars (an error map, a depth, a count).
        vmin: value drawn dark purple.
        vmax: value drawn yellow (default the maximum, or ``vmin + 1`` for a constant image).
    """
    if isinstance(values, Tensor):
        values = values.detach().to("cpu").float().numpy()
    v = np.asarray(values, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"colorize expects a scalar image [H, W], got shape {v.shape}")
    if vmax is None:
        finite = v[np.isfinite(v)]
        vmax = float(finite.max()) if finite.size else vmin + 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    t = np.clip(np.nan_to_num((v - vmin) / (vmax - vmin)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i0 = np.minimum(np.floor(t).astype(np.int64), len(_VIRIDIS) - 2)
    f = (t - i0)[..., None]
    rgb = _VIRIDIS[i0] * (1.0 - f) + _VIRIDIS[i0 + 1] * f
    return (rgb + 0.5).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def image_grid(images: Sequence[Tensor | np.ndarray] | Tensor, titles: Sequence[str] | None = None,
               cols: int = 4, *, min_height: int = 160, pad: int = 6, font_size: int = 14,
               vmax: float | None = None) -> Image.Image:
    """Lay images out in a grid with a title above each (render / ground truth / error rows).

    Args:
        images: N images, a sequence of ``[H, W, 3]`` colour images (float in [0, 1] or uint8)
            and/or ``[H, W]`` scalar images (drawn with :func:`colorize`, e.g. an error map), or a
            tensor ``[N, H, W, 3]``. Sizes may differ.
        titles: N strings (or ``None`` for no titles).
        cols: images per row.
        min_height: small images are enlarged by an integer factor (nearest neighbour, so pixels
            stay visible) until the tallest is at least this many pixels high.
        pad: white space between cells, in pixels.
        font_size: title size in pixels.
        vmax: colour scale maximum for scalar images (default each image's maximum).

    Returns:
        A ``PIL.Image.Image`` (RGB); notebooks display it as a PNG, ``.save(path)`` writes it.
    """
    if isinstance(images, Tensor):
        if images.ndim not in (3, 4):
            raise ValueError(f"images tensor must be [N, H, W, 3] or [N, H, W], got {tuple(images.shape)}")
        images = list(images)
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(titles)} titles")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    arrays = []
    for i, img in enumerate(images):
        try:
            a = to_uint8(img) if not is_scalar_image(img) else colorize(img, vmax=vmax)
        except ValueError as e:
            raise ValueError(f"image_grid: image {i}: {e}") from e
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        arrays.append(a[..., :3])
    tallest = max(a.shape[0] for a in arrays)
    factor = max(1, math.ceil(min_height / tallest))
    pils = [Image.fromarray(a).resize((a.shape[1] * factor, a.shape[0] * factor), Image.NEAREST) for a in arrays]
    cell_w = max(p.width for p in pils)
    cell_h = max(p.height for p in pils)
    font = _font(font_size)
    title_h = font_size + 6 if titles is not None else 0
    cols = min(cols, len(pils))
    rows = math.ceil(len(pils) / cols)
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * (cell_h + title_h) + (rows + 1) * pad),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(pils):
        r, c = divmod(i, cols)
        x0 = pad + c * (cell_w + pad)
        y0 = pad + r * (cell_h + title_h + pad)
        if titles is not None:
            draw.text((x0 + cell_w // 2, y0 + title_h // 2), str(titles[i]), fill=(0, 0, 0), font=font, anchor="mm")
        grid.paste(p, (x0 + (cell_w - p.width) // 2, y0 + title_h))
    return grid


def is_scalar_image(img: Tensor | np.ndarray) -> bool:
    shape = tuple(img.shape)
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] == 1 and not _is_uint8(img))


def _is_uint8(img: Tensor | np.ndarray) -> bool:
    return img.dtype in (torch.uint8, np.uint8)


# ----------------------------------------------------------------------------- plotly 3D helpers


def save_gif(frames: np.ndarray | Sequence[np.ndarray], path, fps: float = 12.0) -> None:
    """Write uint8 frames ``[n, H, W, 3]`` as a looping GIF (Pillow; no other dependency)."""
    images = [Image.fromarray(to_uint8(f)) for f in frames]
    if not images:
        raise ValueError("save_gif: no frames")
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False, disposal=2)


def data_uri(image: Tensor | np.ndarray | Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, compress_level=6)).decode("ascii")
