"""COCO splits through pycocotools, and the torch dataset training reads.

Training data of both kinds (labeled COCO and pseudo-labeled Parquet) becomes a list of
:class:`Record` (image path + boxes + contiguous labels), so one dataset class serves
teacher and student alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from raydd import storage
from raydd.config import CocoSplit

logger = logging.getLogger(__name__)


def load_coco(annotations: str) -> COCO:
    """Loads a COCO JSON (local path or URI) with pycocotools, keeping its progress
    prints off stdout."""
    coco = COCO()
    coco.dataset = json.loads(storage.read_bytes(annotations))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def image_location(split: CocoSplit, file_name: str) -> str:
    """Where a split's image ``file_name`` is (a local path or URI); an absolute
    ``file_name`` (as ``raydd export`` writes) is that location itself."""
    if "://" in file_name or file_name.startswith("/"):
        return file_name
    return storage.join(split.images, file_name)


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
    """One training image: ``boxes`` float32 ``[N, 4]`` xyxy pixels, ``labels [N]``.

    Optional per-instance targets: ``masks``, an object array ``[N]`` of compressed
    COCO RLE ``counts`` strings of size ``[height, width]``; ``keypoints``, float32
    ``[N, 3K]`` COCO triplets ``x, y, v`` in pixels (``v = 0``: not labeled).
    """

    path: str
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    height: int = 0
    width: int = 0


def _rle_counts(coco: COCO, ann: dict[str, Any]) -> str:
    """An annotation's polygon or RLE ``segmentation`` as compressed RLE counts."""
    counts = coco.annToRLE(ann)["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def coco_records(
    split: CocoSplit,
    categories: Categories,
    masks: bool = False,
    keypoints: bool = False,
    coco: COCO | None = None,
) -> list[Record]:
    """Every image of a COCO split (images without annotations too), minus crowds.

    With ``masks``/``keypoints`` the records carry those targets too (every kept
    annotation must then have ``segmentation``/``keypoints``). ``coco``: the split's
    annotations already loaded (otherwise read from ``split.annotations``).
    """
    coco = load_coco(split.annotations) if coco is None else coco
    num_keypoints = len(keypoint_names(coco)) if keypoints else 0
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(
            -1, 4
        )
        records.append(
            Record(
                image_location(split, info["file_name"]),
                box_convert(xywh, "xywh", "xyxy").numpy(),
                np.array(
                    [categories.to_label(a["category_id"]) for a in anns], np.int64
                ),
                np.array([_rle_counts(coco, a) for a in anns], object)
                if masks
                else None,
                np.array([a["keypoints"] for a in anns], np.float32).reshape(
                    -1, 3 * num_keypoints
                )
                if keypoints
                else None,
                int(info["height"]),
                int(info["width"]),
            )
        )
    return records


def image_paths(split: CocoSplit) -> list[str]:
    """Paths of every image a COCO split lists, in its order."""
    coco = load_coco(split.annotations)
    return [image_location(split, i["file_name"]) for i in coco.dataset["images"]]


def instances_per_image(records: list[Record]) -> float:
    """Mean number of instances per image (the paper's threshold target)."""
    return float(np.mean([len(r.labels) for r in records])) if records else 0.0
