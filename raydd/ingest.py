"""Training data for Ray Train, prepared by Ray Data, shuffled and mixed exactly.

[1] :func:`records_dataset` turns :class:`~raydd.data.coco.Record` s (labeled COCO or
    thresholded pseudo-labels) into a Ray Dataset of undecoded *training rows*, each
    with its ``index`` in the set; :func:`prepare` attaches the set's
    :class:`Augment` to it, and the driver hands it to Ray Train.
[2] Inside each Ray Train worker, a :class:`RowStream` reads its set epoch after
    epoch. Every epoch it takes a new permutation of the whole set, drawn from
    ``(seed, set name, epoch)`` and the same on every worker, of which each worker
    takes its own slice (:class:`Shuffle`). The rows of that order go through a Ray
    Data pipeline the stream starts: :class:`Augment` decodes each image, resizes it
    to one of the training scales (multi-scale training) and mirrors it (keypoints
    swap left/right), drawing the scale and the flip from ``(seed, set name, epoch,
    index)``: a row looks the same in the same epoch whichever worker or task
    decodes it, so a seed repeats a run's batches and a resumed stream its epoch.
[3] :func:`next_batch` takes exactly ``n_labeled`` rows from the labeled stream and
    ``n_pseudo`` from the pseudo-labeled one, so *every* minibatch holds the
    configured labeled share (the paper's fixed 6:4 mixture, not one "in
    expectation"). The smaller (labeled) set simply starts more epochs.

Training rows after :class:`Augment` (per row; ``N`` may be 0):

============= ====================== ============================================
column        dtype / shape           meaning
============= ====================== ============================================
``path``      str                     the image
``index``     int64                   its position in its set (the row's identity)
``image``     uint8 ``[H, W, 3]``     RGB at the training scale, maybe mirrored
``boxes``     float32 ``[N, 4]``      xyxy pixels of ``image``
``labels``    int64 ``[N]``           contiguous labels ``1..K``, or :data:`IGNORE`
``masks``     uint8 ``[N, H, W]``     (Mask R-CNN) binary instance masks
``keypoints`` float32 ``[N, K, 3]``   (Keypoint R-CNN) ``x, y, v`` in pixels
============= ====================== ============================================
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future
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
INDEX = "index"  # a training row's position in its set
DRAWS = "draws"  # int64 [5]: the seed of a row's augmentation draws (Shuffle.draws)
# The label of a pseudo-box in the student's ignore band (``student.ignore_band``):
# torchvision's R-CNN samplers already leave label -1 out of the box head's loss,
# and raydd's RPN leaves the anchors it matches out of its own
# (:class:`raydd.models.IgnoreAwareRPN`).
IGNORE = -1
AUGMENT_KEY = "raydd.augment"  # where prepare() keeps the Augment: DataContext config
ROWS_PER_BLOCK = 64  # undecoded rows per Ray Data block
AUGMENT_BATCH = 16  # images per Augment call (and per output block)
PASS_ROWS = 64  # rows per decoding pipeline: several epochs of a small set at once
# (1,024 measured 3.4x slower steps on 2 CPUs -- 3.1 vs 10.7 images/s,
# benchmarks/train_throughput.py -- cause not found)
START_AHEAD_STEPS = 4  # the next pipeline starts while this many steps' rows remain:
# its start-up was 4% of the step time waited for data on 2 CPUs, then 0.5%
_ORDER, _DRAW = 0, 1  # first word of the seeds: orders and draws never share one
_END = object()  # a pipeline with no rows


def split_batch(batch_size: int, labeled_share: float, pseudo: bool) -> tuple[int, int]:
    """``(n_labeled, n_pseudo)`` images per step: the share rounded, at least one
    labeled image; all labeled when there is no pseudo-labeled set."""
    if not pseudo:
        return batch_size, 0
    n_labeled = min(batch_size, max(1, round(batch_size * labeled_share)))
    return n_labeled, batch_size - n_labeled


def record_row(record: Record) -> dict[str, Any]:
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
    """The records as a Ray Dataset of undecoded training rows (``path``,
    ``index``: the record's position, ``boxes``, ``labels``, ``height``, ``width``
    and, when the records have them, ``masks`` as RLE strings and ``keypoints``
    ``[N, 3K]``)."""
    if not records:
        raise ValueError("no training images")
    return _dataset([record_row(r) | {INDEX: i} for i, r in enumerate(records)])


def _dataset(rows: list[dict[str, Any]]) -> ray.data.Dataset:
    # blocks of ROWS_PER_BLOCK rows: Ray Data's default (at least 200 blocks) makes
    # one-row blocks of a small set, and scheduling those costs more than decoding
    blocks = -(-len(rows) // ROWS_PER_BLOCK)
    return ray.data.from_items(rows, override_num_blocks=blocks)


def to_batch(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows (one key set) as a Ray Data numpy batch: an object column per key, so
    ragged arrays stay whole; ``path`` as strings."""
    out = {}
    for name in rows[0]:
        out[name] = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            out[name][i] = row[name]
    out[schema.PATH] = out[schema.PATH].astype(str)
    return out


