"""Training data for Ray Train, prepared by Ray Data, mixed exactly in every batch.

[1] :func:`records_dataset` turns :class:`~raydd.data.coco.Record` s (labeled COCO or
    thresholded pseudo-labels) into a Ray Dataset of *training rows*.
[2] :class:`Augment` is the Ray Data stage that decodes each image, resizes it to one
    of the training scales (multi-scale training) and mirrors it (keypoints swap
    left/right), so the training loop only moves tensors to its device.
[3] Inside each Ray Train worker, a :class:`RowStream` reads one dataset shard
    (``ray.train.get_dataset_shard``) epoch after epoch and knows its position;
    :func:`next_batch` takes exactly ``n_labeled`` rows from the labeled stream and
    ``n_pseudo`` from the pseudo-labeled one, so *every* minibatch holds the
    configured labeled share (the paper's fixed 6:4 mixture, not one "in
    expectation"). The smaller (labeled) set simply starts more epochs.

Training rows after :class:`Augment` (per row; ``N`` may be 0):

============= ====================== ============================================
column        dtype / shape           meaning
============= ====================== ============================================
``path``      str                     the image
``image``     uint8 ``[H, W, 3]``     RGB at the training scale, maybe mirrored
``boxes``     float32 ``[N, 4]``      xyxy pixels of ``image``
``labels``    int64 ``[N]``           contiguous labels ``1..K``
``masks``     uint8 ``[N, H, W]``     (Mask R-CNN) binary instance masks
``keypoints`` float32 ``[N, K, 3]``   (Keypoint R-CNN) ``x, y, v`` in pixels
============= ====================== ============================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch
import torch.nn.functional as F

from raydd import schema
from raydd.data.coco import Record
from raydd.data.images import decode
from raydd.masks import decode_rle
from raydd.sources import read_bytes
from raydd.views import hflip_boxes

logger = logging.getLogger(__name__)

LABELED, PSEUDO = "labeled", "pseudo"
ROWS_PER_BLOCK = 64  # undecoded rows per Ray Data block
AUGMENT_BATCH = 16  # images per Augment call (and per output block)


def split_batch(batch_size: int, labeled_share: float, pseudo: bool) -> tuple[int, int]:
    """``(n_labeled, n_pseudo)`` images per step: the share rounded, at least one
    labeled image; all labeled when there is no pseudo-labeled set."""
    if not pseudo:
        return batch_size, 0
    n_labeled = min(batch_size, max(1, round(batch_size * labeled_share)))
    return n_labeled, batch_size - n_labeled


def _row(record: Record) -> dict[str, Any]:
    row = {
        schema.PATH: record.path,
        schema.BOXES: np.asarray(record.boxes, np.float32).reshape(-1, 4),
        schema.LABELS: np.asarray(record.labels, np.int64).reshape(-1),
        schema.HEIGHT: record.height,
        schema.WIDTH: record.width,
    }
    if record.masks is not None:
        row[schema.MASKS] = [str(m) for m in record.masks]
    if record.keypoints is not None:
        row[schema.KEYPOINTS] = np.asarray(record.keypoints, np.float32)
    return row


def records_dataset(records: Sequence[Record]) -> ray.data.Dataset:
    """The records as a Ray Dataset of undecoded training rows (``path``, ``boxes``,
    ``labels``, ``height``, ``width`` and, when the records have them, ``masks`` as
    RLE strings and ``keypoints`` ``[N, 3K]``)."""
    if not records:
        raise ValueError("no training images")
    # blocks of ROWS_PER_BLOCK rows: Ray Data's default (at least 200 blocks) makes
    # one-row blocks of a small set, and scheduling those costs more than decoding
    blocks = -(-len(records) // ROWS_PER_BLOCK)
    return ray.data.from_items([_row(r) for r in records], override_num_blocks=blocks)


@dataclass(frozen=True)
class Augment:
    """Ray Data stage: training rows -> decoded, resized, maybe mirrored rows.

    Attributes:
        min_sizes: training scales (shorter side); one is drawn per image.
        max_size: cap on the longer side.
        hflip_prob: chance of mirroring.
        flip_permutation: where each keypoint goes under a flip
            (:func:`raydd.data.coco.keypoint_flip_permutation`); one entry per
            keypoint, so it also gives ``K``.
        masks: decode ``masks`` (RLE) into uint8 ``[N, H, W]``.
        keypoints: emit ``keypoints`` as ``[N, K, 3]``.
    """

    min_sizes: tuple[int, ...]
    max_size: int
    hflip_prob: float = 0.0
    flip_permutation: tuple[int, ...] = ()
    masks: bool = False
    keypoints: bool = False

    def __post_init__(self) -> None:
        if self.keypoints and not self.flip_permutation:
            raise ValueError(
                "keypoint training needs the keypoint names (COCO categories' "
                "'keypoints') for the flip permutation"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(batch[schema.PATH]):
            return batch
        rng = np.random.default_rng()
        rows = [
            self.row({k: v[i] for k, v in batch.items()}, rng)
            for i in range(len(batch[schema.PATH]))
        ]
        out = {}
        for name in rows[0]:
            out[name] = np.empty(len(rows), dtype=object)
            for i, row in enumerate(rows):
                out[name][i] = row[name]
        out[schema.PATH] = out[schema.PATH].astype(str)
        return out

    def row(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One row: decode, resize to a drawn scale, mirror with ``hflip_prob``."""
        path = str(row[schema.PATH])
        data = read_bytes(path)
        height, width = int(row[schema.HEIGHT]), int(row[schema.WIDTH])
        if not (height and width):  # size unknown: one full decode to learn it
            height, width = decode(data)[1]
        short, long = min(height, width), max(height, width)
        ratio = min(rng.choice(self.min_sizes) / short, self.max_size / long)
        size = (max(1, round(height * ratio)), max(1, round(width * ratio)))
        pixels, actual = decode(data, max_size=max(size))  # JPEGs shrink on decode
        if actual != (height, width):
            raise ValueError(
                f"{path} is {actual[1]}x{actual[0]} pixels but its labels are for "
                f"{width}x{height}"
            )
        pixels = _resize_pixels(pixels, size)
        scale = torch.tensor([size[1] / width, size[0] / height] * 2)
        # torch.tensor copies: Ray Data hands read-only views of its blocks
        target = {
            schema.BOXES: torch.tensor(row[schema.BOXES]).reshape(-1, 4) * scale,
            schema.LABELS: torch.tensor(row[schema.LABELS]).reshape(-1),
        }
        if self.masks:
            target[schema.MASKS] = _masks(row[schema.MASKS], height, width, size)
        if self.keypoints:
            points = torch.tensor(row[schema.KEYPOINTS]).reshape(
                len(target[schema.LABELS]), len(self.flip_permutation), 3
            )
            target[schema.KEYPOINTS] = points * torch.tensor([*scale[:2], 1.0])
        if rng.random() < self.hflip_prob:
            pixels, target = pixels[:, ::-1], self.hflip(target, size[1])
        return {
            schema.PATH: str(row[schema.PATH]),
            schema.IMAGE: np.ascontiguousarray(pixels),
            **{k: v.numpy() for k, v in target.items()},
        }

    def hflip(self, target: dict[str, torch.Tensor], width: int) -> dict[str, Any]:
        """Mirrors a target; keypoint ``i`` becomes ``flip_permutation[i]``."""
        out = dict(target, boxes=hflip_boxes(target[schema.BOXES], width))
        if schema.MASKS in target:
            out[schema.MASKS] = target[schema.MASKS].flip(-1)
        if schema.KEYPOINTS in target:
            points = target[schema.KEYPOINTS].clone()
            points[..., 0] = width - points[..., 0]
            points = points[:, list(self.flip_permutation)]
            points[points[..., 2] == 0] = 0  # unlabeled stays (0, 0, 0)
            out[schema.KEYPOINTS] = points
        return out


