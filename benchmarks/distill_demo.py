"""Student vs teacher on the embedded demo, with per-step times.

Runs the whole method (`raydd run configs/demo.yaml`) on freshly written demo data and
writes ``benchmarks/results/distill_demo.json`` (the summary plus machine and date),
then prints the AP table. ``--smoke`` runs a tiny version in about two minutes.

    python benchmarks/distill_demo.py [--smoke] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

from raydd.config import load_config
from raydd.data.demo import DemoSizes, data_overrides, write_demo_dataset
from raydd.models import offline_mobilenet_v2_weights
from raydd.runtime import init_ray
from raydd.steps import format_table, run_all, schedules_note

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [
    "teacher.iterations=4",
    "student.iterations=4",
    "teacher.checkpoint_every=2",
    "student.checkpoint_every=2",
    "threshold.num_samples=6",
    "teacher.eval_every=0",  # the in-training evaluation has its own test
    "student.eval_every=0",
]


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, minutes")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks/results/distill_demo.json")
    )
    args = parser.parse_args()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="raydd-bench-"))
    sizes = (
        DemoSizes(labeled=8, unlabeled=10, test=6, validation=6)
        if args.smoke
        else DemoSizes()
    )
    data = write_demo_dataset(work / "data", seed=0, sizes=sizes)
    overrides = [
        *data_overrides(data),
        f"output_dir={work / 'output'}",
        f"model.backbone_weights={offline_mobilenet_v2_weights()}",
    ]
    config = load_config(
        ROOT / "configs/demo.yaml", overrides + (SMOKE if args.smoke else [])
    )
    init_ray()
    summary = run_all(config)
    record = {
        "benchmark": "distill_demo",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": "python benchmarks/distill_demo.py"
        + (" --smoke" if args.smoke else ""),
        **summary,
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    print(format_table(summary))
    print(schedules_note(summary))
    print(f"total {sum(summary['seconds'].values()):.0f} s; results: {results}")


if __name__ == "__main__":
    main()
