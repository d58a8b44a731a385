"""The four steps of data distillation plus evaluation, end to end.

teacher -> views + ensemble (pseudo-label) -> threshold -> student -> evaluate, each
step's output kept under ``OUTPUT_DIR`` (and copied to ``storage_uri`` when the config
sets one: :mod:`raydd.storage`) and ``summary.json`` written at the end.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raydd.config import Config, save_config, single_view
from raydd.data.coco import (
    Categories,
    Record,
    coco_records,
    instances_per_image,
    load_coco,
)
from raydd.evaluate import evaluate_checkpoint
from raydd.pseudo_label import (
    CANDIDATES_DIR,
    ERRORS_FILE,
    VALIDATION_CANDIDATES_DIR,
    pseudo_label,
    read_candidates,
)
from raydd.storage import upload
from raydd.student import STUDENT_DIR, pseudo_records, train_student
from raydd.teacher import TEACHER_DIR, train_teacher
from raydd.threshold import (
    PLOT_FILE,
    THRESHOLD_FILE,
    ThresholdResult,
    class_rates,
    format_thresholds,
    match_ground_truth,
    plot_thresholds,
    save_threshold,
    score_table,
    search_threshold,
    thresholds_by_label,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
TUNE_DIR = "tune"

# what each step leaves under OUTPUT_DIR (copied to storage_uri when it ends)
STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    "teacher": (TEACHER_DIR,),
    "pseudo_label": (CANDIDATES_DIR, VALIDATION_CANDIDATES_DIR, ERRORS_FILE),
    "threshold": (THRESHOLD_FILE, PLOT_FILE, TUNE_DIR),
    "student": (STUDENT_DIR,),
    "evaluate": (),
}


def labeled_records(config: Config) -> list[Record]:
    categories = Categories.from_coco(load_coco(config.data.labeled.annotations))
    return coco_records(config.data.labeled, categories)


def choose_threshold(config: Config, candidates: pd.DataFrame) -> ThresholdResult:
    """Step 3 with its outputs: ``thresholds.json``, ``thresholds.png`` and a table
    in the log. Uses the pseudo-labeled validation split when there is one."""
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
    result, trials = search_threshold(
        candidates, targets, config.threshold, out / TUNE_DIR, validation
    )
    save_threshold(result, out)
    plot_thresholds(trials, result, out / PLOT_FILE)
    table = format_thresholds(
        result, targets, score_table(candidates), list(categories.names)
    )
    logger.info("thresholds (%d Ray Tune trials):\n%s", result.trials, table)
    return result


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


def save_step(config: Config, step: str) -> None:
    """Copies a finished step's outputs to ``storage_uri`` (nothing when unset)."""
    for name in STEP_OUTPUTS[step]:
        upload(config, Path(config.output_dir) / name)


def run_distillation(config: Config) -> dict[str, Any]:
    """Runs every step and writes ``OUTPUT_DIR/summary.json``; returns the summary.

    Logs one line per step (``[teacher] done in 12.3 s``) on the ``raydd`` logger;
    with ``storage_uri`` set, each step's outputs are uploaded as soon as it ends.
    """
    out = Path(config.output_dir)
    save_config(config, out / CONFIG_FILE)
    upload(config, out / CONFIG_FILE)
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args):
        tic = time.perf_counter()
        result = fn(*args)
        save_step(config, step)
        seconds[step] = round(time.perf_counter() - tic, 1)
        logger.info("[%s] done in %.1f s", step, seconds[step])
        return result

    teacher = timed("teacher", train_teacher, config)
    labeling = timed("pseudo_label", pseudo_label, config, str(teacher))
    candidates = read_candidates(labeling.candidates)
    threshold = timed("threshold", choose_threshold, config, candidates)
    used = thresholds_by_label(threshold, config.threshold.per_class)
    student = timed("student", train_student, config, candidates, used, teacher)
    metrics = timed("evaluate", evaluate_all, config, teacher, student)
    pseudo = pseudo_records(candidates, used)
    labeled_set = labeled_records(config)
    summary = {
        **metrics,
        "threshold": threshold.threshold,
        "per_class_thresholds": threshold.per_class
        if config.threshold.per_class
        else None,
        "validation": {k: getattr(threshold, k) for k in ("precision", "recall", "f1")},
        "instances_per_image": {
            "labeled": instances_per_image(labeled_set),
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
    upload(config, out / SUMMARY_FILE)
    return summary
