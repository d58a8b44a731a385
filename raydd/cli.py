"""``raydd`` command line: one subcommand per step, and ``run`` for all of them.

Every step reads the same CONFIG.yaml (plus ``key.sub=value`` overrides) and keeps its
outputs under ``output_dir`` (and ``storage_uri``), where the next step finds them.
A command that cannot run (bad config, missing input) says so before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raydd.config import Config, ConfigError, load_config
from raydd.layout import (
    CANDIDATES_DIR,
    EXPORT_FILE,
    REPORT_FILE,
    STEPS,
    SUMMARY_FILE,
    THRESHOLD_FILE,
    Run,
    writer_of,
)
from raydd.steps import MissingInput, check, format_table, run_all, run_step

# The subcommand of each step of raydd.layout.STEPS (whose scripts are jobs/<step>.py)
COMMANDS = {
    "teacher": "train-teacher",
    "pseudo_label": "pseudo-label",
    "threshold": "tune-threshold",
    "student": "train-student",
    "evaluate": "evaluate",
}


def _with_config(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    handler: Callable[[Config, argparse.Namespace], Any],
    steps: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """A subcommand taking CONFIG and overrides; ``steps``: what it runs (their
    inputs are checked, and Ray started, before the handler)."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config values, e.g. teacher.iterations=100",
    )
    parser.set_defaults(handler=handler, needs_config=True, steps=steps)
    return parser


def _demo_data(args: argparse.Namespace) -> None:
    from raydd.data.demo import DemoSizes, MissingDemoExtra, write_demo_dataset

    sizes = DemoSizes(
        labeled=args.labeled,
        unlabeled=args.unlabeled,
        test=args.test,
        validation=args.validation,
    )
    try:
        out = write_demo_dataset(args.dir, seed=args.seed, sizes=sizes)
    except MissingDemoExtra as e:
        raise ConfigError(str(e)) from e
    print(
        f"demo dataset written to {out} "
        f"({sizes.labeled} labeled, {sizes.validation} validation, "
        f"{sizes.unlabeled} unlabeled, {sizes.test} test)"
    )


def _step(step: str) -> Callable[[Config, argparse.Namespace], None]:
    """The handler of a step subcommand: what ``jobs/<step>.py`` runs
    (:func:`raydd.steps.run_step`), printing its summary."""

    def handler(config: Config, args: argparse.Namespace) -> None:
        print(run_step(config, step))

    return handler


def _export(config: Config, args: argparse.Namespace) -> None:
    from raydd.data.coco import Categories, keypoint_names, load_coco
    from raydd.export import export_coco
    from raydd.pseudo_label import read_candidates
    from raydd.threshold import load_threshold, thresholds_by_label

    out, run = Path(config.output_dir), Run.of(config)
    for name in (CANDIDATES_DIR, THRESHOLD_FILE):
        if not run.fetch(name):
            raise MissingInput(run.local(name), writer_of(name))
    candidates = read_candidates(out / CANDIDATES_DIR)
    used = thresholds_by_label(load_threshold(out), config.threshold.per_class)
    labeled = load_coco(config.data.labeled.annotations)
    dataset = export_coco(
        candidates,
        used,
        Categories.from_coco(labeled),
        out / EXPORT_FILE,
        keypoint_names(labeled),
    )
    print(
        f"{len(dataset['annotations'])} pseudo-labels on {len(dataset['images'])} "
        f"images -> {out / EXPORT_FILE}"
    )


def _run(config: Config, args: argparse.Namespace) -> None:
    summary = run_all(config)
    print(format_table(summary))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("threshold", "instances_per_image", "images", "seconds")
            },
            indent=2,
        )
    )
    out = Path(config.output_dir)
    print(f"summary: {out / SUMMARY_FILE}\nreport: {out / REPORT_FILE}")


def _report(args: argparse.Namespace) -> None:
    from raydd.report import write_report

    print(f"report: {write_report(args.output_dir)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydd", description="Data distillation for torchvision detectors on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo-data",
        help="write the embedded demo dataset",
        description="Write labeled/unlabeled/test splits of real digits "
        "on real textures (COCO JSON + PNG).",
    )
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--labeled", type=int, default=100)
    demo.add_argument("--unlabeled", type=int, default=2000)
    demo.add_argument("--test", type=int, default=300)
    demo.add_argument("--validation", type=int, default=100)
    demo.set_defaults(handler=_demo_data, needs_config=False)
    _with_config(
        sub,
        "train-teacher",
        "step 1: train the teacher on the labeled set",
        _step("teacher"),
        ("teacher",),
    )
    _with_config(
        sub,
        "pseudo-label",
        "step 2: run the teacher with every view on the "
        "unlabeled set and fuse (Ray Data)",
        _step("pseudo_label"),
        ("pseudo_label",),
    )
    _with_config(
        sub,
        "tune-threshold",
        "step 3: choose the score threshold (Ray Tune)",
        _step("threshold"),
        ("threshold",),
    )
    _with_config(
        sub,
        "train-student",
        "step 4: train the student on labeled + pseudo-labeled data",
        _step("student"),
        ("student",),
    )
    _with_config(
        sub,
        "export",
        "write the pseudo-labels (after the threshold) as a COCO instances JSON",
        _export,
    )
    _with_config(
        sub,
        "evaluate",
        "COCO AP of teacher, teacher with views and student",
        _step("evaluate"),
        ("evaluate",),
    )
    _with_config(
        sub, "run", "all four steps and evaluation; writes summary.json", _run, STEPS
    )
    report = sub.add_parser(
        "report",
        help="write OUTPUT_DIR/report.html",
        description="Write OUTPUT_DIR/report.html, one self-contained page: AP "
        "table, time per step, threshold, instances per class, pseudo-labeled and "
        "student galleries.",
    )
    report.add_argument("output_dir", help="the output_dir of a run")
    report.set_defaults(handler=_report, needs_config=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if not args.needs_config:
            args.handler(args)
            return 0
        config = load_config(args.config, args.overrides, names=False)
        if args.steps:  # fails fast on a missing input, before Ray starts
            from raydd.runtime import init_ray, require_storage_on_cluster

            check(config, args.steps)
            init_ray()
            require_storage_on_cluster(config)
        args.handler(config, args)
    except MissingInput as e:
        command = f"raydd {COMMANDS[e.step]}"
        print(
            f"raydd: error: {e.path} does not exist: run `{command}` first",
            file=sys.stderr,
        )
        return 2
    except ConfigError as e:
        print(f"raydd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
