r"""What the Ray job scripts in ``jobs/`` share: arguments, config, smoke data.

Every script is parse -> build config -> check -> connect -> run -> report; the parts
they have in common live here so the scripts stay thin and the tests reach all the
logic. The steps themselves run through :func:`raydd.steps.run_step`.

    ray job submit --working-dir . -- python jobs/teacher.py --config my.yaml \
        teacher.num_workers=4 teacher.use_gpu=true

A step reads the outputs of the steps before it from ``output_dir``; when they are
missing there but ``storage_uri`` holds them (a new head node), they are fetched first.
With ``--smoke-test`` a step first runs the earlier steps whose outputs are missing,
on tiny demo data, so it succeeds on its own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path

from raydd import storage
from raydd.config import Config, ConfigError, load_config, parse_config
from raydd.layout import SMOKE_DATA
from raydd.runtime import setup_logging


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

    With ``storage_uri`` among the overrides the data and backbone weights are
    copied to ``STORAGE_URI/smoke-data`` and read from there, so the smoke test
    runs on a cluster whose nodes share no disk.
    """
    from raydd.data.demo import DemoSizes, write_demo_dataset
    from raydd.data.demo import smoke_config as demo_smoke
    from raydd.models import offline_mobilenet_v2_weights

    workdir = Path(tempfile.mkdtemp(prefix="raydd-smoke-"))
    sizes = DemoSizes(labeled=8, unlabeled=12, test=6, validation=6)
    data = str(write_demo_dataset(workdir / "data", seed=0, sizes=sizes))
    weights = offline_mobilenet_v2_weights()
    output = output_dir or str(workdir / "output")
    config = parse_config(demo_smoke(data, output, weights), list(overrides), False)
    if config.storage_uri is None:
        return config
    shared = storage.join(config.storage_uri, SMOKE_DATA)
    for local in (data, weights):
        storage.copy(local, storage.join(shared, Path(local).name))
    data, weights = (storage.join(shared, Path(p).name) for p in (data, weights))
    return parse_config(demo_smoke(data, output, weights), list(overrides), False)


def build_config(args: argparse.Namespace, steps: Sequence[str]) -> Config:
    """The validated config of a job that runs ``steps``, its inputs checked (see
    :func:`raydd.steps.check`); exits with status 2 and one message if bad."""
    from raydd.steps import check

    try:
        if args.smoke_test:
            return smoke_config(args.output_dir, args.overrides)
        extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
        config = load_config(args.config, [*args.overrides, *extra], names=False)
        check(config, steps)
        return config
    except ConfigError as e:
        _exit(args, e)


def connect(args: argparse.Namespace, config: Config) -> None:
    """Joins ``RAY_ADDRESS`` or starts Ray here; exits with status 2 when the
    cluster has nodes that cannot see this one's disk and no ``storage_uri``."""
    from raydd.runtime import init_ray, require_storage_on_cluster

    init_ray()
    try:
        require_storage_on_cluster(config)
    except ConfigError as e:
        _exit(args, e)


def _exit(args: argparse.Namespace, error: ConfigError) -> typing.NoReturn:
    print(f"{args.prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2) from error


def run_job(args: argparse.Namespace, config: Config, step: str) -> list[str]:
    """What ``jobs/<step>.py`` runs: the step, after the earlier ones that are missing
    when ``--smoke-test``; returns one summary line per step run.

    Exits with status 2 and one message when an earlier step's output is missing.
    """
    from raydd.steps import run_missing, run_step

    try:
        before = run_missing(config, step) if args.smoke_test else []
        return [*before, run_step(config, step)]
    except ConfigError as e:
        _exit(args, e)


def step_main(doc: str | None, step: str, argv: Sequence[str] | None = None) -> int:
    """The whole of ``jobs/<step>.py`` (``doc`` is its ``--help`` text)."""
    # [1] Parse
    args = parse_args(doc, argv)
    setup_logging()
    # [2] Build the config (validated, inputs checked, before any work starts)
    config = build_config(args, [step])
    # [3] Connect to the cluster (RAY_ADDRESS) or start Ray here
    connect(args, config)
    # [4] Run the step (with --smoke-test, the missing earlier ones first)
    lines = run_job(args, config, step)
    # [5] Report: one line per step run
    print("\n".join(lines))
    return 0
