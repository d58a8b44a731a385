"""The four steps of data distillation plus evaluation, end to end.

teacher -> views + ensemble (pseudo-label) -> threshold -> student -> evaluate, each
step's output kept under ``OUTPUT_DIR`` and ``summary.json`` written at the end.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from raydd.config import Config, ViewConfig, save_config
from raydd.data.coco import (
    Categories,
    Record,
    coco_records,
    instances_per_image,
    load_coco,
)
from raydd.evaluate import evaluate_checkpoint
from raydd.pseudo_label import pseudo_label, read_candidates
from raydd.student import pseudo_records, train_student
from raydd.teacher import train_teacher
from raydd.threshold import save_threshold, search_threshold

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def labeled_records(config: Config) -> list[Record]:
    categories = Categories.from_coco(load_coco(config.data.labeled.annotations))
    return coco_records(config.data.labeled, categories)


def single_view(config: Config) -> tuple[ViewConfig, ...]:
    """The plain (single-view) evaluation: the first configured view without flip."""
    return (ViewConfig(scale=config.views[0].scale),)


def evaluate_all(config: Config, teacher: Path, student: Path) -> dict[str, Any]:
    """COCO AP of the teacher (one view), the teacher with all views, the student."""
    runs = {
        "teacher": (teacher, single_view(config)),
        "teacher_views": (teacher, config.views),
        "student": (student, single_view(config)),
    }
    return {
        name: evaluate_checkpoint(
            str(ckpt), config.data.test, views, config.ensemble, config.inference
        )
        for name, (ckpt, views) in runs.items()
    }


def run_distillation(config: Config) -> dict[str, Any]:
    """Runs every step and writes ``OUTPUT_DIR/summary.json``; returns the summary."""
    out = Path(config.output_dir)
    save_config(config, out / "config.yaml")
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args):
        tic = time.perf_counter()
        result = fn(*args)
        seconds[step] = round(time.perf_counter() - tic, 1)
        logger.info("[%s] done in %.1f s", step, seconds[step])
        return result

    teacher = timed("teacher", train_teacher, config)
    labeling = timed("pseudo_label", pseudo_label, config, str(teacher))
    candidates = read_candidates(labeling.candidates)
    labeled_set = labeled_records(config)
    target = instances_per_image(labeled_set)
    threshold = timed(
        "threshold",
        search_threshold,
        candidates,
        target,
        config.threshold,
        out / "tune",
    )
    save_threshold(threshold, out)
    student = timed(
        "student", train_student, config, candidates, threshold.threshold, teacher
    )
    metrics = timed("evaluate", evaluate_all, config, teacher, student)
    pseudo = pseudo_records(candidates, threshold.threshold)
    summary = {
        **metrics,
        "threshold": threshold.threshold,
        "instances_per_image": {
            "labeled": target,
            "pseudo": instances_per_image(pseudo),
        },
        "images": {
            "labeled": len(labeled_set),
            "unlabeled": labeling.images,
            "pseudo_labeled": len(pseudo),  # readable images the student trained on
            "errors": labeling.errors,
        },
        "seconds": seconds,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
