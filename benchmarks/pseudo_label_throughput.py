"""Pseudo-labeling throughput: the Ray Data pipeline vs a bare torch loop.

Both run the same teacher (Faster R-CNN MobileNetV2-FPN, ImageNet backbone, untrained
heads so every view yields the full 100 boxes to fuse) with the same views and
fusion, on the same machine, one after the other:

* bare loop: one process, images decoded and converted beforehand (not timed),
  ``Predictor.predict`` over batches: model forward per view, boxes mapped back, fused.
* pipeline: :func:`raydd.pseudo_label.label_sources` from the files on disk: Ray Data
  reads, decodes, runs the Predictor actor pool, writes the Parquet shards; timed end
  to end (Ray already started; actor start-up and model loading included).

The pipeline runs on N and 10·N images; the peak memory of the whole Ray session
(driver, raylet, workers; proportional set size, so shared object-store pages are
counted once) is sampled for each. Targets: pipeline >= 0.8x the bare loop's images/s
on CPU (>= 0.9x on a GPU), peak memory at 10·N < 1.1x that at N. Writes
``benchmarks/results/pseudo_label_throughput[_<device>].json``.

    python benchmarks/pseudo_label_throughput.py [--smoke] [--images N] [--canvas PX]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from raydd.checkpoint import save_detector
from raydd.config import parse_config
from raydd.data.coco import Categories
from raydd.data.demo import DemoSizes, smoke_config, write_demo_dataset
from raydd.data.images import load_rgb
from raydd.inference import Predictor
from raydd.models import build_model, offline_mobilenet_v2_weights
from raydd.pseudo_label import label_sources
from raydd.sources import inline_source

ROOT = Path(__file__).resolve().parents[1]
VIEWS = [{}, {"hflip": True}]


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += parents.get(p, [])
    return found


def _pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples the summed PSS of this process tree every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _pss_bytes(_children(os.getpid())))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _images(folder: Path, count: int, canvas: int) -> list[str]:
    """``count`` real demo canvases (copies of a pool of 100), sorted paths."""
    pool = write_demo_dataset(
        folder / "pool",
        sizes=DemoSizes(labeled=1, unlabeled=100, test=1, validation=1, canvas=canvas),
    )
    sources = sorted((pool / "unlabeled").glob("*.png"))
    out = folder / f"images{count}"
    out.mkdir()
    for i in range(count):
        shutil.copy(sources[i % len(sources)], out / f"{i:06d}.png")
    return sorted(str(p) for p in out.iterdir())


def _bare_loop(checkpoint: str, config, paths: list[str], threads: int) -> float:
    images = [load_rgb(p) for p in paths]  # preloaded: decoding is not timed
    predictor = Predictor(
        checkpoint, config.views, config.ensemble, num_threads=threads
    )
    size = config.inference.batch_size
    predictor.predict(images[:size])  # warm-up
    tic = time.perf_counter()
    for i in range(0, len(images), size):
        predictor.predict(images[i : i + size])
    return len(images) / (time.perf_counter() - tic)


def _pipeline(checkpoint: str, config, paths: list[str], out: Path) -> dict:
    """End-to-end and steady-state images/s of ``label_sources``, and peak memory.

    Steady state: the images after the first part, over the time from the first
    part written to the end (start-up, model loading and the first part excluded;
    not the span between part writes, which is ~0 when parts finish together).
    """
    with PeakMemory() as memory:
        tic = time.perf_counter()
        result = label_sources(
            [inline_source("benchmark", paths)], checkpoint, config, out
        )
        seconds = time.perf_counter() - tic
    assert result.images == len(paths) and result.errors.empty
    after_first = len(paths) - min(config.data.unlabeled.shard_size, len(paths))
    span = seconds - (result.first_part_seconds or seconds)
    return {
        "images": len(paths),
        "seconds": round(seconds, 1),
        "images_per_s": round(len(paths) / seconds, 2),
        "first_part_s": round(result.first_part_seconds or 0, 1),
        "steady_images_per_s": round(after_first / span, 2) if span > 0 else None,
        "peak_pss_mb": round(memory.peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few images only")
    parser.add_argument("--images", type=int, default=200, help="N")
    parser.add_argument("--canvas", type=int, default=256, help="image side, pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    n = 6 if args.smoke else args.images
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    results = Path(
        args.results
        or ROOT
        / "benchmarks/results"
        / ("pseudo_label_throughput" + ("_gpu" if gpu else "") + ".json")
    )

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    threads = int(ray.cluster_resources().get("CPU", 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = smoke_config(work, work / "out", offline_mobilenet_v2_weights())
        raw["data"]["unlabeled"] = {"images": str(work), "shard_size": 50}
        raw["views"] = VIEWS
        raw["inference"] = {"batch_size": args.batch_size}
        raw["model"]["max_size"] = args.canvas
        write_demo_dataset(work, sizes=DemoSizes(labeled=1, unlabeled=1, test=1))
        config = parse_config(raw)
        torch.manual_seed(0)
        model = build_model(config.model, num_classes=11)
        checkpoint = str(work / "teacher")
        save_detector(
            checkpoint,
            model,
            config.model,
            Categories(tuple(range(1, 11)), tuple(map(str, range(10)))),
        )
        small = _images(work, n, args.canvas)
        large = _images(work, 10 * n, args.canvas)

        bare = _bare_loop(checkpoint, config, small, threads)
        runs = {
            "N": _pipeline(checkpoint, config, small, work / "out_n"),
            "10N": _pipeline(checkpoint, config, large, work / "out_10n"),
        }
    ratio = runs["10N"]["images_per_s"] / bare
    floor = 0.9 if gpu else 0.8  # the targets (module docstring)
    steady = runs["10N"]["steady_images_per_s"]
    memory_ratio = runs["10N"]["peak_pss_mb"] / max(runs["N"]["peak_pss_mb"], 1)
    record = {
        "benchmark": "pseudo_label_throughput",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {device}",
        "command": "python benchmarks/pseudo_label_throughput.py"
        + (" --smoke" if args.smoke else f" --images {n}")
        + f" --canvas {args.canvas} --batch-size {args.batch_size}",
        "device": device,
        "views": len(VIEWS),
        "canvas": args.canvas,
        "batch_size": args.batch_size,
        "bare_images_per_s": round(bare, 2),
        "pipeline": runs,
        "ratio": round(ratio, 3),
        "steady_ratio": round(steady / bare, 3) if steady else None,
        "memory_ratio": round(memory_ratio, 3),
        "targets": {
            f"steady ratio >= {floor}": bool(steady and steady / bare >= floor),
            "memory ratio < 1.1": memory_ratio < 1.1,
        },
        "torch": torch.__version__,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    print(
        f"{'run':<14}{'images':>8}{'seconds':>10}{'images/s':>10}{'steady':>10}"
        f"{'peak MB':>10}"
    )
    print(f"{'bare loop':<14}{n:>8}{'':>10}{bare:>10.2f}{'':>10}{'':>10}")
    for name, r in runs.items():
        print(
            f"{'pipeline ' + name:<14}{r['images']:>8}{r['seconds']:>10.1f}"
            f"{r['images_per_s']:>10.2f}{r['steady_images_per_s'] or 0:>10.2f}"
            f"{r['peak_pss_mb']:>10}"
        )
    print(
        f"pipeline(10N) / bare loop: {ratio:.3f}; peak memory 10N / N: "
        f"{memory_ratio:.3f}"
    )
    for target, met in record["targets"].items():
        print(f"target {target}: {'met' if met else 'MISSED'}")
    print(f"results: {results}")


if __name__ == "__main__":
    main()
