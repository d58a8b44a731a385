"""Step 4: the student, retrained on labeled ∪ pseudo-labeled images (Ray Train).

Every minibatch mixes a fixed share of labeled images (``student.labeled_share``, the
paper's 6:4 by default) with pseudo-labeled ones. The student starts from the initial
weights (pretrained backbone) by default -- retraining beat fine-tuning in the paper;
``student.init: teacher`` starts from the teacher instead. With ``student.control``
the step also trains the equal-compute control: labeled images only, same schedule
-- unless the teacher already is that model (:func:`teacher_is_control`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.data

from raydd import schema
from raydd.config import Config, StudentConfig, single_view, to_dict
from raydd.data.coco import Record
from raydd.ingest import (
    IGNORE,
    INDEX,
    LABELED,
    PSEUDO,
    Augment,
    prepare,
    record_row,
    split_batch,
    to_batch,
)
from raydd.layout import (
    CONTROL_DIR,
    STUDENT_DIR,
    TEACHER_DIR,
    TENSORBOARD_DIR,
    TRAIN_DIR,
    Run,
)
from raydd.pseudo_label import candidates_dataset
from raydd.teacher import augment_for, labeled_training_records, teacher_schedule
from raydd.threshold import above_thresholds, in_band
from raydd.train import TrainJob, fit, sized

logger = logging.getLogger(__name__)


def pseudo_records(
    candidates: pd.DataFrame, thresholds: dict[int, float], ignore_band: float = 0.0
) -> list[Record]:
    """Hard pseudo-labels: every readable image, with the candidates scoring at least
    their label's threshold (``thresholds``: label -> threshold; labels missing from
    it are dropped). Masks and keypoints come along when the candidates have them.
    With ``ignore_band``, the candidates up to that much below their threshold come
    too, labeled :data:`~raydd.ingest.IGNORE` (neither object nor background).

    Images left with no instance stay in (as background), as in the paper.
    """
    records = []
    for row in candidates[candidates[schema.ERROR] == ""].to_dict("records"):
        dets = schema.detections_from_row(row)
        band = in_band(dets, thresholds, ignore_band)
        keep = above_thresholds(dets, thresholds) | band
        labels = np.where(band, IGNORE, dets[schema.LABELS])
        masks, points = dets.get(schema.MASKS), dets.get(schema.KEYPOINTS)
        records.append(
            Record(
                row[schema.PATH],
                dets[schema.BOXES][keep],
                labels[keep],
                None if masks is None else masks[keep],
                None if points is None else points[keep],
                int(row[schema.HEIGHT]),
                int(row[schema.WIDTH]),
            )
        )
    return records


Candidates = str | Path | pd.DataFrame | ray.data.Dataset


def candidates_of(candidates: Candidates) -> ray.data.Dataset:
    """The candidates as a lazy Ray Dataset: a candidates location (its parts),
    a Dataset as it is, or an in-memory frame (tests, benchmark sweeps)."""
    if isinstance(candidates, ray.data.Dataset):
        return candidates
    if isinstance(candidates, pd.DataFrame):
        return ray.data.from_pandas(candidates)
    return candidates_dataset(candidates)


def _training_rows(
    frame: pd.DataFrame, thresholds: dict[int, float], ignore_band: float
) -> dict[str, np.ndarray]:
    """Ray Data stage: candidates -> the pseudo-labeled training rows of the
    readable images (see :func:`pseudo_records`), keyed by path (their order)."""
    rows = [
        record_row(record) | {INDEX: record.path}
        for record in pseudo_records(frame, thresholds, ignore_band)
    ]
    if not rows:  # every image unreadable: an empty batch with the same columns
        names = [schema.PATH, schema.BOXES, schema.LABELS, schema.HEIGHT]
        names += [schema.WIDTH, INDEX]
        names += [n for n in (schema.MASKS, schema.KEYPOINTS) if n in frame.columns]
        return {name: np.empty(0, object) for name in names}
    return to_batch(rows)


def pseudo_dataset(
    candidates: Candidates, thresholds: dict[int, float], ignore_band: float = 0.0
) -> ray.data.Dataset:
    """The student's pseudo-labeled set, lazily: each Train worker reads the parts
    from storage, keeps readable images with the candidates at or above their
    label's threshold (and those in the ``ignore_band``, as ignored boxes), and
    orders the rows by path (so a seed repeats the order). Nothing of it passes
    through the driver."""
    return candidates_of(candidates).map_batches(
        _training_rows,
        fn_kwargs={"thresholds": thresholds, "ignore_band": ignore_band},
        batch_format="pandas",
    )


def _counts(frame: pd.DataFrame, thresholds: dict[int, float]) -> pd.DataFrame:
    readable = frame[frame[schema.ERROR] == ""]
    kept = sum(
        int(above_thresholds(schema.detections_from_row(row), thresholds).sum())
        for row in readable.to_dict("records")
    )
    return pd.DataFrame(
        {
            "images": [len(frame)],
            "errors": [len(frame) - len(readable)],
            "pseudo_labeled": [len(readable)],
            "instances": [kept],
        }
    )


def pseudo_counts(
    candidates: Candidates, thresholds: dict[int, float]
) -> dict[str, int]:
    """``images`` (candidate rows), ``errors``, ``pseudo_labeled`` (readable images,
    the pseudo-labeled set) and ``instances`` (kept pseudo-labels): one pass on the
    cluster, a few numbers back."""
    names = ["images", "errors", "pseudo_labeled", "instances"]
    totals = dict.fromkeys(names, 0)
    counted = candidates_of(candidates).map_batches(
        _counts, fn_kwargs={"thresholds": thresholds}, batch_format="pandas"
    )
    # a few numbers per block; an empty set (e.g. 0% of a sweep) gives no block
    for batch in counted.iter_batches(batch_size=None, batch_format="pandas"):
        for name in names:
            totals[name] += int(batch[name].sum()) if name in batch else 0
    return totals


def student_schedule(config: Config, pseudo_images: int) -> Config:
    """``config`` with the student's schedule in steps: ``student.passes`` (when
    set) over the ``pseudo_images`` (readable pseudo-labeled images; the labeled
    set when there are none) at the student's pseudo-labeled images per step. The
    control is trained on the schedule this returns, so both get the same steps."""
    cfg = config.student
    if not cfg.passes:
        return config
    workers = cfg.num_workers
    if pseudo_images:
        share = split_batch(cfg.batch_size, cfg.labeled_share, True)[1]
        cfg = sized(cfg, pseudo_images, share * workers)
        images, kind = pseudo_images, "pseudo-labeled"
    else:
        images = len(labeled_training_records(config).records)
        cfg = sized(cfg, images, cfg.batch_size * workers)
        kind = "labeled (no pseudo-labeled image)"
    logger.info(
        "student schedule: %d steps x %d images (%g passes over %d %s images)",
        cfg.iterations,
        cfg.batch_size * workers,
        cfg.passes,
        images,
        kind,
    )
    return dataclasses.replace(config, student=dataclasses.replace(cfg, passes=0.0))


def train_student(
    config: Config,
    candidates: Candidates,
    thresholds: dict[int, float],
    teacher: str | None = None,
    counts: dict[str, int] | None = None,
) -> Path:
    """Trains the student; returns its exported checkpoint ``OUTPUT_DIR/student``.

    ``candidates`` is the candidates location (default use: the run's, in
    storage on a cluster), streamed to the Train workers (:func:`pseudo_dataset`).
    ``thresholds`` maps each label to the score its pseudo-labels must reach. With
    ``student.init: teacher`` the workers load the teacher from ``teacher`` (a
    folder or URI; default: the run's own, in storage on a cluster).
    ``student.passes`` sizes the schedule (:func:`student_schedule`). ``counts``:
    :func:`pseudo_counts` of these candidates, when the caller has them already.
    """
    counts = counts or pseudo_counts(candidates, thresholds)
    config = student_schedule(config, counts["pseudo_labeled"])
    metadata = {
        "thresholds": {str(k): v for k, v in thresholds.items()},
        "pseudo_images": counts["pseudo_labeled"],
        "pseudo_instances": counts["instances"],
    }
    band = config.student.ignore_band
    pseudo = (
        pseudo_dataset(candidates, thresholds, band)
        if counts["pseudo_labeled"]
        else None
    )
    return _train(config, STUDENT_DIR, pseudo, teacher, metadata)


# What a labeled-only run learns from besides its data: equal in two runs, they are
# the same model up to seed noise (checkpointing, evaluation and resources aside).
SCHEDULE_FIELDS = (
    "iterations",
    "batch_size",
    "num_workers",
    "max_workers",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_iterations",
    "lr_milestones",
    "hflip_prob",
    "use_gpu",
    "amp",
)


def teacher_is_control(config: Config, labeled_images: int, pseudo_images: int) -> bool:
    """Whether the teacher already is the student's equal-compute control: the
    paper's protocol, where the teacher is the labeled-only model trained on the
    student's schedule (steps, batch, learning rate and its decay, augmentation;
    ``passes`` resolved for ``labeled_images`` and ``pseudo_images``) and the
    student starts from the same initial weights. Then ``student.control`` trains
    nothing more: the teacher is the control."""
    teacher = teacher_schedule(config.teacher, labeled_images)
    student = student_schedule(config, pseudo_images).student
    return config.student.init == "pretrained" and all(
        getattr(teacher, f) == getattr(student, f) for f in SCHEDULE_FIELDS
    )


def train_control(config: Config, teacher: str | None = None) -> Path:
    """Trains the equal-compute control: the labeled images only, on exactly the
    student's schedule (steps, batch, learning rate, augmentation, init), so that
    ``student - control`` measures the pseudo-labels; returns ``OUTPUT_DIR/control``.
    With ``student.passes``, pass the config :func:`student_schedule` returns.
    """
    if config.student.passes:
        raise ValueError(
            "student.passes is set: train the control on the student's steps, "
            "student_schedule(config, pseudo_images)"
        )
    return _train(config, CONTROL_DIR, None, teacher, {})


def pseudo_augment(labeled: Augment, cfg: StudentConfig) -> Augment:
    """The pseudo-labeled images' augmentation: the labeled images' ``labeled``,
    with ``student.pseudo_min_size`` scales and ``student.pseudo_color_jitter``."""
    return dataclasses.replace(
        labeled,
        min_sizes=cfg.pseudo_min_size or labeled.min_sizes,
        color_jitter=cfg.pseudo_color_jitter,
    )


def _train(
    config: Config,
    role: str,
    pseudo: ray.data.Dataset | None,
    teacher: str | None,
    metadata: dict[str, Any],
) -> Path:
    """One run on the student's schedule: labeled + ``pseudo`` images (exactly
    ``student.labeled_share`` of each batch labeled when there is a pseudo set)."""
    categories, labeled, names = labeled_training_records(config)
    cfg = config.student
    run = Run.of(config)
    job = TrainJob(
        model=config.model,
        train=cfg,
        categories=categories,
        labeled_share=cfg.labeled_share if pseudo is not None else 1.0,
        init_from=(teacher or run.shared(TEACHER_DIR))
        if cfg.init == "teacher"
        else None,
        evaluation=config.data.test,
        evaluation_view=single_view(config)[0],
        max_detections=config.ensemble.max_detections,
        log_dir=run.shared(f"{TENSORBOARD_DIR}/{role}"),
        metadata={
            "role": role,
            "init": cfg.init,
            **metadata,
            "config": to_dict(config),
        },
    )
    augment = augment_for(config, cfg, names)
    datasets = {LABELED: prepare(labeled, augment)}
    if pseudo is not None:
        datasets[PSEUDO] = prepare(pseudo, pseudo_augment(augment, cfg))
    return fit(job, datasets, role, run.shared(TRAIN_DIR), run.local(role))
