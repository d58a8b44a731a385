"""Fusing the detections of all views into one set per image (step 3 of the paper).

Every method takes the union of all views' detections of a *batch* of images, already
mapped back to the original images: ``boxes`` float ``[N, 4]`` xyxy in original-image
pixels, ``scores`` ``[N]``, ``labels`` int64 ``[N]`` and ``images`` int64 ``[N]`` (the
index of the image each detection belongs to). It returns the fused ``(boxes, scores,
labels, images)``, sorted by image ascending then score descending, at most
``max_detections`` per image. Neither classes nor images ever merge with each other.

Methods (``EnsembleConfig.method``):

* ``nms``: class-wise non-maximum suppression at ``nms_iou``.
* ``soft_nms``: Gaussian soft-NMS (Bodla et al., ICCV 2017).
* ``box_voting``: Detectron's ``BBOX_VOTE`` (NMS, then score-weighted mean of voters).
* ``wbf``: weighted boxes fusion (Solovyev et al. 2021), as ``weighted_boxes_fusion``
  of the ``ensemble-boxes`` package (v1.0.9, ``conf_type='avg'``, all weights 1,
  ``skip_box_thr=0``), each view being one of its "models".

Soft-NMS and WBF are sequential within a group (one image, one label). They run over
all groups of the batch at once: detections are sorted by (group, score descending)
and padded into ``[G, M]`` tensors, and the loop runs over the rank ``j < M``,
handling the ``j``-th detection of every group in one step.

Deliberate differences from ``ensemble-boxes`` (the tests check the rest against it):

* Boxes stay in pixels; nothing is clipped to ``[0, 1]`` and no coordinates are
  swapped (torchvision already returns valid boxes). IoU does not depend on scale.
* Zero-area boxes are kept (``ensemble-boxes`` drops them with a warning); their IoU
  with anything is 0, so ``wbf`` leaves each as a cluster of its own.
* Equal scores are taken in input order (``ensemble-boxes``: numpy's unstable
  ``argsort`` reversed).
* ``wbf`` weighs a box by ``max(score, tiny)``, so a cluster of zero-score boxes is
  their plain mean instead of NaN; it accumulates in the boxes' dtype (float32),
  ``ensemble-boxes`` in float32 coordinates and float64 scores.
* ``soft_nms`` returns the decayed scores, as Bodla et al. do; ``ensemble-boxes``
  keeps the same boxes but returns their original scores. A box is kept if its score
  is ``>= soft_nms_min_score`` (``ensemble-boxes``: ``>``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torchvision.ops import batched_nms

from raydd.config import ConfigError, EnsembleConfig

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _Groups(NamedTuple):
    """Detections grouped by (image, label); groups are numbered by size, largest
    first, so the groups that still have a ``j``-th detection are a prefix."""

    ids: torch.Tensor  # [N] group of each detection
    order: torch.Tensor  # [N] detections sorted by (group, score descending)
    sizes: torch.Tensor  # [G] detections per group, descending
    starts: torch.Tensor  # [G] first position of each group in ``order``

    def padded(self) -> tuple[torch.Tensor, list[int]]:
        """``[G, M]`` detection indices (``-1`` pads each row's end) and, for each
        rank ``j < M``, how many groups have more than ``j`` detections."""
        num, width = len(self.sizes), int(self.sizes[0]) if len(self.sizes) else 0
        index = torch.full((num, width), -1, dtype=torch.int64, device=self.ids.device)
        group = self.ids[self.order]
        rank = torch.arange(len(group), device=group.device) - self.starts[group]
        index[group, rank] = self.order
        ranks = torch.arange(width, device=group.device)
        return index, (self.sizes[None, :] > ranks[:, None]).sum(1).tolist()


def _group(scores: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> _Groups:
    # One int64 key per (image, label); torch.unique(dim=...) is ~50x slower.
    low = labels.min() if len(labels) else 0
    span = labels.max() - low + 1 if len(labels) else 1
    _, inverse = torch.unique(images * span + labels - low, return_inverse=True)
    sizes = torch.bincount(inverse)
    by_size = torch.argsort(sizes, descending=True, stable=True)
    ids = torch.argsort(by_size)[inverse]
    sizes = sizes[by_size]
    order = _sort(ids, scores)
    return _Groups(ids, order, sizes, torch.cumsum(sizes, 0) - sizes)


def _sort(keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Indices sorted by key ascending, then score descending, then input order."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[torch.argsort(keys[order], stable=True)]


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of xyxy boxes stored coordinate-first, ``a [4, ...]`` and
    ``b [4, ...]`` (broadcast), as ``torchvision.ops.box_iou`` computes it. Whole
    coordinate planes are contiguous, which makes this ~4x faster than ``[..., 4]``.
    Two zero-area boxes overlap by 0.
    """
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    width = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_min(0)
    height = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_min(0)
    inter = width * height
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union.clamp_min(torch.finfo(union.dtype).tiny)  # 0, not NaN, if 0


def _top_per_image(
    scores: torch.Tensor, images: torch.Tensor, max_detections: int
) -> torch.Tensor:
    """Indices sorted by (image, score descending), ``max_detections`` per image."""
    order = _sort(images, scores)
    sorted_images = images[order]
    counts = torch.bincount(sorted_images)
    rank = (
        torch.arange(len(order), device=order.device)
        - (torch.cumsum(counts, 0) - counts)[sorted_images]
    )
    return order[rank < max_detections]


def _nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    images: torch.Tensor,
    groups: _Groups,
    config: EnsembleConfig,
) -> torch.Tensor:
    # float64: batched_nms offsets each group's boxes by (group * max coordinate),
    # which in float32 would round IoUs near the threshold the wrong way.
    keep = batched_nms(boxes.double(), scores.double(), groups.ids, config.nms_iou)
    return keep[_top_per_image(scores[keep], images[keep], config.max_detections)]


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    config: EnsembleConfig,
    num_views: int,
) -> Detections:
    """Class-wise non-maximum suppression at ``config.nms_iou``."""
    keep = _nms(boxes, scores, images, _group(scores, labels, images), config)
    return boxes[keep], scores[keep], labels[keep], images[keep]


