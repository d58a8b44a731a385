"""Step 4: the student, retrained on labeled ∪ pseudo-labeled images (Ray Train).

Every minibatch mixes a fixed share of labeled images (``student.labeled_share``, the
paper's 6:4 by default) with pseudo-labeled ones. The student starts from the initial
weights (pretrained backbone) by default -- retraining beat fine-tuning in the paper;
``student.init: teacher`` starts from the teacher instead. With ``student.control``
the step also trains the equal-compute control: labeled images only, same schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from raydd import schema
from raydd.config import Config, single_view, to_dict
from raydd.data.coco import Record
from raydd.ingest import LABELED, PSEUDO, prepare
from raydd.layout import (
    CONTROL_DIR,
    STUDENT_DIR,
    TEACHER_DIR,
    TENSORBOARD_DIR,
    TRAIN_DIR,
    Run,
)
from raydd.teacher import augment_for, labeled_training_records
from raydd.threshold import above_thresholds
from raydd.train import TrainJob, fit


def pseudo_records(
    candidates: pd.DataFrame, thresholds: dict[int, float]
) -> list[Record]:
    """Hard pseudo-labels: every readable image, with the candidates scoring at least
    their label's threshold (``thresholds``: label -> threshold; labels missing from
    it are dropped). Masks and keypoints come along when the candidates have them.

    Images left with no instance stay in (as background), as in the paper.
    """
    records = []
    for row in candidates[candidates[schema.ERROR] == ""].to_dict("records"):
        dets = schema.detections_from_row(row)
        keep = above_thresholds(dets, thresholds)
        masks, points = dets.get(schema.MASKS), dets.get(schema.KEYPOINTS)
        records.append(
            Record(
                row[schema.PATH],
                dets[schema.BOXES][keep],
                dets[schema.LABELS][keep],
                None if masks is None else masks[keep],
                None if points is None else points[keep],
                int(row[schema.HEIGHT]),
                int(row[schema.WIDTH]),
            )
        )
    return records


def train_student(
    config: Config,
    candidates: pd.DataFrame,
    thresholds: dict[int, float],
    teacher: str | None = None,
) -> Path:
    """Trains the student; returns its exported checkpoint ``OUTPUT_DIR/student``.

    ``thresholds`` maps each label to the score its pseudo-labels must reach. With
    ``student.init: teacher`` the workers load the teacher from ``teacher`` (a
    folder or URI; default: the run's own, in storage on a cluster).
    """
    pseudo = pseudo_records(candidates, thresholds)
    metadata = {
        "thresholds": {str(k): v for k, v in thresholds.items()},
        "pseudo_instances": int(sum(len(r.labels) for r in pseudo)),
    }
    return _train(config, STUDENT_DIR, pseudo, teacher, metadata)


def train_control(config: Config, teacher: str | None = None) -> Path:
    """Trains the equal-compute control: the labeled images only, on exactly the
    student's schedule (steps, batch, learning rate, augmentation, init), so that
    ``student - control`` measures the pseudo-labels; returns ``OUTPUT_DIR/control``.
    """
    return _train(config, CONTROL_DIR, [], teacher, {})


def _train(
    config: Config,
    role: str,
    pseudo: list[Record],
    teacher: str | None,
    metadata: dict[str, Any],
) -> Path:
    """One run on the student's schedule: labeled + ``pseudo`` images (exactly
    ``student.labeled_share`` of each batch labeled when there are any)."""
    categories, labeled, names = labeled_training_records(config)
    cfg = config.student
    run = Run.of(config)
    job = TrainJob(
        model=config.model,
        train=cfg,
        categories=categories,
        labeled_share=cfg.labeled_share if pseudo else 1.0,
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
    if pseudo:
        datasets[PSEUDO] = prepare(pseudo, augment)
    return fit(job, datasets, role, run.shared(TRAIN_DIR), run.local(role))
