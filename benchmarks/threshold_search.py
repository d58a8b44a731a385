"""Threshold search over 1,000,000 cached candidate detections (target: < 60 s).

Synthetic candidates: 100,000 images x 10 per image, 10 classes, scores from a Beta
mixture (confident true positives, diffident background), written as 8 Parquet shards
in step 2's layout, plus a pseudo-labeled validation split of 5,000 images for
precision/recall. Times the whole step: one Ray Data pass over the shards into score
histograms, then the Ray Tune search on them (global + per-class + precision/recall,
41-point grid), and writes ``benchmarks/results/threshold_search.json``.

    python benchmarks/threshold_search.py [--smoke] [--images N] [--search grid|optuna]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from raydd import schema
from raydd.config import ThresholdConfig
from raydd.threshold import ScoreTable, score_histograms, search_threshold

ROOT = Path(__file__).resolve().parents[1]


def synthetic_candidates(
    images: int, per_image: int, classes: int, rng: np.random.Generator
) -> pa.Table:
    n = images * per_image
    true = rng.random(n) < 0.35
    scores = np.where(true, rng.beta(8, 2, n), rng.beta(1.5, 6, n)).astype(np.float32)
    labels = rng.integers(1, classes + 1, n)
    offsets = pa.array(np.arange(0, n + 1, per_image, dtype=np.int32))
    return pa.table(
        {
            schema.PATH: [f"img{i}.jpg" for i in range(images)],
            schema.ERROR: [""] * images,
            schema.SCORES: pa.ListArray.from_arrays(offsets, scores),
            schema.LABELS: pa.ListArray.from_arrays(offsets, labels),
        }
    )


def write_shards(table: pa.Table, directory: Path, shards: int = 8) -> None:
    step = -(-len(table) // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * step, step), directory / f"part-{k}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="10,000 candidates")
    parser.add_argument("--images", type=int, help="10 candidates each (100,000)")
    parser.add_argument("--search", default="grid", choices=["grid", "optuna"])
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks/results/threshold_search.json")
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = args.images or (1_000 if args.smoke else 100_000)
    candidates = synthetic_candidates(images, 10, 10, rng)
    val_scores = rng.random(50_000).astype(np.float32)
    validation = ScoreTable(
        val_scores,
        rng.integers(1, 11, 50_000),
        5_000,
        is_tp=rng.random(50_000) < val_scores,
        num_gt=20_000,
    )
    targets = np.array([0.0] + [0.35] * 10)  # 3.5 instances per labeled image

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(candidates, Path(tmp))
        tic = time.perf_counter()
        histograms = score_histograms(ray.data.read_parquet(tmp), len(targets))
        pass_seconds = time.perf_counter() - tic
        result, _ = search_threshold(
            histograms,
            targets,
            ThresholdConfig(search=args.search, num_samples=41),
            Path(tmp) / "tune",
            validation,
        )
    seconds = time.perf_counter() - tic
    record = {
        "benchmark": "threshold_search",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/threshold_search.py"
        + (" --smoke" if args.smoke else "")
        + (f" --images {args.images}" if args.images else "")
        + f" --search {args.search}",
        "candidates": int(histograms.counts.sum()),
        "trials": result.trials,
        "seconds": round(seconds, 1),
        "histogram_seconds": round(pass_seconds, 1),
        "threshold": result.threshold,
        "per_class": result.per_class,
        "precision": result.precision,
        "recall": result.recall,
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    print(f"{'candidates':<12}{'trials':>8}{'seconds':>10}{'threshold':>11}")
    print(
        f"{record['candidates']:<12,}{result.trials:>8}{seconds:>10.1f}"
        f"{result.threshold:>11.3f}"
    )
    print(f"results: {results}")


if __name__ == "__main__":
    main()
