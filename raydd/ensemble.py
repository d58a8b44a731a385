"""Fusing the detections of all views of one image into one set (step 3 of the paper).

Every method takes the union of the views' detections, already mapped back to the
original image: ``boxes`` float32 ``[N, 4]`` xyxy, ``scores`` ``[N]``, ``labels``
int64 ``[N]``, and returns the fused ``(boxes, scores, labels)``, sorted by score and
cut to ``max_detections``. Classes never merge with each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.ops import batched_nms, box_iou

from raydd.config import ConfigError, EnsembleConfig

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    config: EnsembleConfig,
) -> Detections:
    """Class-wise non-maximum suppression at ``config.nms_iou``."""
    keep = batched_nms(boxes, scores, labels, config.nms_iou)[: config.max_detections]
    return boxes[keep], scores[keep], labels[keep]


def box_voting(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    config: EnsembleConfig,
) -> Detections:
    """Class-wise NMS, then each kept box becomes the score-weighted mean of every
    same-class box overlapping it by IoU >= ``config.vote_iou`` (Detectron's
    ``BBOX_VOTE`` with its default ``ID`` scoring: the kept box's score is unchanged).
    """
    kept_boxes, kept_scores, kept_labels = nms(boxes, scores, labels, config)
    if len(kept_boxes) == 0:
        return kept_boxes, kept_scores, kept_labels
    same_class = kept_labels[:, None] == labels[None, :]
    voters = (box_iou(kept_boxes, boxes) >= config.vote_iou) & same_class
    weights = voters * scores.clamp_min(1e-6)[None, :]  # zero-score boxes still count
    voted = (weights @ boxes) / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return voted, kept_scores, kept_labels


FUSION_METHODS: dict[str, Callable[..., Detections]] = {
    "nms": nms,
    "box_voting": box_voting,
}


def check_method(name: str) -> None:
    """Raises :class:`ConfigError` listing the known methods if ``name`` is unknown."""
    if name not in FUSION_METHODS:
        raise ConfigError(
            f"ensemble.method: unknown fusion method {name!r}; "
            f"known: {sorted(FUSION_METHODS)}"
        )


def fuse(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    config: EnsembleConfig,
) -> Detections:
    """Fuses one image's detections with ``config.method``."""
    check_method(config.method)
    return FUSION_METHODS[config.method](boxes, scores, labels, config)
