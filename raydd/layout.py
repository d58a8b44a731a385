"""The run layout: every name a run writes, which step writes it, and where it lives.

A run keeps each output under one relative name. ``output_dir`` is the local
working copy on the node that runs the job's driver; ``storage_uri`` (when set) is
the durable copy every node reaches, and the source of truth on a cluster:

==================================== ============ ====================================
name                                 step         what
==================================== ============ ====================================
``config.yaml``                      (any)        the resolved config of the run
``steps.json``                       (any)        seconds each finished step took
``teacher/``                         teacher      ``model.pt`` + ``metadata.json``
``tensorboard/teacher/``             teacher      TensorBoard event files of training
``ray_train/teacher-<digest>/``      teacher      Ray Train's checkpoints (resume)
``candidates/part-<digest>.parquet`` pseudo_label fused detections, one row per
                                                  image; ``_index.parquet`` names the
                                                  run's parts
``validation_candidates/``           pseudo_label the same for the validation split
``errors.csv``                       pseudo_label inputs that could not be read
``thresholds.json``, ``.png``        threshold    the chosen score threshold(s)
``tune/``                            threshold    Ray Tune's results (TensorBoard)
``student/``, ``tensorboard/student`` student      as for the teacher
``control/``, ``tensorboard/control`` student      the equal-compute control (option)
``summary.json``, ``report.html``    evaluate     AP table, counts, timings; the page
``pseudo_labels.json``               export       pseudo-labels as COCO instances
==================================== ============ ====================================

:meth:`Run.shared` is the location a process on *another* node reads or writes
(``storage_uri/name``, or ``output_dir/name`` on one node without storage).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raydd import storage

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
STEPS_FILE = "steps.json"
TEACHER_DIR = "teacher"
STUDENT_DIR = "student"
CONTROL_DIR = "control"
TENSORBOARD_DIR = "tensorboard"
TRAIN_DIR = "ray_train"
CANDIDATES_DIR = "candidates"
VALIDATION_CANDIDATES_DIR = "validation_candidates"
ERRORS_FILE = "errors.csv"
THRESHOLD_FILE = "thresholds.json"
PLOT_FILE = "thresholds.png"
TUNE_DIR = "tune"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
EXPORT_FILE = "pseudo_labels.json"
SMOKE_DATA = "smoke-data"  # jobs' --smoke-test with storage_uri: its demo data

# summary.json: COCO box metrics (0..1) of each model on the test split (and of
# "control", the labeled-only model on the student's schedule, when trained)
MODELS = ("teacher", "teacher_views", "student")
METRICS = ("AP", "AP50", "AP75")

STEPS = ("teacher", "pseudo_label", "threshold", "student", "evaluate")

# what each step leaves under OUTPUT_DIR (the first one marks the step done)
STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    "teacher": (TEACHER_DIR, f"{TENSORBOARD_DIR}/teacher"),
    "pseudo_label": (CANDIDATES_DIR, VALIDATION_CANDIDATES_DIR, ERRORS_FILE),
    "threshold": (THRESHOLD_FILE, PLOT_FILE, TUNE_DIR),
    "student": (
        STUDENT_DIR,
        f"{TENSORBOARD_DIR}/student",
        CONTROL_DIR,
        f"{TENSORBOARD_DIR}/control",
    ),
    "evaluate": (SUMMARY_FILE, REPORT_FILE),
}


# written straight to Run.shared(name) (by Ray Train's rank 0 wherever it runs, by
# Ray Tune, by the pseudo-labeling actors), so the local copy is refreshed from
# storage, never uploaded
WRITTEN_TO_STORAGE = frozenset(
    (
        TUNE_DIR,
        CANDIDATES_DIR,
        VALIDATION_CANDIDATES_DIR,
        *(f"{TENSORBOARD_DIR}/{r}" for r in ("teacher", "student", "control")),
    )
)


def writer_of(name: str) -> str:
    """The step whose outputs include ``name``."""
    return next(step for step, names in STEP_OUTPUTS.items() if name in names)


@dataclass(frozen=True)
class Run:
    """Where the outputs of one run live.

    Attributes:
        output_dir: local working copy (the driver's node).
        storage_uri: durable copy every node reaches (``None``: one node only).
    """

    output_dir: str
    storage_uri: str | None = None

    @classmethod
    def of(cls, config: Any) -> Run:
        """The layout of a :class:`raydd.config.Config`."""
        return cls(config.output_dir, config.storage_uri)

    def local(self, name: str) -> Path:
        return Path(self.output_dir) / name

    def stored(self, name: str) -> str | None:
        """``STORAGE_URI/name``, or ``None`` without storage."""
        return (
            None if self.storage_uri is None else storage.join(self.storage_uri, name)
        )

    def shared(self, name: str) -> str:
        """Where any node finds ``name``: in storage if set, else the local copy."""
        return self.stored(name) or str(self.local(name))

    def upload(self, name: str) -> str | None:
        """Copies the local ``name`` to storage; returns its URI (``None`` when
        there is no storage or nothing local, e.g. no validation split)."""
        stored = self.stored(name)
        if stored is None or not self.local(name).exists():
            return None
        storage.copy(str(self.local(name)), stored)
        logger.info("copied %s -> %s", self.local(name), stored)
        return stored

    def fetch(self, name: str) -> bool:
        """Brings ``name`` from storage into ``output_dir`` if it is missing there
        (a new head node); returns whether the local copy exists afterwards."""
        local, stored = self.local(name), self.stored(name)
        if local.exists() or stored is None:
            return local.exists()
        if storage.file_type(stored) == pafs.FileType.NotFound:
            return False
        storage.copy(stored, str(local))
        logger.info("copied %s -> %s", stored, local)
        return True

    def share(self, name: str) -> None:
        """Uploads the local ``name`` when storage lacks it (a run that gained a
        ``storage_uri`` after its first steps)."""
        stored = self.stored(name)
        if stored is not None and storage.file_type(stored) == pafs.FileType.NotFound:
            self.upload(name)

    def mirror(self, name: str) -> None:
        """Refreshes the local copy of ``name`` from storage (what remote processes
        wrote there, e.g. TensorBoard files of a Train worker)."""
        stored = self.stored(name)
        if stored is None or storage.file_type(stored) == pafs.FileType.NotFound:
            return
        storage.copy(stored, str(self.local(name)))

    def save_step(self, step: str) -> None:
        """After ``step``: its local outputs go to storage, and what was written
        straight to storage (:data:`WRITTEN_TO_STORAGE`) comes back into
        ``output_dir``."""
        for name in STEP_OUTPUTS[step]:
            if name in WRITTEN_TO_STORAGE:
                self.mirror(name)
            else:
                self.upload(name)