@dataclass(frozen=True)
class Augment:
    """Ray Data stage: training rows -> decoded, resized, maybe mirrored rows.

    Every row draws its scale and flip from ``np.random.default_rng(row["draws"])``
    (the stream's :meth:`Shuffle.draws`), so a row's augmentation depends on its
    seed only, not on the task or batch that runs it.

    Attributes:
        min_sizes: training scales (shorter side); one is drawn per image.
        max_size: cap on the longer side.
        hflip_prob: chance of mirroring.
        flip_permutation: where each keypoint goes under a flip
            (:func:`raydd.data.coco.keypoint_flip_permutation`); one entry per
            keypoint, so it also gives ``K``.
        masks: decode ``masks`` (RLE) into uint8 ``[N, H, W]``.
        keypoints: emit ``keypoints`` as ``[N, K, 3]``.
        color_jitter: brightness and contrast factors drawn from ``[1 - j, 1 + j]``
            (``0``: none, and no draw: the other draws stay as they were).
    """

    min_sizes: tuple[int, ...]
    max_size: int
    hflip_prob: float = 0.0
    flip_permutation: tuple[int, ...] = ()
    masks: bool = False
    keypoints: bool = False
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.keypoints and not self.flip_permutation:
            raise ValueError(
                "keypoint training needs the keypoint names (COCO categories' "
                "'keypoints') for the flip permutation"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(batch[schema.PATH]):
            return batch
        rows = []
        for i in range(len(batch[schema.PATH])):
            row = {k: v[i] for k, v in batch.items()}
            rows.append(self.row(row, np.random.default_rng(row[DRAWS].tolist())))
        return to_batch(rows)

    def row(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One row: decode, resize to a drawn scale, mirror with ``hflip_prob``,
        jitter the colours with ``color_jitter``."""
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
        if self.color_jitter:
            pixels = jitter(pixels, *rng.uniform(-1, 1, 2) * self.color_jitter + 1)
        return {
            schema.PATH: str(row[schema.PATH]),
            **({INDEX: int(row[INDEX])} if INDEX in row else {}),
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


def jitter(pixels: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """uint8 ``[H, W, 3]`` with its contrast scaled around the image's mean grey
    by ``contrast``, then everything by ``brightness`` (clipped to 0..255)."""
    x = pixels.astype(np.float32)
    mean = x.mean()
    x = ((x - mean) * contrast + mean) * brightness
    return np.clip(x.round(), 0, 255).astype(np.uint8)


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


def prepare(
    records: Sequence[Record] | ray.data.Dataset, augment: Augment
) -> ray.data.Dataset:
    """A training set for Ray Train: the undecoded rows of ``records`` (
    :func:`records_dataset`; or a Dataset of such rows, e.g. the student's
    pseudo-labeled set streamed from the candidate parts), with ``augment`` kept
    in the dataset's context (``DataContext.set_config``), where each worker's
    :class:`RowStream` finds it.

    The rows stay undecoded until a stream has ordered them: an epoch's order and a
    row's draws come from the epoch, which only the stream knows (a Ray Data stage
    cannot tell one epoch from the next, and a resumed run starts afresh).
    """
    dataset = (
        records if isinstance(records, ray.data.Dataset) else records_dataset(records)
    )
    dataset.context.set_config(AUGMENT_KEY, augment)
    # a stream reads the set once, and training logs its own progress: no bar
    dataset.context.enable_progress_bars = False
    return dataset


@dataclass(frozen=True)
class Shuffle:
    """The order in which one worker takes a set's rows, and the seeds of their
    augmentation draws.

    Each epoch is a permutation of the whole set drawn from ``(seed, name, epoch)``,
    the same on every worker, wrapped around to a multiple of ``world`` rows (as
    torch's ``DistributedSampler`` does) so that every worker's epoch has the same
    length; worker ``rank`` takes every ``world``-th row from position ``rank``.

    Attributes:
        seed: the run's seed (``TrainConfig.seed``).
        name: the set (``labeled``, ``pseudo``): two sets of one size still differ.
        rank: this worker.
        world: the number of workers.
    """

    seed: int = 0
    name: str = ""
    rank: int = 0
    world: int = 1

    def _words(self, epoch: int) -> list[int]:
        return [self.seed % 2**63, zlib.crc32(self.name.encode()), epoch]

    def order(self, size: int, epoch: int) -> np.ndarray:
        """Positions (``index`` values) of the rows this worker takes in ``epoch``."""
        rng = np.random.default_rng([_ORDER, *self._words(epoch)])
        padded = np.resize(rng.permutation(size), -(-size // self.world) * self.world)
        return padded[self.rank :: self.world]

    def draws(self, epoch: int, index: int) -> np.ndarray:
        """The seed (int64 ``[5]``) of row ``index``'s augmentation in ``epoch``."""
        return np.array([_DRAW, *self._words(epoch), index], np.int64)


class RowStream:
    """Endless training rows of one set for one worker, epoch after epoch.

    The stream reads the set's undecoded rows once, then sends the rows of the next
    epochs, in :class:`Shuffle` order, through the set's :class:`Augment` (from
    :func:`prepare`) on Ray Data, which decodes them ahead of the training step
    (``prefetch_batches``); one pipeline covers at least ``PASS_ROWS`` rows, so a
    small set does not start one per epoch, and the next one starts
    ``START_AHEAD_STEPS`` steps before it is needed, so its start-up is not waited
    for. A set without an Augment yields its rows as they are.

    ``epoch`` counts finished epochs and ``offset`` the rows taken in the current
    one. A stream built with a saved ``(epoch, offset)`` starts that epoch's order
    after ``offset`` rows (skipped undecoded): a resumed run takes the rows, and the
    augmentation, the interrupted one would have taken (with as many workers).

    Trade-off: every worker holds the whole set's undecoded rows (paths, boxes, RLE
    strings: bytes per image, never pixels) to draw exact permutations of it; sets
    far larger than memory would want a permutation of ``index`` alone, joined back
    to the rows block by block.
    """

    def __init__(
        self,
        shard: Any,
        batch_size: int,
        prefetch_batches: int = 2,
        epoch: int = 0,
        offset: int = 0,
        shuffle: Shuffle = Shuffle(),
    ) -> None:
        self.shard, self.batch_size = shard, batch_size
        self.prefetch_batches, self.shuffle = prefetch_batches, shuffle
        self.epoch, self.offset = epoch, offset
        self.augment: Augment | None = shard.get_context().get_config(AUGMENT_KEY)
        self._rows = self._iterate(epoch, offset)

    def _read(self) -> list[dict[str, Any]]:
        """The set's undecoded rows, ordered by ``index`` (a position, or a key
        such as the path: rows read in parallel arrive in any order) and numbered
        ``0..n-1`` in that order (by arrival when they have no ``index``)."""
        rows = list(self.shard.iter_rows())
        if not rows:
            raise ValueError("a training set has no rows")
        if INDEX in rows[0]:
            rows.sort(key=lambda row: row[INDEX])
        return [{**row, INDEX: i} for i, row in enumerate(rows)]

    def _plan(
        self, rows: list[dict[str, Any]], epoch: int, skip: int
    ) -> tuple[list[tuple[int, int, dict[str, Any]]], int]:
        """(epoch, offset, row) of one pipeline, from ``epoch``'s order after
        ``skip`` rows on; and the epoch the next pipeline starts with."""
        planned = []
        while len(planned) < PASS_ROWS:
            order = self.shuffle.order(len(rows), epoch)[skip:]
            planned += [
                (epoch, offset, rows[j])
                for offset, j in enumerate(order, start=skip + 1)
            ]
            epoch, skip = epoch + 1, 0
        return planned, epoch

    def _iterate(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        rows = self._read()
        planned, epoch = self._plan(rows, epoch, skip)
        decoded, upcoming = _Started(self._decode(planned)), None
        ahead = START_AHEAD_STEPS * self.batch_size
        try:
            while True:
                following, epoch = self._plan(rows, epoch, 0)
                start_next = max(len(planned) - ahead, 0)
                for i, ((at, offset, _), row) in enumerate(
                    zip(planned, decoded, strict=True)
                ):
                    if i == start_next:  # its start-up overlaps this one's last steps
                        upcoming = _Started(self._decode(following))
                    self.epoch, self.offset = at, offset
                    yield row
                decoded.close()
                planned, decoded, upcoming = following, upcoming, None
        finally:
            decoded.close()
            if upcoming is not None:
                upcoming.close()

    def _decode(
        self, planned: list[tuple[int, int, dict[str, Any]]]
    ) -> Generator[dict[str, Any], None, None]:
        """The planned rows, decoded and augmented by Ray Data, in their order."""
        if self.augment is None:
            yield from (row for *_, row in planned)
            return
        rows = [
            {**row, DRAWS: self.shuffle.draws(epoch, int(row[INDEX]))}
            for epoch, _, row in planned
        ]
        dataset = _dataset(rows).map_batches(self.augment, batch_size=AUGMENT_BATCH)
        dataset.context.execution_options.preserve_order = True  # the epochs' order
        dataset.context.enable_progress_bars = False  # a bar per pipeline is noise
        for batch in dataset.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            prefetch_batches=self.prefetch_batches,
        ):
            for i in range(len(batch[schema.PATH])):
                yield {k: v[i] for k, v in batch.items()}

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` rows (crossing into the next epoch when needed)."""
        return [next(self._rows) for _ in range(n)]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def close(self) -> None:
        """Stops reading (ends Ray Data's iteration while Ray is still up)."""
        self._rows.close()


class _Started:
    """An iterator whose first item is being fetched in a thread from the start:
    a Ray Data pipeline that starts its execution while the rows before it train."""

    def __init__(self, items: Generator[Any, None, None]) -> None:
        self._items = items
        self._first: Future | None = Future()  # the first item, or the error
        threading.Thread(target=self._fetch, args=(self._first,), daemon=True).start()

    def _fetch(self, first: Future) -> None:
        try:
            first.set_result(next(self._items, _END))
        except BaseException as e:  # raised where the item is asked for
            first.set_exception(e)

    def __iter__(self) -> _Started:
        return self

    def __next__(self) -> Any:
        if self._first is None:
            return next(self._items)
        first, self._first = self._first.result(), None
        if first is _END:
            raise StopIteration
        return first

    def close(self) -> None:
        if self._first is not None:  # a generator closes only once it is not running
            self._first.exception()  # waits for the fetch, raises nothing
            self._first = None
        self._items.close()


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
