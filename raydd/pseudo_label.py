"""Step 2: multi-view inference and fusion of unlabeled images as a Ray Data pipeline.

::

    sources (driver: one row per source file, never one per image)
        ──► plan_source (CPU tasks): read a manifest / list a folder / stream a tar,
            cut it into parts, skip the parts already written
        ──► load_batch (CPU: fetch, decode, downscale)
        ──► Predictor (actor pool, GPU if any): every view of a batch, detections
            mapped back and fused; masks / keypoints of the fused boxes averaged
            over the views
        ──► PartWriter (one actor): each part, once whole, straight to storage
    driver: a stats row per part written; at the end ``_index.parquet``

Inference, inverse transforms and fusion of an image happen in one actor call: no
shuffle or group-by crosses the cluster. Parts are named by their inputs and
settings and written atomically, so a killed run started again resumes, and a crawl
that grew keeps its finished parts (:mod:`raydd.shards`). Unreadable inputs keep
their row, with the reason in ``error``, and are listed in ``errors.csv``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
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
    PART,
    PartWriter,
    index_name,
    index_parts,
    read_parts,
    settings_digest,
    write_index,
)
from raydd.sources import (
    SOURCE,
    inline_source,
    load_batch,
    plan_source,
    source_parts,
    sources,
)
from raydd.views import View

logger = logging.getLogger(__name__)

_NOT_WRITTEN = (schema.IMAGE, "bytes", "data")


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
    model_stage: type | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of candidates of ``images``: URIs, or a dataset with a
    ``path`` column (other columns pass through). One row per input row.

    ``model_stage`` replaces :class:`Predictor` (same constructor arguments and
    batch contract): ``benchmarks/scale.py`` measures the data plane with a
    detector that returns fixed boxes."""
    pool = plan_pool(inference)
    if not isinstance(images, ray.data.Dataset):
        images = ray.data.from_items([{schema.PATH: p} for p in images])
    ds = images.map_batches(
        load_batch, fn_kwargs={"max_size": max_size}, batch_size=inference.batch_size
    )
    return ds.map_batches(
        model_stage or Predictor,
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
    candidates: str  # the candidates location (its index names the parts)
    images: int
    errors: pd.DataFrame  # ``uri``, ``reason`` of the inputs that could not be read
    skipped_parts: int  # parts finished by an earlier run
    written_parts: int
    seconds: float
    first_part_seconds: float | None  # from the start to the first part written


MAX_PASSES = 3  # a part whose rows were lost (a writer actor died) is redone


def labeling_settings(checkpoint: str, config: Config) -> str:
    """The digest of everything a candidate row depends on (names the parts)."""
    return settings_digest(
        {
            "teacher": storage.digest(storage.join(checkpoint, MODEL_FILE)),
            "views": [to_dict(v) for v in config.views],
            "ensemble": to_dict(config.ensemble),
            "inference": {
                "score_floor": config.inference.score_floor,
                "max_image_size": max_image_size(config),
            },
        }
    )


def label_sources(
    sources: Sequence[dict[str, Any]],
    checkpoint: str,
    config: Config,
    directory: str | Path,
    num_shards: int = 1,
    shard_index: int = 0,
    model_stage: type | None = None,
) -> LabelingResult:
    """Labels ``sources`` (rows of :func:`raydd.sources.sources`) into parts in
    ``directory`` (a folder or URI), resuming any earlier run.

    The driver holds one row per source and, at the end, one per part: the
    sources are read, planned into parts, labeled and written on the cluster
    (:func:`raydd.sources.plan_source` -> :func:`predict_dataset` ->
    :class:`raydd.shards.PartWriter`). A pass that leaves a part missing (its
    rows were lost with an actor) is followed by another, up to
    :data:`MAX_PASSES`; the run ends with ``_index.parquet`` naming its parts.
    """
    start = time.perf_counter()
    directory = storage.absolute(directory)
    split = config.data.unlabeled
    plan = dict(
        settings=labeling_settings(checkpoint, config),
        directory=directory,
        shard_size=split.shard_size,
        column=split.column,
        root=split.root,
        num_shards=num_shards,
        shard_index=shard_index,
    )
    parts = list_parts(sources, plan)
    logger.info(
        "pseudo-labeling %d sources with %d views (%d parts already done)",
        len(sources),
        len(config.views),
        int(parts["done"].sum()),
    )
    written, first = 0, None
    for _ in range(MAX_PASSES):
        if parts["done"].all():
            break
        for row in _label_pass(sources, plan, checkpoint, config, model_stage):
            written += 1
            first = first or time.perf_counter() - start
            logger.info(
                "wrote %s (%d images, %d unreadable, %.1f s); %d parts this run",
                row[PART],
                row["images"],
                row["errors"],
                row["seconds"],
                written,
            )
        parts = list_parts(sources, plan)
    if not parts["done"].all():
        missing = parts.loc[~parts["done"], SOURCE].unique().tolist()
        raise RuntimeError(
            f"parts of {len(missing)} sources still missing after "
            f"{MAX_PASSES} passes: {missing[:5]}"
        )
    index = parts.loc[parts[PART] != "", [PART, SOURCE, "images"]]
    write_index(directory, index, index_name(num_shards, shard_index))
    logger.info(
        "candidates: %d parts (%d written now, %d done before), %d images",
        len(index),
        written,
        len(index) - written,
        index["images"].sum(),
    )
    return LabelingResult(
        directory,
        int(index["images"].sum()),
        _errors(directory) if len(index) else _errors_frame(),
        len(index) - written,
        written,
        time.perf_counter() - start,
        first,
    )


def list_parts(sources: Sequence[dict[str, Any]], plan: dict[str, Any]) -> pd.DataFrame:
    """``part``, ``source``, ``images``, ``done`` of the sources' parts (one Ray
    Data pass: the records and HEAD requests are made on the cluster)."""
    if not sources:
        return pd.DataFrame({PART: [], SOURCE: [], "images": [], "done": []})
    found = _sources_dataset(sources).map_batches(
        source_parts, fn_kwargs=plan, batch_size=1
    )
    return found.to_pandas()


def _sources_dataset(sources: Sequence[dict[str, Any]]) -> ray.data.Dataset:
    return ray.data.from_items(
        list(sources), override_num_blocks=min(len(sources), 4096)
    )


def _label_pass(
    sources: Sequence[dict[str, Any]],
    plan: dict[str, Any],
    checkpoint: str,
    config: Config,
    model_stage: type | None = None,
) -> Iterator[dict[str, Any]]:
    """One streaming pass: the stats row of each part written, as it is."""
    # half a CPU: reading a source is I/O, and other resources than the next
    # stages' keep Ray Data from fusing it into the Predictor actors
    # blocks of one inference batch: a source's rows stream on as they are read
    # (not as one block at the end of a manifest or a tar), so parts finish early
    images = (
        _sources_dataset(sources)
        .map_batches(plan_source, fn_kwargs=plan, batch_size=1, num_cpus=0.5)
        .repartition(target_num_rows_per_block=config.inference.batch_size)
    )
    found = predict_dataset(
        images,
        checkpoint,
        config.views,
        config.ensemble,
        config.inference,
        max_size=max_image_size(config),
        keypoint_flip=_keypoint_flip(config),
        model_stage=model_stage,
    )
    written = found.map_batches(
        PartWriter,
        fn_constructor_kwargs={"directory": plan["directory"]},
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
    )
    yield from written.iter_rows()


def candidates_dataset(
    directory: str | Path, columns: Sequence[str] | None = None
) -> ray.data.Dataset:
    """The candidate parts named by ``directory``'s index, as a lazy Ray Dataset
    (read on the cluster; nothing is collected on the driver)."""
    uris = index_parts(storage.absolute(directory))
    if not uris:
        raise FileNotFoundError(f"no candidate parts in {directory}")
    fs, _ = storage.filesystem(uris[0])
    return ray.data.read_parquet(
        [storage.filesystem(u)[1] for u in uris],
        filesystem=fs,
        columns=list(columns) if columns else None,
    )


def _errors_frame() -> pd.DataFrame:
    return pd.DataFrame({"uri": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})


def _errors(directory: str) -> pd.DataFrame:
    """``uri``, ``reason`` of the unreadable inputs (only those reach the driver)."""
    rows = candidates_dataset(directory, [schema.PATH, schema.ERROR]).filter(
        expr=f"{schema.ERROR} != ''"
    )
    frame = rows.to_pandas()
    if frame.empty:
        return _errors_frame()
    frame = frame.rename(columns={schema.PATH: "uri", schema.ERROR: "reason"})
    return frame.sort_values("uri", ignore_index=True)


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
    """Runs the teacher with every view on the unlabeled set; writes Parquet parts.

    Writes the parts to ``candidates/`` of the run's shared location (storage when
    set: a new head node resumes from there), with ``_index.parquet``, and
    ``OUTPUT_DIR/errors.csv`` (``uri``, ``reason``) of the inputs that could not be
    read or decoded. With a validation split, its images are labeled the same way
    into ``validation_candidates/`` (by shard 0's job only).
    """
    start = time.perf_counter()
    run = Run.of(config)
    split = config.data.unlabeled
    result = label_sources(
        sources(split),
        teacher_checkpoint,
        config,
        run.shared(CANDIDATES_DIR),
        split.num_shards,
        split.shard_index,
    )
    if result.images == 0:
        raise ConfigError(f"data.unlabeled.images matches no files: {split.images}")
    run.local(ERRORS_FILE).parent.mkdir(parents=True, exist_ok=True)
    result.errors.to_csv(run.local(ERRORS_FILE), index=False)
    if config.data.validation is not None and split.shard_index == 0:
        label_sources(
            [inline_source("validation", image_paths(config.data.validation))],
            teacher_checkpoint,
            config,
            run.shared(VALIDATION_CANDIDATES_DIR),
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
    """The candidates of a labeling run (the parts its index names) as one pandas
    frame, sorted by path: for runs that fit in memory (tests, reports, demos)."""
    table = read_parts(index_parts(storage.absolute(directory)), columns)
    return table.to_pandas().sort_values(schema.PATH, ignore_index=True)
