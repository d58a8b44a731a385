r"""What the Ray job scripts in ``jobs/`` share: arguments, config, smoke data, steps.

Every script is parse -> build config -> connect -> run -> report; the parts they
have in common live here so the scripts stay thin and the tests reach all the logic.

    ray job submit --working-dir . -- python jobs/teacher.py --config my.yaml \
        teacher.num_workers=4 teacher.use_gpu=true

A step reads the outputs of the steps before it from ``output_dir``; when they are
missing there but ``storage_uri`` holds them (a new head node), they are fetched first
(:func:`raydd.storage.download`). With ``--smoke-test`` a step first runs the earlier
steps whose outputs are missing, on tiny demo data, so it succeeds on its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raydd.config import Config, ConfigError, load_config, parse_config

logger = logging.getLogger(__name__)

STEPS = ("teacher", "pseudo_label", "threshold", "student", "evaluate")


def parse_args(
    description: str | None, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``--config CONFIG`` or ``--smoke-test``, ``--output-dir``, ``KEY=VALUE``s."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="run configuration (YAML)")
    source.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny run on demo data written to a temporary directory",
    )
    parser.add_argument(
        "--output-dir", help="where outputs go (same as output_dir=DIR)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config values, e.g. teacher.iterations=100",
    )
    args = parser.parse_args(argv)
    args.prog = parser.prog
    return args


def smoke_config(output_dir: str | None, overrides: Sequence[str] = ()) -> Config:
    """A tiny but complete run on demo data written to a temporary directory.

    The data lives on this node's disk: run the smoke test where the job's driver
    runs (a one-node cluster, or ``storage_uri`` plus shared data on larger ones).
    """
    from raydd.data.demo import DemoSizes, write_demo_dataset
    from raydd.data.demo import smoke_config as demo_smoke
    from raydd.models import offline_mobilenet_v2_weights

    workdir = Path(tempfile.mkdtemp(prefix="raydd-smoke-"))
    sizes = DemoSizes(labeled=16, unlabeled=24, test=12, validation=8)
    data = write_demo_dataset(workdir / "data", seed=0, sizes=sizes)
    output = output_dir or str(workdir / "output")
    raw = demo_smoke(data, output, offline_mobilenet_v2_weights())
    return parse_config(raw, list(overrides))


def build_config(args: argparse.Namespace) -> Config:
    """The validated config of a job; exits with status 2 and one message if bad."""
    try:
        if args.smoke_test:
            return smoke_config(args.output_dir, args.overrides)
        extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
        return load_config(args.config, [*args.overrides, *extra])
    except ConfigError as e:
        _exit(args, e)


def _exit(args: argparse.Namespace, error: ConfigError) -> typing.NoReturn:
    print(f"{args.prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2) from error


def setup_logging() -> None:
    """Shows raydd's INFO lines (one per finished step) in the job's log."""
    log = logging.getLogger("raydd")
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)


class MissingInput(ConfigError):
    """An earlier step's output is missing: ``path``, which ``step`` writes."""

    def __init__(self, path: Path, step: str) -> None:
        super().__init__(f"{path} does not exist: run jobs/{step}.py first")
        self.path, self.step = path, step


def require_input(config: Config, name: str, step: str) -> Path:
    """``OUTPUT_DIR/name`` written by ``step``, fetched from storage if only there.

    Raises:
        MissingInput: neither ``output_dir`` nor ``storage_uri`` holds it.
    """
    from raydd.storage import download

    path = Path(config.output_dir) / name
    if not download(config, name):
        raise MissingInput(path, step)
    return path


def _teacher(config: Config) -> str:
    from raydd.teacher import train_teacher

    return f"checkpoint {train_teacher(config)}"


def _pseudo_label(config: Config) -> str:
    from raydd.pseudo_label import pseudo_label
    from raydd.teacher import TEACHER_DIR

    result = pseudo_label(config, str(require_input(config, TEACHER_DIR, "teacher")))
    return f"{result.images} images ({result.errors} unreadable) -> {result.candidates}"


def _candidates(config: Config) -> Any:
    from raydd.pseudo_label import CANDIDATES_DIR, read_candidates

    return read_candidates(require_input(config, CANDIDATES_DIR, "pseudo_label"))


