"""COCO splits through pycocotools, and the torch dataset training reads.

Training data of both kinds (labeled COCO and pseudo-labeled Parquet) becomes a list of
:class:`Record` (image path + boxes + contiguous labels), so one dataset class serves
teacher and student alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from raydd.config import CocoSplit
from raydd.data.images import load_rgb, to_tensor
from raydd.views import hflip_boxes

logger = logging.getLogger(__name__)


def load_coco(annotations: str) -> COCO:
    """Loads a COCO JSON with pycocotools, keeping its progress prints off stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(annotations)


@dataclass(frozen=True)
class Categories:
    """Maps COCO category ids to torchvision's contiguous labels ``1..K`` and back."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, coco: COCO) -> Categories:
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))

    @property
    def num_classes(self) -> int:
        """Number of model outputs, background included."""
        return len(self.ids) + 1

    def to_label(self, category_id: int) -> int:
        return self.ids.index(category_id) + 1

    def to_category(self, label: int) -> int:
        return self.ids[label - 1]


def keypoint_names(coco: COCO) -> tuple[str, ...]:
    """The keypoint names of a COCO split (the categories' ``keypoints`` field).

    Categories without keypoints (no field, or an empty list) are skipped, so a split
    that adds keypoints to some categories only is fine; torchvision's keypoint head
    is class-agnostic, so all the others must agree.

    Returns:
        The names in annotation order (``keypoints[3 * i : 3 * i + 3]`` is name
        ``i``); an empty tuple when no category has keypoints.

    Raises:
        ValueError: two categories name different keypoints.
    """
    named = {
        tuple(c["keypoints"]): c["name"]
        for c in coco.loadCats(coco.getCatIds())
        if c.get("keypoints")
    }
    if len(named) > 1:
        raise ValueError(
            f"categories disagree on keypoint names: {named}; one list is needed"
        )
    return next(iter(named), ())


_MIRROR = {"left": "right", "right": "left"}


def keypoint_flip_permutation(names: Sequence[str]) -> list[int]:
    """Where each keypoint goes under a horizontal flip (torchvision's ``flip_inds``).

    A name containing ``left`` pairs with the same name with ``right`` instead, and
    vice versa (``left_eye`` <-> ``right_eye``; the demo's ``left`` <-> ``right``);
    other names map to themselves. A left/right name whose partner is missing also
    maps to itself, with a warning: the data may still be usable, a crash is not.

    Args:
        names: keypoint names in annotation order (see :func:`keypoint_names`).

    Returns:
        ``perm`` with ``flipped[:, i] = keypoints[:, perm[i]]`` after mirroring x;
        ``perm`` is its own inverse.

    Raises:
        ValueError: ``names`` has duplicates.

    Example:
        >>> keypoint_flip_permutation(["nose", "left_eye", "right_eye"])
        [0, 2, 1]
    """
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate keypoint names: {list(names)}")
    index = {name: i for i, name in enumerate(names)}
    permutation = []
    for i, name in enumerate(names):
        mirror = re.sub("left|right", lambda m: _MIRROR[m.group()], name)
        if mirror != name and mirror not in index:
            logger.warning("keypoint %r has no mirror %r; flips keep it", name, mirror)
        permutation.append(index.get(mirror, i))
    return permutation


@dataclass(frozen=True)
class Record:
    """One training image: ``boxes`` float32 ``[N, 4]`` xyxy pixels, ``labels [N]``."""

    path: str
    boxes: np.ndarray
    labels: np.ndarray


def coco_records(split: CocoSplit, categories: Categories) -> list[Record]:
    """Every image of a COCO split (images without annotations too), minus crowds."""
    coco = load_coco(split.annotations)
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(
            -1, 4
        )
        boxes = box_convert(xywh, "xywh", "xyxy").numpy()
        labels = np.array(
            [categories.to_label(a["category_id"]) for a in anns], np.int64
        )
        path = os.path.join(split.images, info["file_name"])
        records.append(Record(path, boxes, labels))
    return records


def image_paths(split: CocoSplit) -> list[str]:
    """Paths of every image a COCO split lists, in its order."""
    coco = load_coco(split.annotations)
    return [os.path.join(split.images, i["file_name"]) for i in coco.dataset["images"]]


def instances_per_image(records: list[Record]) -> float:
    """Mean number of instances per image (the paper's threshold target)."""
    return float(np.mean([len(r.labels) for r in records])) if records else 0.0


class DetectionDataset(torch.utils.data.Dataset):
    """``(image, target)`` pairs in torchvision's detection contract.

    ``image`` is float32 ``[3, H, W]`` in 0..1; ``target`` has ``boxes`` (float32
    ``[N, 4]`` xyxy pixels) and ``labels`` (int64 ``[N]``). ``N`` may be 0.
    Horizontal flips (with probability ``hflip_prob``) are the only augmentation here;
    scale jitter is torchvision's multi-scale ``min_size``.
    """

    def __init__(self, records: list[Record], hflip_prob: float = 0.0) -> None:
        self.records = records
        self.hflip_prob = hflip_prob

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        image = to_tensor(load_rgb(record.path))
        boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
        if self.hflip_prob and torch.rand(()) < self.hflip_prob:
            image, boxes = image.flip(-1), hflip_boxes(boxes, image.shape[-1])
        target = {
            "boxes": boxes,
            "labels": torch.tensor(record.labels, dtype=torch.int64),
        }
        return image, target


def collate(
    batch: list[Any],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Keeps images and targets as lists (torchvision detectors take ragged sizes)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
