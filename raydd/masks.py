"""Soft instance masks -> COCO RLE, without ever allocating a full image per mask.

Mask R-CNN predicts an ``M x M`` soft mask inside each box. torchvision pastes every
mask into a full-size image (``paste_masks_in_image``): ``N x H x W`` floats, which at
100 instances of a 1333 x 1000 image is half a gigabyte. Here each mask is pasted only
into its box (:func:`paste_in_box`, the same arithmetic as torchvision's, tested equal)
and run-length encoded straight from that crop (:func:`crop_rle`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks


def paste_in_box(
    mask: torch.Tensor, box: torch.Tensor, height: int, width: int
) -> tuple[np.ndarray, int, int]:
    """Pastes one ``[M, M]`` soft mask into its xyxy ``box`` of a ``height x width``
    image, thresholded at 0.5.

    Returns:
        ``(crop, x0, y0)``: the boolean mask of the image region starting at column
        ``x0``, row ``y0``; every pixel outside that region is background.
    """
    padded, scale = expand_masks(mask[None, None], padding=1)
    x_a, y_a, x_b, y_b = expand_boxes(box[None].float(), scale)[0].long().tolist()
    w, h = max(x_b - x_a + 1, 1), max(y_b - y_a + 1, 1)
    resized = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)
    x0, x1 = max(x_a, 0), min(x_b + 1, width)
    y0, y1 = max(y_a, 0), min(y_b + 1, height)
    x1, y1 = max(x1, x0), max(y1, y0)
    crop = resized[0, 0, y0 - y_a : y1 - y_a, x0 - x_a : x1 - x_a] > 0.5
    return crop.cpu().numpy(), x0, y0


def crop_rle(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> str:
    """The compressed COCO RLE ``counts`` of a ``height x width`` mask that is
    ``crop`` at ``(x0, y0)`` and background elsewhere.

    COCO RLE runs go down columns, starting with background; only the crop's columns
    are materialised (``height x crop width`` bytes).
    """
    h, w = crop.shape
    strip = np.zeros((height, w), np.uint8)
    strip[y0 : y0 + h] = crop
    flat = strip.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    if not counts:
        counts = [0]
    counts[0] += x0 * height  # background columns before the crop
    after = (width - x0 - w) * height  # ... and after it
    if len(counts) % 2:  # the last run is background
        counts[-1] += after
    elif after:
        counts.append(after)
    rle = mask_utils.frPyObjects(
        {"size": [height, width], "counts": counts}, height, width
    )
    return rle["counts"].decode("ascii")


def mask_rles(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int
) -> np.ndarray:
    """Soft masks ``[N, M, M]`` in xyxy ``boxes`` ``[N, 4]`` -> ``N`` RLE strings."""
    out = np.empty(len(masks), dtype=object)
    for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        out[i] = crop_rle(*paste_in_box(mask, box, height, width), height, width)
    return out


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    """``uint8 [height, width]`` mask of a compressed RLE string."""
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()})
