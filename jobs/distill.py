"""All four steps of data distillation as a Ray job.

    ray job submit --working-dir . -- \
        python jobs/distill.py --config configs/demo.yaml \
        model.backbone_weights=/path/to/mobilenet_v2-b0353104.pth

Inside a job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting
Ray. ``--smoke-test`` runs the whole method in about two minutes on tiny demo data it
writes itself (no config needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from raydd.cli import format_table
from raydd.config import Config, ConfigError, load_config, parse_config
from raydd.data.demo import DemoSizes, write_demo_dataset
from raydd.data.demo import smoke_config as demo_smoke
from raydd.models import offline_mobilenet_v2_weights
from raydd.pipeline import run_distillation
from raydd.runtime import init_ray


def smoke_config(output_dir: str | None, overrides: list[str]) -> Config:
    """A tiny but complete run on demo data written to a temporary directory."""
    workdir = Path(tempfile.mkdtemp(prefix="raydd-smoke-"))
    sizes = DemoSizes(labeled=16, unlabeled=24, test=12, validation=8)
    data = write_demo_dataset(workdir / "data", seed=0, sizes=sizes)
    output = output_dir or workdir / "output"
    raw = demo_smoke(data, output, offline_mobilenet_v2_weights())
    return parse_config(raw, overrides)


def main() -> int:
    # [1] Parse
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="run configuration (YAML)")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny run on demo data written to a temporary directory",
    )
    parser.add_argument("--output-dir", help="with --smoke-test: where outputs go")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if not args.smoke_test and not args.config:
        parser.error("--config is required (or --smoke-test)")
    # [2] Build the config (validated before any work starts)
    try:
        config = (
            smoke_config(args.output_dir, args.overrides)
            if args.smoke_test
            else load_config(args.config, args.overrides)
        )
    except ConfigError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    # [3] Connect to the cluster (RAY_ADDRESS) or start Ray here, and run
    init_ray()
    summary = run_distillation(config)
    # [4] Report
    print(format_table(summary))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
