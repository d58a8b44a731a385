"""What the threshold and evaluate steps do beyond their own modules: choose and
record the threshold, score every model, summarise the run (``summary.json``).

The steps themselves, and the one way to run them, are in :mod:`raydd.steps`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import ray.data

from raydd.config import Config, TrainConfig, single_view
from raydd.data.coco import (
    Categories,
    Record,
    coco_records,
    instances_per_image,
    load_coco,
)
from raydd.evaluate import evaluate_checkpoint
from raydd.layout import (
    CANDIDATES_DIR,
    CONTROL_DIR,
    PLOT_FILE,
    STEPS_FILE,
    STUDENT_DIR,
    SUMMARY_FILE,
    TEACHER_DIR,
    TUNE_DIR,
    VALIDATION_CANDIDATES_DIR,
    Run,
)
from raydd.pseudo_label import read_candidates
from raydd.student import pseudo_counts, student_schedule, teacher_is_control
from raydd.teacher import teacher_schedule
from raydd.threshold import (
    ThresholdResult,
    class_rates,
    format_thresholds,
    load_threshold,
    match_ground_truth,
    plot_thresholds,
    save_threshold,
    score_histograms,
    search_threshold,
    thresholds_by_label,
)

logger = logging.getLogger(__name__)


def labeled_records(config: Config) -> list[Record]:
    categories = Categories.from_coco(load_coco(config.data.labeled.annotations))
    return coco_records(config.data.labeled, categories)


def choose_threshold(
    config: Config, candidates: ray.data.Dataset | pd.DataFrame
) -> ThresholdResult:
    """Step 3 with its outputs: ``thresholds.json``, ``thresholds.png`` and a table
    in the log. Uses the pseudo-labeled validation split when there is one.

    ``candidates`` (the unlabeled set's, one row per image) are read once, into
    their score histograms (:func:`raydd.threshold.score_histograms`)."""
    out = Path(config.output_dir)
    categories = Categories.from_coco(load_coco(config.data.labeled.annotations))
    targets = class_rates(
        coco_records(config.data.labeled, categories), categories.num_classes
    )
    validation = None
    if config.data.validation is not None:
        truth = coco_records(config.data.validation, categories)
        found = read_candidates(out / VALIDATION_CANDIDATES_DIR)
        validation = match_ground_truth(found, truth)
    histograms = score_histograms(candidates, categories.num_classes)
    result, trials = search_threshold(
        histograms,
        targets,
        config.threshold,
        Run.of(config).shared(TUNE_DIR),
        validation,
    )
    save_threshold(result, out)
    plot_thresholds(trials, result, out / PLOT_FILE)
    table = format_thresholds(result, targets, histograms, list(categories.names))
    logger.info("thresholds (%d Ray Tune trials):\n%s", result.trials, table)
    return result


def evaluate_all(config: Config) -> dict[str, Any]:
    """COCO AP of the teacher (one view), the teacher with all views, the student
    and, when it was trained, the control (one view), each loaded by the Predictor
    actors from ``Run.shared`` (storage on a cluster)."""
    run = Run.of(config)
    teacher, student = run.shared(TEACHER_DIR), run.shared(STUDENT_DIR)
    runs = {
        "teacher": (teacher, single_view(config)),
        "teacher_views": (teacher, config.views),
        "student": (student, single_view(config)),
    }
    if config.student.control and run.fetch(CONTROL_DIR):
        runs["control"] = (run.shared(CONTROL_DIR), single_view(config))
    return {
        name: evaluate_checkpoint(
            ckpt, config.data.test, views, config.ensemble, config.inference
        )
        for name, (ckpt, views) in runs.items()
    }


def schedule(train: TrainConfig) -> dict[str, int]:
    """The compute of a training run: steps, images per step, images seen (the
    control's is the student's)."""
    batch = train.batch_size * train.num_workers
    return {
        "steps": train.iterations,
        "batch": batch,
        "images": train.iterations * batch,
    }


def summarize(
    config: Config, metrics: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    """Writes ``OUTPUT_DIR/summary.json`` from ``metrics`` (:func:`evaluate_all`),
    the earlier steps' outputs (threshold, candidates, ``steps.json``) and
    ``seconds`` of the steps not recorded yet; returns it."""
    out = Path(config.output_dir)
    threshold = load_threshold(out)
    used = thresholds_by_label(threshold, config.threshold.per_class)
    counts = pseudo_counts(Run.of(config).shared(CANDIDATES_DIR), used)
    labeled_set = labeled_records(config)
    times = out / STEPS_FILE
    summary = {
        **metrics,
        "threshold": threshold.threshold,
        "per_class_thresholds": threshold.per_class
        if config.threshold.per_class
        else None,
        "validation": {k: getattr(threshold, k) for k in ("precision", "recall", "f1")},
        "instances_per_image": {
            "labeled": instances_per_image(labeled_set),
            "pseudo": counts["instances"] / max(counts["pseudo_labeled"], 1),
        },
        "images": {
            "labeled": len(labeled_set),
            "unlabeled": counts["images"],
            # readable images the student trained on
            "pseudo_labeled": counts["pseudo_labeled"],
            "errors": counts["errors"],
        },
        "schedules": {  # as trained: ``passes`` resolved to steps as the steps did
            "teacher": schedule(teacher_schedule(config.teacher, len(labeled_set))),
            "student": schedule(
                student_schedule(config, counts["pseudo_labeled"]).student
            ),
        },
        # the labeled-only model on the student's schedule, if any
        "baseline": "control"
        if "control" in metrics
        else "teacher"
        if teacher_is_control(config, len(labeled_set), counts["pseudo_labeled"])
        else None,
        "seconds": {
            **(json.loads(times.read_text()) if times.exists() else {}),
            **seconds,
        },
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
