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

import pandas as pd
import ray

from raydd import schema, storage
from raydd.checkpoint import MODEL_FILE
from raydd.config import (
    Config,
    ConfigError,
    to_dict,
)
from raydd.data.coco import (
    image_paths,
    keypoint_flip_permutation,
    keypoint_names,
    load_coco,
)
from raydd.inference import max_image_size, predict_dataset
from raydd.layout import CANDIDATES_DIR, ERRORS_FILE, VALIDATION_CANDIDATES_DIR, Run
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
    plan_source,
    source_parts,
    sources,
)

logger = logging.getLogger(__name__)


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
BATCHES_PER_BLOCK = 4  # inference batches per block (one Predictor task)
SOURCES_PER_TASK = 32  # sources whose parts one task lists (list_parts)


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
    empty = pd.DataFrame({PART: [], SOURCE: [], "images": [], "done": []})
    if not sources:
        return empty
    # a task per SOURCES_PER_TASK sources: a few HEAD requests each; one task
    # per source spent 20.7 s on 1,000 tars on 2 CPUs (Ray's per-task overhead)
    found = _sources_dataset(sources, SOURCES_PER_TASK).map_batches(
        source_parts, fn_kwargs=plan, batch_size=SOURCES_PER_TASK
    )
    frame = found.to_pandas()
    return frame if len(frame) else empty  # e.g. every part another job's


def _sources_dataset(
    sources: Sequence[dict[str, Any]], per_block: int = 1
) -> ray.data.Dataset:
    blocks = min(-(-len(sources) // per_block), 4096)
    return ray.data.from_items(list(sources), override_num_blocks=blocks)


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
    # blocks of a few inference batches: a source's rows stream on as they are
    # read (not as one block at the end of a manifest or a tar), so parts finish
    # early, and each actor task is long enough that Ray's per-task latency
    # (~0.1 s) does not set the pace (benchmarks/scale.py, 10^5 manifest rows
    # on 2 CPUs: 407 images/s per core at 1 batch a block, 924 at 4)
    images = (
        _sources_dataset(sources)
        .map_batches(plan_source, fn_kwargs=plan, batch_size=1, num_cpus=0.5)
        .repartition(
            target_num_rows_per_block=BATCHES_PER_BLOCK * config.inference.batch_size
        )
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
