"""Geometric test-time views: each one knows how to undo itself on boxes.

A :class:`View` resizes (shorter side to ``scale`` pixels, longer side at most
``max_size``) and/or mirrors an image; :meth:`View.invert_boxes` maps the boxes
predicted on the view back to the original image, so views can be fused
(:mod:`raydd.ensemble`). ``invert_boxes(apply_boxes(b))`` is ``b`` up to float
rounding. Per-instance maps (Mask R-CNN's soft masks, Keypoint R-CNN's heatmaps) live
in box-relative grids, which a resize leaves unchanged; :meth:`View.invert_masks` and
:meth:`View.invert_heatmaps` undo the mirror (heatmaps also swap left and right
keypoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

from raydd.config import ViewConfig


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirrors xyxy boxes ``[N, 4]`` in an image ``width`` pixels wide."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([width - x1, y0, width - x0, y1], dim=-1)


@dataclass(frozen=True)
class View:
    """Resize-then-flip transform of one image (the paper's scales and flip)."""

    scale: int | None = None
    max_size: int | None = None
    hflip: bool = False

    @classmethod
    def from_config(cls, config: ViewConfig) -> View:
        return cls(scale=config.scale, max_size=config.max_size, hflip=config.hflip)

    @property
    def name(self) -> str:
        parts = [f"scale{self.scale}" if self.scale else "original"]
        parts += [f"max{self.max_size}"] if self.max_size else []
        return "+".join(parts + (["hflip"] if self.hflip else []))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the view of an image of the given size."""
        factor = 1.0 if self.scale is None else self.scale / min(height, width)
        if self.max_size is not None:
            factor = min(factor, self.max_size / max(height, width))
        if factor == 1.0:
            return height, width
        return max(1, round(height * factor)), max(1, round(width * factor))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """Transforms a ``[3, H, W]`` image tensor into this view."""
        height, width = image.shape[-2:]
        size = self.output_size(height, width)
        if size != (height, width):
            image = F.resize(image, list(size), antialias=True)
        return image.flip(-1) if self.hflip else image

    def _factors(self, height: int, width: int) -> torch.Tensor:
        out_h, out_w = self.output_size(height, width)
        return torch.tensor([out_w / width, out_h / height] * 2)

    def apply_boxes(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Maps xyxy boxes of the original ``height x width`` image into the view."""
        boxes = boxes * self._factors(height, width).to(boxes)
        if self.hflip:
            boxes = hflip_boxes(boxes, self.output_size(height, width)[1])
        return boxes

    def invert_boxes(
        self, boxes: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """Maps xyxy boxes predicted on the view back to the original image."""
        if self.hflip:
            boxes = hflip_boxes(boxes, self.output_size(height, width)[1])
        return boxes / self._factors(height, width).to(boxes)

    def invert_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Maps box-relative soft masks ``[N, M, M]`` predicted on the view back."""
        return masks.flip(-1) if self.hflip else masks

    def invert_heatmaps(
        self, heatmaps: torch.Tensor, flip_permutation: list[int]
    ) -> torch.Tensor:
        """Maps box-relative keypoint heatmaps ``[N, K, S, S]`` predicted on the view
        back: mirrored and, under a flip, keypoint ``k`` takes the heatmap of
        ``flip_permutation[k]`` (the left eye of the mirror image is the right eye)."""
        if not self.hflip:
            return heatmaps
        return heatmaps.flip(-1)[:, flip_permutation]
