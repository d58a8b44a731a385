"""The steps of a run and the one way to run them.

teacher -> pseudo_label -> threshold -> student -> evaluate. Each step names the
outputs of earlier steps it reads (:mod:`raydd.layout` names), runs, and leaves its
own outputs under ``output_dir``, copied to ``storage_uri``; ``steps.json`` records
how long each took. The ``raydd`` subcommands, ``raydd run``, ``jobs/*.py``, the
Python API and the benchmarks all go through :func:`run_step`, so a run made step by
step leaves the same files (``summary.json``, ``report.html``, TensorBoard) as
:func:`run_all`.

Example:
    >>> from raydd import load_config, run_all, run_step
    >>> config = load_config("configs/demo.yaml")  # doctest: +SKIP
    >>> run_step(config, "teacher")  # doctest: +SKIP
    'teacher done in 212.3 s: checkpoint /runs/demo/teacher'
    >>> summary = run_all(config)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydd.config import Config, ConfigError, save_config, validate_names
from raydd.layout import (
    CANDIDATES_DIR,
    CONFIG_FILE,
    METRICS,
    MODELS,
    STEP_OUTPUTS,
    STEPS,
    STEPS_FILE,
    STUDENT_DIR,
    SUMMARY_FILE,
    TEACHER_DIR,
    THRESHOLD_FILE,
    VALIDATION_CANDIDATES_DIR,
    Run,
    writer_of,
)

logger = logging.getLogger(__name__)


def ray_is_up() -> bool:
    """Whether this process is connected to Ray (never imports it: the checks
    before any work stay light)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class MissingInput(ConfigError):
    """An earlier step's output is missing: ``path``, which ``step`` writes."""

    def __init__(self, path: Path, step: str) -> None:
        super().__init__(f"{path} does not exist: run jobs/{step}.py first")
        self.path, self.step = path, step


def _teacher(config: Config) -> str:
    from raydd.teacher import train_teacher

    return f"checkpoint {train_teacher(config)}"


def _pseudo_label(config: Config) -> str:
    from raydd.pseudo_label import pseudo_label

    result = pseudo_label(config, Run.of(config).shared(TEACHER_DIR))
    return f"{result.images} images ({result.errors} unreadable) -> {result.candidates}"


def _threshold(config: Config) -> str:
    from raydd.pipeline import choose_threshold
    from raydd.pseudo_label import candidates_dataset

    parts = candidates_dataset(Run.of(config).shared(CANDIDATES_DIR))  # read once
    result = choose_threshold(config, parts)
    return (
        f"threshold {result.threshold:.4f}: {result.pseudo_instances_per_image:.3f} "
        f"instances per unlabeled image vs {result.labeled_instances_per_image:.3f} "
        f"labeled ({result.trials} trials)"
    )


def _student(config: Config) -> str:
    from raydd.student import (
        pseudo_counts,
        student_schedule,
        teacher_is_control,
        train_control,
        train_student,
    )
    from raydd.teacher import labeled_training_records
    from raydd.threshold import load_threshold, thresholds_by_label

    result = load_threshold(config.output_dir)
    used = thresholds_by_label(result, config.threshold.per_class)
    parts = Run.of(config).shared(CANDIDATES_DIR)  # streamed to the workers
    counts = pseudo_counts(parts, used)  # one pass, for the schedule and the student
    config = student_schedule(config, counts["pseudo_labeled"])  # the control's too
    done = f"checkpoint {train_student(config, parts, used, counts=counts)}"
    if not config.student.control:
        return done
    labeled = len(labeled_training_records(config).records)
    if teacher_is_control(config, labeled, counts["pseudo_labeled"]):
        return done + ", control: the teacher (trained on the same schedule)"
    return done + f", control {train_control(config)}"


def _evaluate(config: Config) -> str:
    from raydd.pipeline import evaluate_all, summarize
    from raydd.report import write_report

    tic = time.perf_counter()
    metrics = evaluate_all(config)
    summary = summarize(
        config, metrics, {"evaluate": round(time.perf_counter() - tic, 1)}
    )
    try:
        write_report(config.output_dir)
    except Exception:  # noqa: BLE001 - a failed page must not fail a finished run
        logger.exception("could not write the report; retry with `raydd report`")
    return f"{ap_line(metrics)}\n{format_table(metrics)}\n{schedules_note(summary)}"


@dataclass(frozen=True)
class Step:
    """One step: ``inputs`` (a config's earlier outputs it reads) and ``run``."""

    name: str
    inputs: Callable[[Config], tuple[str, ...]]
    run: Callable[[Config], str]


def _validation(config: Config) -> tuple[str, ...]:
    return () if config.data.validation is None else (VALIDATION_CANDIDATES_DIR,)


REGISTRY: dict[str, Step] = {
    step.name: step
    for step in (
        Step("teacher", lambda c: (), _teacher),
        Step("pseudo_label", lambda c: (TEACHER_DIR,), _pseudo_label),
        Step("threshold", lambda c: (CANDIDATES_DIR, *_validation(c)), _threshold),
        Step(
            "student",
            lambda c: (
                (CANDIDATES_DIR, THRESHOLD_FILE)
                + ((TEACHER_DIR,) if c.student.init == "teacher" else ())
            ),
            _student,
        ),
        Step(
            "evaluate",
            lambda c: (TEACHER_DIR, STUDENT_DIR, CANDIDATES_DIR, THRESHOLD_FILE),
            _evaluate,
        ),
    )
}
assert tuple(REGISTRY) == STEPS