def _resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if pixels.shape[:2] == size:
        return pixels
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    out = F.interpolate(chw.float(), size=size, mode="bilinear", antialias=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _masks(
    rles: Sequence[str], height: int, width: int, size: tuple[int, int]
) -> torch.Tensor:
    if len(rles) == 0:
        return torch.zeros((0, *size), dtype=torch.uint8)
    full = np.stack([decode_rle(str(c), height, width) for c in rles])
    return F.interpolate(torch.from_numpy(full)[None], size=size, mode="nearest")[0]


def prepare(records: Sequence[Record], augment: Augment) -> ray.data.Dataset:
    """``records`` as training rows, decoded and augmented by Ray Data."""
    dataset = records_dataset(records).map_batches(augment, batch_size=AUGMENT_BATCH)
    # training logs its progress every log_every steps; a bar per pass is noise
    dataset.context.enable_progress_bars = False
    return dataset


class RowStream:
    """Endless rows of one Ray Train dataset shard, one epoch after another.

    ``epoch`` counts finished passes and ``offset`` the rows taken in the current one;
    a stream built with a saved ``(epoch, offset)`` skips that many rows of its first
    pass, so a resumed run continues at the same data position (which rows remain
    depends on Ray Data's order, which is shuffled per pass, not replayed).
    """

    def __init__(
        self,
        shard: Any,
        batch_size: int,
        prefetch_batches: int = 2,
        epoch: int = 0,
        offset: int = 0,
    ) -> None:
        self.shard, self.batch_size = shard, batch_size
        self.prefetch_batches = prefetch_batches
        self.epoch, self.offset = epoch, offset
        self._rows = self._iterate(skip=offset)

    def _iterate(self, skip: int) -> Iterator[dict[str, Any]]:
        while True:
            seen = 0
            for batch in self.shard.iter_batches(
                batch_size=self.batch_size,
                batch_format="numpy",
                prefetch_batches=self.prefetch_batches,
            ):
                for i in range(len(batch[schema.PATH])):
                    seen += 1
                    if seen > skip:
                        self.offset = seen
                        yield {k: v[i] for k, v in batch.items()}
            if seen == 0:
                raise ValueError(
                    "a dataset shard has no rows: fewer images than workers"
                )
            self.epoch, self.offset, skip = self.epoch + 1, 0, 0

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` rows (crossing into the next epoch when needed)."""
        return [next(self._rows) for _ in range(n)]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def close(self) -> None:
        """Stops reading (ends Ray Data's iteration while Ray is still up)."""
        self._rows.close()


def next_batch(
    streams: dict[str, RowStream], sizes: dict[str, int]
) -> list[dict[str, Any]]:
    """``sizes[name]`` rows from each stream, labeled first, each tagged ``source``."""
    rows = []
    for name, stream in streams.items():
        rows += [dict(r, source=name) for r in stream.take(sizes[name])]
    return rows


def to_device(
    rows: Sequence[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Training rows -> torchvision's ``(images, targets)`` on ``device``.

    Images become float32 ``[3, H, W]`` in 0..1 there (uint8 travels, 4x smaller).
    """
    images, targets = [], []
    for row in rows:
        image = torch.tensor(row[schema.IMAGE], device=device)
        images.append(image.permute(2, 0, 1).float().div_(255))
        target = {
            "boxes": torch.tensor(row[schema.BOXES], dtype=torch.float32),
            "labels": torch.tensor(row[schema.LABELS], dtype=torch.int64),
        }
        if schema.MASKS in row:
            target["masks"] = torch.tensor(row[schema.MASKS], dtype=torch.uint8)
        if schema.KEYPOINTS in row:
            target["keypoints"] = torch.tensor(
                row[schema.KEYPOINTS], dtype=torch.float32
            )
        targets.append({k: v.to(device) for k, v in target.items()})
    return images, targets
