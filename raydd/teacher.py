"""Step 1: the teacher, ordinary supervised training on the labeled set (Ray Train)."""

from __future__ import annotations

from pathlib import Path

from raydd.config import Config, to_dict
from raydd.data.coco import Categories, coco_records, load_coco
from raydd.train import TrainJob, fit

TEACHER_DIR = "teacher"


def train_teacher(config: Config) -> Path:
    """Trains the teacher; returns its exported checkpoint ``OUTPUT_DIR/teacher``."""
    categories = Categories.from_coco(load_coco(config.data.labeled.annotations))
    job = TrainJob(
        model=config.model,
        train=config.teacher,
        categories=categories,
        labeled=coco_records(config.data.labeled, categories),
        metadata={"role": "teacher", "config": to_dict(config)},
    )
    out = Path(config.output_dir)
    return fit(job, "teacher", out / "ray_train", out / TEACHER_DIR)
