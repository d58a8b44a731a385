"""Image decoding shared by inference (a Ray Data stage) and training."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from raydd import schema

logger = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Rotates as a viewer would (EXIF orientation); returns ``uint8 [H, W, 3]`` RGB."""
    image = ImageOps.exif_transpose(image)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float32 ``[3, H, W]`` in 0..1 (torchvision's contract)."""
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return F.to_dtype(chw, torch.float32, scale=True)


def load_rgb(path: str) -> np.ndarray:
    """Reads an image file as ``uint8 [H, W, 3]`` RGB."""
    with Image.open(path) as image:
        return to_rgb(image)


def decode_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Ray Data stage: encoded bytes -> RGB pixels (one CPU stage before inference).

    Reads ``bytes`` and ``path``; writes ``path``, ``image``, ``height``, ``width``,
    ``error``. An image that cannot be decoded keeps its row with a 1x1 black
    placeholder and the reason in ``error``, so nothing is silently dropped.
    """
    images, heights, widths, errors = [], [], [], []
    for data, path in zip(batch["bytes"], batch[schema.PATH], strict=True):
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = to_rgb(image)
            error = ""
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            logger.warning("cannot decode %s: %s", path, e)
            pixels, error = np.zeros((1, 1, 3), np.uint8), f"{type(e).__name__}: {e}"
        images.append(pixels)
        heights.append(pixels.shape[0] if not error else 0)
        widths.append(pixels.shape[1] if not error else 0)
        errors.append(error)
    image_column = np.empty(len(images), dtype=object)
    image_column[:] = images
    return {
        schema.PATH: np.asarray(batch[schema.PATH]),
        schema.IMAGE: image_column,
        schema.HEIGHT: np.asarray(heights, np.int64),
        schema.WIDTH: np.asarray(widths, np.int64),
        schema.ERROR: np.asarray(errors, dtype=object),
    }
