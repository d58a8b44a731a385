"""Step 2: multi-view inference and fusion of unlabeled images as a Ray Data pipeline.

::

    plan (path, shard, index) ──► load_batch (CPU: fetch, decode, downscale)
        ──► Predictor (actor pool, GPU if any): every view of a batch, detections
            mapped back and fused; masks / keypoints of the fused boxes averaged
            over the views
        ──► ShardWriter (driver): part-00000.parquet, ... one per input shard

Inference, inverse transforms and fusion of an image happen in one actor call: no
shuffle or group-by crosses the cluster. Output shards are deterministic and written
atomically, so a killed run re-started with the same config resumes
(:mod:`raydd.shards`). Unreadable inputs keep their row, with the reason in
``error``, and are listed in ``errors.csv``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch
from torch import nn
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

from raydd import schema, storage
from raydd.checkpoint import MODEL_FILE, load_detector
from raydd.config import (
    Config,
    ConfigError,
    EnsembleConfig,
    InferenceConfig,
    ViewConfig,
    to_dict,
    unlabeled_files,
)
from raydd.data.coco import (
    image_paths,
    keypoint_flip_permutation,
    keypoint_names,
    load_coco,
)
from raydd.data.images import to_tensor
from raydd.ensemble import fuse
from raydd.layout import CANDIDATES_DIR, ERRORS_FILE, VALIDATION_CANDIDATES_DIR, Run
from raydd.masks import mask_rles
from raydd.models import permissive_inference
from raydd.shards import (
    ShardWriter,
    fingerprint,
    finished_shards,
    make_plan,
    publish_run,
)
from raydd.sources import load_batch
from raydd.views import View

logger = logging.getLogger(__name__)

_NOT_WRITTEN = (schema.IMAGE, "bytes")


def _detach_branch(model: nn.Module, kind: str) -> tuple[nn.Module, ...] | None:
    """Takes the ``mask`` or ``keypoint`` branch off a torchvision R-CNN.

    The detection pass then predicts boxes only (torchvision's ``RoIHeads`` skips a
    branch whose RoI pool is ``None``); the branch runs later on the *fused* boxes.
    """
    heads = getattr(model, "roi_heads", None)
    parts = tuple(
        getattr(heads, f"{kind}_{p}", None) for p in ("roi_pool", "head", "predictor")
    )
    if heads is None or any(p is None for p in parts):
        return None
    setattr(heads, f"{kind}_roi_pool", None)
    return parts


class Predictor:
    """Model-holding Ray Data stage: all views of a batch, mapped back and fused.

    Reads the batch of :func:`raydd.sources.load_batch` (``path``, ``image``,
    ``height``, ``width``, ``error`` + pass-through columns) and returns a candidates
    table (:func:`raydd.schema.candidates_schema`) plus the pass-through columns. Rows
    whose ``error`` is set get zero detections. Boxes come out in the pixels of the
    *original* image even when ``image`` was downscaled on load.

    Masks and keypoints follow Detectron's test-time augmentation: the boxes are fused
    first, then every view predicts the soft mask (heatmaps) of each *fused* box,
    mirrored back under a flip and averaged (``SOFT_AVG`` / ``HM_AVG``).

    Args:
        checkpoint: directory written by :func:`raydd.checkpoint.save_detector`, a
            local folder or a URI every node reaches (storage, on a cluster).
        views: the test-time views; one view means no fusion.
        ensemble: fusion settings (also caps detections per image).
        score_floor: detections below this score are not kept at all.
        num_threads: torch threads when running on the CPU.
        keypoint_flip: for each keypoint, the index of its mirror image (left eye ->
            right eye); default: no swap.
    """

    def __init__(
        self,
        checkpoint: str,
        views: Sequence[ViewConfig],
        ensemble: EnsembleConfig,
        score_floor: float = 0.0,
        num_threads: int = 1,
        keypoint_flip: Sequence[int] | None = None,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        model, _ = load_detector(checkpoint, self.device)
        self.model = permissive_inference(model, ensemble.max_detections)
        self.mask_branch = _detach_branch(self.model, "mask")
        self.keypoint_branch = _detach_branch(self.model, "keypoint")
        self.num_keypoints = (
            self.keypoint_branch[2].out_channels if self.keypoint_branch else 0
        )
        self.keypoint_flip = list(keypoint_flip or range(self.num_keypoints))
        self.views = [View.from_config(v) for v in views]
        self.ensemble = ensemble
        self.score_floor = score_floor
        self.schema = schema.candidates_schema(
            masks=self.mask_branch is not None, keypoints=self.num_keypoints > 0
        )

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Detections of each ``uint8 [h, w, 3]`` image, in pixels of an original
        image of ``sizes[i] = (height, width)`` (default: the image's own size)."""
        if not images:  # e.g. a batch of unreadable files only
            return []
        tensors = [to_tensor(i).to(self.device) for i in images]
        shapes = [tuple(t.shape[-2:]) for t in tensors]
        boxes, scores, labels, owners = self._detect(tensors, shapes)
        keep = scores >= self.score_floor
        boxes, scores, labels, owners = (
            x[keep] for x in (boxes, scores, labels, owners)
        )
        counts = torch.bincount(owners, minlength=len(tensors)).tolist()
        per_image = list(
            zip(*(x.split(counts) for x in (boxes, scores, labels)), strict=True)
        )
        maps = self._instance_maps(
            tensors,
            shapes,
            [b for b, _, _ in per_image],
            [lab for *_, lab in per_image],
        )
        results = []
        for i, (b, s, lab) in enumerate(per_image):
            h, w = shapes[i]
            height, width = sizes[i] if sizes is not None else (h, w)
            factor = torch.tensor([width / w, height / h] * 2, device=b.device)
            dets = {
                schema.BOXES: (b * factor).cpu().numpy(),
                schema.SCORES: s.cpu().numpy(),
                schema.LABELS: lab.cpu().numpy(),
            }
            if "masks" in maps:
                dets[schema.MASKS] = mask_rles(
                    maps["masks"][i], b * factor, height, width
                )
            if "keypoints" in maps:
                dets.update(self._keypoints(maps["keypoints"][i], b, factor))
            results.append(dets)
        return results

    def _detect(
        self, tensors: list[torch.Tensor], shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, ...]:
        """Every view's detections mapped back to the (loaded) images, fused."""
        boxes, scores, labels, owners = [], [], [], []
        for view in self.views:
            outputs = self.model([view.apply(t) for t in tensors])
            for i, (out, (h, w)) in enumerate(zip(outputs, shapes, strict=True)):
                boxes.append(view.invert_boxes(out["boxes"], h, w))
                scores.append(out["scores"])
                labels.append(out["labels"])
                owners.append(torch.full_like(out["labels"], i))
        merged = [torch.cat(x) for x in (boxes, scores, labels, owners)]
        if len(self.views) == 1:
            return tuple(merged)  # the model's own output: sorted, capped
        return fuse(*merged, self.ensemble, num_views=len(self.views))

    def _instance_maps(
        self,
        tensors: list[torch.Tensor],
        shapes: list[tuple[int, int]],
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
    ) -> dict[str, list[torch.Tensor]]:
        """Soft masks ``[N, M, M]`` / keypoint heatmaps ``[N, K, S, S]`` of the fused
        boxes of each image, averaged over the views (box-relative grids)."""
        branches = {
            name: branch
            for name, branch in (
                ("masks", self.mask_branch),
                ("keypoints", self.keypoint_branch),
            )
            if branch is not None
        }
        if not branches or sum(len(b) for b in boxes) == 0:
            return {}
        totals: dict[str, torch.Tensor] = {}
        label = torch.cat(labels)
        for view in self.views:
            batch, _ = self.model.transform([view.apply(t) for t in tensors])
            features = self.model.backbone(batch.tensors)
            rois = [
                view.apply_boxes(b, h, w)
                for b, (h, w) in zip(boxes, shapes, strict=True)
            ]
            for name, (pool, head, predictor) in branches.items():
                out = predictor(head(pool(features, rois, batch.image_sizes)))
                if name == "masks":  # the soft mask of each box's own class
                    out = out[torch.arange(len(out)), label].sigmoid()
                    out = view.invert_masks(out)
                else:
                    out = view.invert_heatmaps(out, self.keypoint_flip)
                totals[name] = out if name not in totals else totals[name] + out
        counts = [len(b) for b in boxes]
        return {k: (v / len(self.views)).split(counts) for k, v in totals.items()}

    def _keypoints(
        self, heatmaps: torch.Tensor, boxes: torch.Tensor, factor: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """COCO keypoint triplets (original pixels, ``v = 2``) and their scores."""
        n = len(boxes)
        if n == 0:
            empty = schema.empty_detections(self.num_keypoints)
            return {k: empty[k] for k in (schema.KEYPOINTS, schema.KEYPOINT_SCORES)}
        points, point_scores = heatmaps_to_keypoints(heatmaps, boxes)
        points[..., :2] *= factor[:2]
        points[..., 2] = 2.0  # COCO: labeled and visible
        return {
            schema.KEYPOINTS: points.reshape(n, -1).cpu().numpy(),
            schema.KEYPOINT_SCORES: point_scores.cpu().numpy(),
        }

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        errors = batch[schema.ERROR]
        ok = [i for i, e in enumerate(errors) if not e]
        found = self.predict(
            [batch[schema.IMAGE][i] for i in ok],
            [(int(batch[schema.HEIGHT][i]), int(batch[schema.WIDTH][i])) for i in ok],
        )
        detections = dict(zip(ok, found, strict=True))
        empty = schema.empty_detections(self.num_keypoints)
        rows = [
            {
                **{k: batch[k][i] for k in (schema.PATH, schema.HEIGHT, schema.WIDTH)},
                schema.ERROR: errors[i],
                **empty,  # masks/keypoints too when a batch has no detection at all
                **detections.get(i, {}),
            }
            for i in range(len(errors))
        ]
        table = schema.candidates_table(rows, self.schema)
        for name, column in batch.items():  # e.g. shard and index of the plan
            if name not in table.column_names and name not in _NOT_WRITTEN:
                table = table.append_column(name, pa.array(column))
        return table


@dataclass(frozen=True)
class Pool:
    """How the Predictor stage runs: actor count, resources and torch threads."""

    actors: int
    num_gpus: float
    num_threads: int


def plan_pool(inference: InferenceConfig) -> Pool:
    """Sizes the Predictor actor pool from the cluster (unless the config says).

    With GPUs: one actor per GPU. CPU-only: one actor per node, reserving one CPU
    (so the read/decode tasks always get cores; a pool that reserves every CPU starves
    the reader and hangs: measured on 2 CPUs, Ray 2.60, a reader that needs CPU tasks
    plus a fixed pool of two 1-CPU actors waits forever) but running torch on all of
    the node's cores:
    one multi-threaded forward pass is as fast as several single-threaded ones and
    holds one model copy.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    num_gpus = inference.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_gpus:
        actors, threads = int(gpus / num_gpus), 1
    else:
        cpu_nodes = [n["CPU"] for n in nodes if n.get("CPU", 0) >= 1]
        actors, threads = len(cpu_nodes), int(min(cpu_nodes, default=1))
    return Pool(max(1, inference.num_actors or actors), num_gpus, threads)


def max_image_size(config: Config) -> int:
    """Longer side images are downscaled to right after decoding."""
    if config.inference.max_image_size is not None:
        return config.inference.max_image_size
    scales = [v.scale for v in config.views if v.scale is not None]
    return max([config.model.max_size, *scales])


def predict_dataset(
    images: Sequence[str] | ray.data.Dataset,
    checkpoint: str,
    views: Sequence[ViewConfig],
    ensemble: EnsembleConfig,
    inference: InferenceConfig,
    max_size: int | None = None,
    keypoint_flip: Sequence[int] | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of candidates of ``images``: URIs, or a dataset with a
    ``path`` column (other columns pass through). One row per input row."""
    pool = plan_pool(inference)
    if not isinstance(images, ray.data.Dataset):
        images = ray.data.from_items([{schema.PATH: p} for p in images])
    ds = images.map_batches(
        load_batch, fn_kwargs={"max_size": max_size}, batch_size=inference.batch_size
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            checkpoint=checkpoint,
            views=list(views),
            ensemble=ensemble,
            score_floor=inference.score_floor,
            num_threads=pool.num_threads,
            keypoint_flip=keypoint_flip,
        ),
        batch_size=inference.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.actors),
        num_gpus=pool.num_gpus,
        num_cpus=1,
    )


