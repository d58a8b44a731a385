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

from raydd.jobs import build_config, connect, parse_args, setup_logging
from raydd.layout import STEPS, SUMMARY_FILE
from raydd.steps import ap_line, format_table, run_all


def main(argv: list[str] | None = None) -> int:
    # [1] Parse
    args = parse_args(__doc__, argv)
    setup_logging()
    # [2] Build the config (validated before any work starts)
    config = build_config(args, STEPS)
    # [3] Connect to the cluster (RAY_ADDRESS) or start Ray here
    connect(args, config)
    # [4] Run every step (each logs "[step] done in X s")
    tic = time.perf_counter()
    summary = run_all(config)
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