def _threshold(config: Config) -> str:
    from raydd.pipeline import choose_threshold
    from raydd.pseudo_label import VALIDATION_CANDIDATES_DIR

    candidates = _candidates(config)
    if config.data.validation is not None:
        require_input(config, VALIDATION_CANDIDATES_DIR, "pseudo_label")
    result = choose_threshold(config, candidates)
    return (
        f"threshold {result.threshold:.4f}: {result.pseudo_instances_per_image:.3f} "
        f"instances per unlabeled image vs {result.labeled_instances_per_image:.3f} "
        f"labeled ({result.trials} trials)"
    )


def _student(config: Config) -> str:
    from raydd.student import train_student
    from raydd.teacher import TEACHER_DIR
    from raydd.threshold import THRESHOLD_FILE, load_threshold, thresholds_by_label

    candidates = _candidates(config)
    require_input(config, THRESHOLD_FILE, "threshold")
    teacher = require_input(config, TEACHER_DIR, "teacher")
    result = load_threshold(config.output_dir)
    used = thresholds_by_label(result, config.threshold.per_class)
    return f"checkpoint {train_student(config, candidates, used, teacher)}"


def _evaluate(config: Config) -> str:
    from raydd.evaluate import format_table
    from raydd.pipeline import evaluate_all
    from raydd.student import STUDENT_DIR
    from raydd.teacher import TEACHER_DIR

    teacher = require_input(config, TEACHER_DIR, "teacher")
    metrics = evaluate_all(
        config, teacher, require_input(config, STUDENT_DIR, "student")
    )
    return f"{ap_line(metrics)}\n{format_table(metrics)}"


RUNNERS: dict[str, Callable[[Config], str]] = {
    "teacher": _teacher,
    "pseudo_label": _pseudo_label,
    "threshold": _threshold,
    "student": _student,
    "evaluate": _evaluate,
}


def ap_line(metrics: dict[str, Any]) -> str:
    """``AP teacher 0.2575, teacher_views 0.3183, student 0.3530 (+0.0955)``."""
    ap = {name: metrics[name]["AP"] for name in ("teacher", "teacher_views", "student")}
    gain = ap["student"] - ap["teacher"]
    return "AP " + ", ".join(f"{k} {v:.4f}" for k, v in ap.items()) + f" ({gain:+.4f})"


def run_step(config: Config, step: str) -> str:
    """Runs one step, uploads its outputs to ``storage_uri``; returns a one-line
    summary (``student done in 41.2 s: checkpoint out/student``).

    Raises:
        ConfigError: an earlier step's output is missing.
    """
    from raydd.pipeline import save_step

    tic = time.perf_counter()
    detail = RUNNERS[step](config)
    save_step(config, step)
    seconds = time.perf_counter() - tic
    logger.info("[%s] done in %.1f s", step, seconds)
    return f"{step} done in {seconds:.1f} s: {detail}"


def run_missing_before(config: Config, step: str) -> list[str]:
    """Runs the steps before ``step`` whose outputs are not in ``output_dir`` yet
    (what a ``--smoke-test`` of a single step needs); returns their summaries."""
    from raydd.pipeline import STEP_OUTPUTS

    done = []
    for earlier in STEPS[: STEPS.index(step)]:
        outputs = STEP_OUTPUTS[earlier]
        if outputs and not (Path(config.output_dir) / outputs[0]).exists():
            done.append(run_step(config, earlier))
    return done


def run_job(args: argparse.Namespace, config: Config, step: str) -> list[str]:
    """What ``jobs/<step>.py`` runs: the step, after the earlier ones that are missing
    when ``--smoke-test``; returns one summary line per step run.

    Exits with status 2 and one message when an earlier step's output is missing.
    """
    try:
        before = run_missing_before(config, step) if args.smoke_test else []
        return [*before, run_step(config, step)]
    except ConfigError as e:
        _exit(args, e)


def step_main(doc: str | None, step: str, argv: Sequence[str] | None = None) -> int:
    """The whole of ``jobs/<step>.py`` (``doc`` is its ``--help`` text)."""
    from raydd.runtime import init_ray

    # [1] Parse
    args = parse_args(doc, argv)
    setup_logging()
    # [2] Build the config (validated before any work starts)
    config = build_config(args)
    # [3] Connect to the cluster (RAY_ADDRESS) or start Ray here
    init_ray()
    # [4] Run the step (with --smoke-test, the missing earlier ones first)
    lines = run_job(args, config, step)
    # [5] Report: one line per step run
    print("\n".join(lines))
    return 0
