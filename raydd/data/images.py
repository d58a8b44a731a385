"""Image decoding shared by inference (a Ray Data stage) and training.

:func:`decode` turns the bytes of any file a web crawl contains into RGB pixels, or
raises. The choices, made once here so every stage sees the same pixels:

- **Orientation**: rotated as a viewer shows it (``ImageOps.exif_transpose``).
- **Transparency** (RGBA, LA, PA, palette or grayscale/RGB with a ``tRNS`` colour):
  composited onto **white**, as a web page shows it; transparent pixels often hold
  junk (or black) colour values, and dark logos on black would vanish.
- **16-bit grayscale** (``I;16``/``I``): scaled by 1/257 to 8 bits (PIL's
  ``convert("RGB")`` clips everything above 255 to white). 16-bit RGB(A) PNGs are
  already reduced to 8 bits by PIL's reader.
- **CMYK** (including Adobe-inverted CMYK JPEGs, which PIL detects) -> RGB by PIL.
- **Large images**: with ``max_size`` the longer side is brought down to
  ``max_size``; a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself
  (``Image.draft``) so it never exists at full resolution, then Lanczos-resampled.
- **Broken files**: truncated data, zero bytes, non-images and decompression bombs
  (PIL's ``DecompressionBombError``) raise; :func:`decode_rows` turns that into an
  error row. ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False so a truncated file
  never comes back half grey.
- **Animations** (GIF, APNG, WebP): the first frame.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from raydd import schema, storage

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # what transparent pixels become
_ORIENTATION = 0x0112  # EXIF tag
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the image by 90 degrees
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode(
    data: bytes, max_size: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes an encoded image into RGB pixels, as a viewer would show it.

    Args:
        data: the file's bytes (any format PIL reads).
        max_size: if given, images whose longer side exceeds it are downscaled so
            the longer side is ``max_size`` (aspect ratio kept). Smaller images are
            never enlarged.

    Returns:
        ``(pixels, (height, width))``: ``uint8 [h, w, 3]`` RGB pixels (writable) and
        the size of the original image after EXIF rotation, before downscaling.

    Raises:
        Exception: any reason the bytes are not a complete, decodable image
            (``ValueError`` for zero bytes, ``UnidentifiedImageError``, ``OSError``
            for truncated data, ``PIL.Image.DecompressionBombError``, ...).
    """
    if not len(data):
        raise ValueError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's message names a BytesIO address; the first bytes say more
        raise UnidentifiedImageError(
            f"not an image format PIL reads (starts with {bytes(data[:16])!r})"
        ) from None
    with image:
        orig = _oriented_size(image)
        if max_size is not None and max(orig) > max_size:
            _draft(image, max_size / max(orig))
        image.load()  # decodes now: truncated data raises here
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _to_rgb8(image)
    if max_size is not None and max(orig) > max_size:
        rgb = _shrink(rgb, orig, max_size)
    return np.array(rgb, dtype=np.uint8), orig


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` as displayed. A JPEG is not decoded for this (a PNG is:
    PIL loads it to find an ``eXIf`` chunk after the pixels)."""
    width, height = image.size
    if image.getexif().get(_ORIENTATION, 1) in _SWAPS_SIDES:
        return width, height
    return height, width


def _draft(image: Image.Image, scale: float) -> None:
    """Lets a JPEG decoder skip detail: decodes at >= ``scale`` (1/2, 1/4 or 1/8).

    A no-op for other formats. Must run before ``load()``.
    """
    width, height = image.size
    image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, alpha composited onto :data:`BACKGROUND`."""
    if image.mode in _SIXTEEN_BIT:
        image = _sixteen_to_eight(image)
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(
            np.nan_to_num(values).round().clip(0, 255).astype(np.uint8)
        )
    has_alpha = "A" in image.getbands() or "a" in image.getbands()
    if has_alpha or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """16-bit grayscale (held in ``I;16*`` or 32-bit ``I``) -> 8-bit ``L``.

    ``I`` images whose values all fit in 8 bits are kept as they are.
    """
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0  # 65535 -> 255 exactly
    return Image.fromarray(values.round().clip(0, 255).astype(np.uint8))


def _shrink(image: Image.Image, orig: tuple[int, int], max_size: int) -> Image.Image:
    scale = max_size / max(orig)
    size = (max(1, round(orig[1] * scale)), max(1, round(orig[0] * scale)))
    if image.size == size:
        return image
    # reducing_gap: a fast box reduction first, Lanczos for the last factor <= 3
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Rotates as a viewer would (EXIF orientation); returns ``uint8 [H, W, 3]`` RGB.

    Same conversions as :func:`decode` (transparency onto white, 16-bit scaled).
    """
    image = ImageOps.exif_transpose(image)
    return np.array(_to_rgb8(image), dtype=np.uint8)  # a writable copy


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float32 ``[3, H, W]`` in 0..1 (torchvision's contract)."""
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return F.to_dtype(chw, torch.float32, scale=True)


def load_rgb(uri: str) -> np.ndarray:
    """Reads an image file (local path or URI) as ``uint8 [H, W, 3]`` RGB (see
    :func:`decode`)."""
    return decode(storage.read_bytes(uri))[0]


def decode_rows(
    paths: Sequence[Any], fetch: Callable[[int], bytes], max_size: int | None = None
) -> dict[str, np.ndarray]:
    """Decodes one batch; a failure becomes an error row, never an exception.

    Args:
        paths: the ``path`` column (used in warnings).
        fetch: returns the encoded bytes of row ``i`` (may raise, e.g. for a
            missing file).
        max_size: see :func:`decode`.

    Returns:
        columns ``image`` (object array of ``uint8 [h, w, 3]``), ``height``,
        ``width`` (int64, original size; 0 on error) and ``error`` (``""`` or
        ``"<ExceptionType>: message"``; the image is then a 1x1 black placeholder).
    """
    n = len(paths)
    images = np.empty(n, dtype=object)
    heights, widths = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            images[i], (heights[i], widths[i]) = decode(fetch(i), max_size)
        except Exception as e:  # noqa: BLE001 - any failure is a bad image, not a crash
            logger.warning("cannot read or decode %s: %s", paths[i], e)
            images[i] = np.zeros((1, 1, 3), np.uint8)
            errors[i] = f"{type(e).__name__}: {e}"
    return {
        schema.IMAGE: images,
        schema.HEIGHT: heights,
        schema.WIDTH: widths,
        schema.ERROR: errors,
    }


def decode_batch(batch: dict[str, Any], max_size: int | None = None) -> dict[str, Any]:
    """Ray Data stage: encoded bytes -> RGB pixels (one CPU stage before inference).

    Reads ``bytes`` and ``path``; writes ``path``, ``image``, ``height``, ``width``,
    ``error`` (see :func:`decode_rows`). An image that cannot be decoded keeps its
    row with a 1x1 black placeholder and the reason in ``error``, so nothing is
    silently dropped.
    """
    paths = batch[schema.PATH]
    data = batch["bytes"]
    return {
        schema.PATH: np.asarray(paths),
        **decode_rows(paths, data.__getitem__, max_size),
    }