def check(config: Config, steps: Sequence[str]) -> None:
    """What can fail before any work, in about a second: the inputs of the first
    of ``steps`` (fetched from storage if only there), then the model and fusion
    names (which import torch).

    Raises:
        MissingInput: an input is neither in ``output_dir`` nor in storage.
        ConfigError: an unknown model or fusion name.
    """
    run = Run.of(config)
    for name in REGISTRY[steps[0]].inputs(config):
        if not run.fetch(name):
            raise MissingInput(run.local(name), writer_of(name))
        run.share(name)  # workers read it from storage
    validate_names(config)


def run_step(config: Config, step: str) -> str:
    """Runs one step, uploads its outputs to ``storage_uri`` and records its time;
    returns a one-line summary (``student done in 41.2 s: checkpoint out/student``).

    Raises:
        MissingInput: an earlier step's output is missing.
    """
    check(config, [step])
    if ray_is_up():  # the Python API may join a cluster without storage
        from raydd.runtime import require_storage_on_cluster

        require_storage_on_cluster(config)
    run = Run.of(config)
    save_config(config, run.local(CONFIG_FILE))
    run.upload(CONFIG_FILE)
    tic = time.perf_counter()
    detail = REGISTRY[step].run(config)
    run.save_step(step)
    seconds = round(time.perf_counter() - tic, 1)
    _record_time(run, step, seconds)
    logger.info("[%s] done in %.1f s", step, seconds)
    return f"{step} done in {seconds:.1f} s: {detail}"


def _record_time(run: Run, step: str, seconds: float) -> None:
    run.fetch(STEPS_FILE)  # the earlier steps' times, on a new head node
    path = run.local(STEPS_FILE)
    times = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**times, step: seconds}, indent=2))
    run.upload(STEPS_FILE)


def run_missing(config: Config, upto: str) -> list[str]:
    """Runs the steps before ``upto`` whose outputs are in neither ``output_dir``
    nor storage (what a ``--smoke-test`` of one step needs); returns their lines."""
    run = Run.of(config)
    return [
        run_step(config, step)
        for step in STEPS[: STEPS.index(upto)]
        if not run.fetch(STEP_OUTPUTS[step][0])
    ]


def run_all(config: Config) -> dict[str, Any]:
    """Every step in order; returns ``summary.json``'s content."""
    for step in STEPS:
        run_step(config, step)
    return json.loads(Run.of(config).local(SUMMARY_FILE).read_text())


def models(metrics: dict[str, Any]) -> list[str]:
    """The models scored in ``metrics``: :data:`MODELS` and the control if any."""
    return [*MODELS, *(["control"] if "control" in metrics else [])]


def gains(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The student's gains, the honest one first: ``student - control`` (same
    schedule, labeled images only) when the control was trained, then ``student -
    teacher``."""
    bases = [b for b in ("control", "teacher") if b in metrics]
    return {
        f"student - {base}": {
            m: metrics["student"][m] - metrics[base][m] for m in METRICS
        }
        for base in bases
    }


def format_table(metrics: dict[str, Any]) -> str:
    """A text table of AP/AP50/AP75 per model, plus the student's gains."""
    rows = [("model", *METRICS)]
    for name in models(metrics):
        rows.append((name, *(f"{metrics[name][m]:.4f}" for m in METRICS)))
    for name, gain in gains(metrics).items():
        rows.append((name, *(f"{gain[m]:+.4f}" for m in METRICS)))
    return "\n".join(f"{r[0]:<18}" + "".join(f"{c:>9}" for c in r[1:]) for r in rows)


def schedules_note(summary: dict[str, Any]) -> str:
    """What each model was trained on (``summary["schedules"]``), and therefore what
    the student's gain means (``summary["baseline"]``: the labeled-only model on
    the student's schedule -- ``control``, ``teacher`` -- or none)."""
    schedules = summary.get("schedules")
    if not schedules:
        return ""
    steps = "; ".join(
        f"{name} {s['steps']} steps x {s['batch']} images"
        for name, s in schedules.items()
    )
    meaning = {
        "control": "The control is trained on the labeled images only with the "
        "student's schedule: student - control is what the pseudo-labels add",
        "teacher": "The teacher is trained on the student's schedule (steps, batch, "
        "learning rate, augmentation, initial weights): it is the labeled-only "
        "control, and student - teacher is what the pseudo-labels add",
    }.get(
        summary.get("baseline"),
        "The teacher is not trained on the student's schedule and there is no "
        "control (student.control: true): student - teacher mixes what the "
        "pseudo-labels add with what else differs (schedule, initial weights)",
    )
    return f"Schedules: {steps}. {meaning}."


def ap_line(metrics: dict[str, Any]) -> str:
    """``AP teacher 0.2575, teacher_views 0.3183, student 0.3530 (+0.0955)``: the
    gain over the control when there is one, else over the teacher."""
    ap = {name: metrics[name]["AP"] for name in models(metrics)}
    _, gain = next(iter(gains(metrics).items()))
    return (
        "AP "
        + ", ".join(f"{k} {v:.4f}" for k, v in ap.items())
        + f" ({gain['AP']:+.4f})"
    )