def box_voting(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    config: EnsembleConfig,
    num_views: int,
) -> Detections:
    """Class-wise NMS, then each kept box becomes the score-weighted mean of every
    same-image, same-class box overlapping it by IoU >= ``config.vote_iou``
    (Detectron's ``BBOX_VOTE`` with its default ``ID`` scoring: the kept box's score
    is unchanged)."""
    groups = _group(scores, labels, images)
    keep = _nms(boxes, scores, images, groups, config)
    # Every (kept box, box of its group) pair, without padding: kept box k owns
    # the next sizes[group of k] pairs.
    kept_group = groups.ids[keep]
    pairs = groups.sizes[kept_group]
    owner = torch.repeat_interleave(torch.arange(len(keep), device=keep.device), pairs)
    first = torch.cumsum(pairs, 0) - pairs
    within = torch.arange(len(owner), device=owner.device) - first[owner]
    voter = groups.order[groups.starts[kept_group][owner] + within]
    iou = _iou(boxes[keep][owner].T, boxes[voter].T)
    weight = (iou >= config.vote_iou) * scores[voter].clamp_min(1e-6)
    total = torch.zeros_like(scores[keep]).index_add_(0, owner, weight)
    voted = torch.zeros_like(boxes[keep]).index_add_(
        0, owner, weight[:, None] * boxes[voter]
    )
    voted = voted / total.clamp_min(1e-12)[:, None]
    # A zero-area kept box overlaps nothing, not even itself: it stays as it is.
    voted = torch.where(total[:, None] > 0, voted, boxes[keep])
    return voted, scores[keep], labels[keep], images[keep]


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    config: EnsembleConfig,
    num_views: int,
) -> Detections:
    """Gaussian soft-NMS (Bodla et al. 2017) per image and class: repeatedly keep the
    highest remaining score and decay every other remaining score by
    ``exp(-iou^2 / soft_nms_sigma)``, dropping those below ``soft_nms_min_score``."""
    index, active = _group(scores, labels, images).padded()
    box = boxes.T[:, index.clamp_min(0)]  # [4, G, M]
    score = scores[index.clamp_min(0)]
    remaining = (index >= 0) & (score >= config.soft_nms_min_score)
    kept = torch.zeros_like(remaining)
    rows = torch.arange(len(index), device=index.device)
    # Group g makes at most sizes[g] picks, so pick t only concerns active[t] groups;
    # picks come in descending final score, so later ones would be cut per image.
    for num in active[: config.max_detections]:
        row, left, current = rows[:num], remaining[:num], score[:num]
        best = current.masked_fill(~left, -torch.inf).argmax(1)
        picked = left[row, best]  # False for groups with nothing left
        if not picked.any():
            break
        kept[row, best] |= picked
        left[row, best] = False
        iou = _iou(box[:, row, best, None], box[:, :num])
        decay = torch.exp(-(iou**2) / config.soft_nms_sigma)
        current.copy_(torch.where(left & picked[:, None], current * decay, current))
        left &= current >= config.soft_nms_min_score
    index, score = index[kept], score[kept]
    order = _top_per_image(score, images[index], config.max_detections)
    index, score = index[order], score[order]
    return boxes[index], score, labels[index], images[index]


