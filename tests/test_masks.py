import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from raydd.masks import crop_rle, decode_rle, mask_rles


def _boxes(generator: torch.Generator, n: int, height: int, width: int):
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    wh = torch.rand(n, 2, generator=generator) * 40 + 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


@pytest.mark.parametrize("seed", range(5))
def test_rles_equal_torchvision_full_image_paste(seed):
    generator = torch.Generator().manual_seed(seed)
    height, width = 57, 83
    boxes = _boxes(generator, 40, height, width)
    masks = torch.rand(40, 28, 28, generator=generator)
    expected = paste_masks_in_image(masks[:, None], boxes, (height, width))[:, 0] > 0.5
    rles = mask_rles(masks, boxes, height, width)
    for rle, mask in zip(rles, expected, strict=True):
        np.testing.assert_array_equal(decode_rle(rle, height, width), mask.numpy())


def test_crop_rle_matches_pycocotools_on_edges_and_empty_crops():
    rng = np.random.default_rng(0)
    height, width = 9, 7
    for x0, y0, h, w in [(0, 0, 9, 7), (6, 8, 1, 1), (3, 2, 4, 0), (0, 4, 5, 3)]:
        crop = rng.random((h, w)) > 0.5
        full = np.zeros((height, width), np.uint8)
        full[y0 : y0 + h, x0 : x0 + w] = crop
        expected = mask_utils.encode(np.asfortranarray(full))["counts"].decode()
        assert crop_rle(crop, x0, y0, height, width) == expected
