r"""All four steps of data distillation and the evaluation, as one Ray job.

    ray job submit --working-dir . -- \
        python jobs/distill.py --config configs/demo.yaml \
        model.backbone_weights=/path/to/mobilenet_v2-b0353104.pth

Inside a job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting
Ray. ``--smoke-test`` runs the whole method in about two minutes on tiny demo data it
writes itself (no config needed). One step at a time: ``jobs/teacher.py``,
``pseudo_label.py``, ``threshold.py``, ``student.py``, ``evaluate.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from raydd.evaluate import format_table
from raydd.jobs import ap_line, build_config, parse_args, setup_logging
from raydd.pipeline import SUMMARY_FILE, run_distillation
from raydd.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    # [1] Parse
    args = parse_args(__doc__, argv)
    setup_logging()
    # [2] Build the config (validated before any work starts)
    config = build_config(args)
    # [3] Connect to the cluster (RAY_ADDRESS) or start Ray here
    init_ray()
    # [4] Run every step (each logs "[step] done in X s")
    tic = time.perf_counter()
    summary = run_distillation(config)
    # [5] Report
    print(format_table(summary))
    print(json.dumps(summary, indent=2))
    print(
        f"distill done in {time.perf_counter() - tic:.1f} s: {ap_line(summary)}; "
        f"{Path(config.output_dir) / SUMMARY_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