def wbf(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    config: EnsembleConfig,
    num_views: int,
) -> Detections:
    """Weighted boxes fusion per image and class, as ``ensemble-boxes``.

    In descending score order, each box joins the cluster whose current fused box
    overlaps it most if that IoU is > ``config.wbf_iou``, else starts a cluster. A
    fused box is the score-weighted mean of its members; its score is their mean
    score times ``min(num_views, members) / num_views``.
    """
    index, active = _group(scores, labels, images).padded()
    num, width = index.shape
    box = boxes.T[:, index.clamp_min(0)]  # [4, G, M]
    score = scores[index.clamp_min(0)]
    weight = score.clamp_min(torch.finfo(score.dtype).tiny)
    # What each box adds to its cluster: weight * box, weight, score, one member.
    adds = torch.cat(
        [weight * box, torch.stack([weight, score, torch.ones_like(score)])]
    )
    adds = adds.permute(1, 2, 0).contiguous()  # [G, M, 7], like a cluster's sums
    sums = torch.zeros_like(adds)
    fused = torch.zeros_like(box)  # [4, G, M]
    clusters = torch.zeros(num, dtype=torch.int64, device=index.device)
    rows = torch.arange(num, device=index.device)
    slots = torch.arange(width, device=index.device)
    for j, n in enumerate(active):  # the j-th box of the n groups that have one
        row, count = rows[:n], clusters[:n]
        slot = count.clone()  # a new cluster, unless one overlaps enough
        if j:
            used = int(count.max())
            iou = _iou(box[:, :n, j, None], fused[:, :n, :used])
            iou = iou.masked_fill(slots[:used] >= count[:, None], -1.0)
            best_iou, best = iou.max(1)  # first (oldest) cluster on ties, as argmax
            slot = torch.where(best_iou > config.wbf_iou, best, slot)
        sums.index_put_((row, slot), adds[:n, j], accumulate=True)
        total = sums[row, slot]
        fused[:, row, slot] = (total[:, :4] / total[:, 4:5]).T
        count += slot == count
    used = slots < clusters[:, None]
    first = index[:, :1].expand(num, width)[used]
    score_sum, members = sums[used][:, 5:].unbind(1)
    fused_scores = score_sum / members * members.clamp(max=num_views) / num_views
    order = _top_per_image(fused_scores, images[first], config.max_detections)
    first = first[order]
    fused = fused[:, used].T[order]
    return fused, fused_scores[order], labels[first], images[first]


FUSION_METHODS: dict[str, Callable[..., Detections]] = {
    "nms": nms,
    "soft_nms": soft_nms,
    "box_voting": box_voting,
    "wbf": wbf,
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
    images: torch.Tensor,
    config: EnsembleConfig,
    num_views: int,
) -> Detections:
    """Fuses the detections of all views of a batch of images with ``config.method``.

    Args:
        boxes: float ``[N, 4]`` xyxy in original-image pixels, all views' detections.
        scores: ``[N]``.
        labels: int64 ``[N]``.
        images: int64 ``[N]``, the image (``0..B-1``) each detection belongs to.
        config: fusion settings.
        num_views: how many views the detections come from (WBF's "models").

    Returns:
        The fused ``(boxes, scores, labels, images)``, same dtypes and device, sorted
        by image ascending then score descending, at most ``config.max_detections``
        per image.

    Example:
        >>> boxes = torch.tensor([[10.0, 10, 50, 50], [12, 10, 52, 50]])
        >>> out = fuse(boxes, torch.tensor([0.9, 0.3]), torch.tensor([1, 1]),
        ...            torch.tensor([0, 0]), EnsembleConfig(method="wbf"), 2)
        >>> out[0].round(decimals=3).tolist(), round(out[1].item(), 3), out[3].tolist()
        ([[10.5, 10.0, 50.5, 50.0]], 0.6, [0])
    """
    check_method(config.method)
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    return FUSION_METHODS[config.method](
        boxes, scores, labels, images, config, num_views
    )