@dataclass(frozen=True)
class LabelingResult:
    candidates: str
    images: int
    errors: pd.DataFrame  # ``uri``, ``reason`` of the inputs that could not be read
    skipped_shards: int
    seconds: float


def label_images(
    uris: Sequence[str],
    checkpoint: str,
    config: Config,
    directory: str | Path,
    num_shards: int = 1,
    shard_index: int = 0,
    copy_to: str | None = None,
) -> LabelingResult:
    """Labels ``uris`` into ``directory/part-*.parquet``, resuming a killed run.

    Shards finished by an earlier run with the same inputs, teacher and settings are
    skipped; the rest stream through :func:`predict_dataset` and are written as they
    complete (and copied to ``copy_to``, the durable storage, one by one).
    """
    start = time.perf_counter()
    shard_size = config.data.unlabeled.shard_size
    settings = {
        "teacher": storage.digest(storage.join(checkpoint, MODEL_FILE)),
        "views": [to_dict(v) for v in config.views],
        "ensemble": to_dict(config.ensemble),
        "inference": {
            "score_floor": config.inference.score_floor,
            "max_image_size": max_image_size(config),
        },
        "shard_size": shard_size,
    }
    done = finished_shards(directory, fingerprint(uris, settings))
    if copy_to is not None:
        publish_run(directory, copy_to)
    plan = make_plan(uris, shard_size, num_shards, shard_index)
    shards = plan.column("shard").to_numpy()
    todo = sorted(set(np.unique(shards).tolist()) - done)
    logger.info(
        "pseudo-labeling %d images (%d shards to do, %d already done) with %d views",
        len(plan),
        len(todo),
        len(set(shards.tolist()) & done),
        len(config.views),
    )
    if todo:
        # the plan is sorted by shard: each shard is one contiguous slice
        starts = np.searchsorted(shards, todo, side="left")
        ends = np.searchsorted(shards, todo, side="right")
        blocks = [plan.slice(a, b - a) for a, b in zip(starts, ends, strict=True)]
        sizes = dict(zip(todo, ends - starts, strict=True))
        writer = ShardWriter(directory, sizes, copy_to)
        found = predict_dataset(
            ray.data.from_arrow(blocks),  # one block per shard: parallel reads
            checkpoint,
            config.views,
            config.ensemble,
            config.inference,
            max_size=max_image_size(config),
            keypoint_flip=_keypoint_flip(config),
        )
        for table in found.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(table)
        writer.close()
    table = read_candidates(directory, columns=[schema.PATH, schema.ERROR])
    errors = table[table[schema.ERROR] != ""].rename(
        columns={schema.PATH: "uri", schema.ERROR: "reason"}
    )
    return LabelingResult(
        str(directory),
        len(table),
        errors.reset_index(drop=True),
        len(set(shards.tolist()) & done),
        time.perf_counter() - start,
    )


