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
from raydd.config import ConfigError, from_dict, load_config, resolve_paths, validate
from raydd.data.demo import DemoSizes, write_demo_dataset
from raydd.models import offline_mobilenet_v2_weights
from raydd.pipeline import run_distillation
from raydd.runtime import init_ray


def smoke_config(workdir: Path, output_dir: str | None):
    """A tiny but complete run on freshly written demo data."""
    data = write_demo_dataset(
        workdir / "data", seed=0, sizes=DemoSizes(labeled=16, unlabeled=24, test=12)
    )
    tiny_train = {
        "iterations": 6,
        "batch_size": 2,
        "checkpoint_every": 3,
        "warmup_iterations": 2,
        "hflip_prob": 0.0,
    }
    raw = {
        "data": {
            "labeled": {
                "annotations": str(data / "labeled.json"),
                "images": str(data / "labeled"),
            },
            "unlabeled": {"images": str(data / "unlabeled")},
            "test": {
                "annotations": str(data / "test.json"),
                "images": str(data / "test"),
            },
        },
        "output_dir": output_dir or str(workdir / "output"),
        "model": {
            "backbone_weights": offline_mobilenet_v2_weights(),
            "min_size": [128],
            "max_size": 128,
            "kwargs": {"anchor_sizes": [[16], [32], [64], [128]]},
        },
        "teacher": tiny_train,
        "views": [{}, {"scale": 160}],
        "threshold": {"num_samples": 6},
        "student": {**tiny_train, "batch_size": 5},
    }
    config = resolve_paths(from_dict(raw))
    validate(config)
    return config


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
    workdir = Path(tempfile.mkdtemp(prefix="raydd-smoke-"))
    try:
        config = (
            smoke_config(workdir, args.output_dir)
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
