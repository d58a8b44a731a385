"""Step 1: the teacher, ordinary supervised training on the labeled set (Ray Train)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

from raydd import models
from raydd.config import Config, TrainConfig, single_view, to_dict
from raydd.data.coco import (
    Categories,
    Record,
    coco_records,
    keypoint_flip_permutation,
    keypoint_names,
    load_coco,
)
from raydd.ingest import LABELED, Augment, prepare
from raydd.layout import TEACHER_DIR, TENSORBOARD_DIR, TRAIN_DIR, Run
from raydd.train import TrainJob, fit, sized

logger = logging.getLogger(__name__)


class LabeledSet(NamedTuple):
    """The labeled split as a training run reads it (its COCO JSON parsed once)."""

    categories: Categories
    records: list[Record]
    keypoint_names: list[str]


def augment_for(config: Config, train: TrainConfig, names: list[str]) -> Augment:
    """The Ray Data augmentation of a training run: the model's training scales,
    ``train.hflip_prob``, the flip map of the keypoint ``names``
    (:attr:`LabeledSet.keypoint_names`), and the targets the model needs."""
    masks, keypoints = models.targets(config.model.name)
    return Augment(
        min_sizes=config.model.min_size,
        max_size=config.model.max_size,
        hflip_prob=train.hflip_prob,
        flip_permutation=tuple(keypoint_flip_permutation(names)),
        masks=masks,
        keypoints=keypoints,
    )


def labeled_training_records(config: Config) -> LabeledSet:
    """The labeled split's categories, records (with the targets the model needs)
    and keypoint names."""
    coco = load_coco(config.data.labeled.annotations)
    categories = Categories.from_coco(coco)
    masks, keypoints = models.targets(config.model.name)
    records = coco_records(
        config.data.labeled, categories, masks=masks, keypoints=keypoints, coco=coco
    )
    return LabeledSet(categories, records, keypoint_names(coco))


def teacher_schedule(teacher: TrainConfig, labeled_images: int) -> TrainConfig:
    """The teacher's schedule in steps (``passes`` over the labeled set, if set)."""
    return sized(teacher, labeled_images, teacher.batch_size * teacher.num_workers)


def train_teacher(config: Config) -> Path:
    """Trains the teacher; returns its exported checkpoint ``OUTPUT_DIR/teacher``
    (``teacher.passes``, when set, sizes the schedule to the labeled set)."""
    categories, records, names = labeled_training_records(config)
    cfg = teacher_schedule(config.teacher, len(records))
    config = dataclasses.replace(config, teacher=cfg)
    logger.info(
        "teacher schedule: %d steps x %d images (%.2f passes over %d labeled images)",
        cfg.iterations,
        cfg.batch_size * cfg.num_workers,
        cfg.iterations * cfg.batch_size * cfg.num_workers / max(len(records), 1),
        len(records),
    )
    run = Run.of(config)
    job = TrainJob(
        model=config.model,
        train=config.teacher,
        categories=categories,
        evaluation=config.data.test,
        evaluation_view=single_view(config)[0],
        max_detections=config.ensemble.max_detections,
        log_dir=run.shared(f"{TENSORBOARD_DIR}/teacher"),
        metadata={"role": "teacher", "init": "pretrained", "config": to_dict(config)},
    )
    datasets = {LABELED: prepare(records, augment_for(config, config.teacher, names))}
    return fit(job, datasets, "teacher", run.shared(TRAIN_DIR), run.local(TEACHER_DIR))