def _keypoint_flip(config: Config) -> list[int] | None:
    names = keypoint_names(load_coco(config.data.labeled.annotations))
    return keypoint_flip_permutation(names) if names else None


@dataclass(frozen=True)
class PseudoLabelResult:
    candidates: str
    images: int
    errors: int
    seconds: float


def pseudo_label(config: Config, teacher_checkpoint: str) -> PseudoLabelResult:
    """Runs the teacher with every view on the unlabeled set; writes Parquet candidates.

    Writes ``OUTPUT_DIR/candidates/part-*.parquet`` (resuming an interrupted run with
    the same settings, from ``storage_uri`` too: each part is copied there as soon as
    it is written) and ``errors.csv`` (``uri``, ``reason``) of the inputs that
    could not be read or decoded. With a validation split, its images are labeled the
    same way into ``OUTPUT_DIR/validation_candidates`` (by shard 0's job only).
    """
    start = time.perf_counter()
    output, run = Path(config.output_dir), Run.of(config)
    split = config.data.unlabeled
    uris = unlabeled_files(split)
    if not uris:
        raise ConfigError(f"data.unlabeled.images matches no files: {split.images}")
    run.fetch(CANDIDATES_DIR)  # a new head node resumes from the stored shards
    result = label_images(
        uris,
        teacher_checkpoint,
        config,
        output / CANDIDATES_DIR,
        split.num_shards,
        split.shard_index,
        copy_to=run.stored(CANDIDATES_DIR),
    )
    result.errors.to_csv(output / ERRORS_FILE, index=False)
    if config.data.validation is not None and split.shard_index == 0:
        label_images(
            image_paths(config.data.validation),
            teacher_checkpoint,
            config,
            output / VALIDATION_CANDIDATES_DIR,
            copy_to=run.stored(VALIDATION_CANDIDATES_DIR),
        )
    return PseudoLabelResult(
        result.candidates,
        result.images,
        len(result.errors),
        time.perf_counter() - start,
    )


def read_candidates(
    directory: str | Path, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Reads the candidates Parquet written by :func:`pseudo_label`, sorted by path."""
    frame = pd.read_parquet(directory, columns=list(columns) if columns else None)
    return frame.sort_values(schema.PATH, ignore_index=True)
