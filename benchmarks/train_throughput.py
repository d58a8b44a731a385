"""Training throughput: raydd's Ray Train loop vs plain single-process torch loops.

All three train the same student (the demo's Faster R-CNN MobileNetV2-FPN, ImageNet
backbone) with the same optimizer and schedule on the SAME minibatches -- 3 labeled +
2 "pseudo-labeled" demo canvases (the labeled and validation splits) per step, the
rows and augmentation draws a Ray Train worker's :class:`raydd.ingest.Shuffle` gives
-- with the same number of torch threads:

* Ray Train: :func:`raydd.train.fit` on one worker (``cpus_per_worker=1``,
  ``torch_threads=2``, as ``configs/demo.yaml``); Ray Data decodes, resizes and
  streams the images alongside (the other CPU). Images/s from the wall clock of its
  TensorBoard events over the steps after the first report interval (reports,
  logging and data waits included); Ray Train's own per-interval metric too.
* plain loop + DataLoader: what a PyTorch user writes -- a ``torch.utils.data``
  DataLoader (1 worker process, ``prefetch_factor`` = the run's prefetch) decodes
  and augments the same rows with the same :class:`raydd.ingest.Augment`. Same data
  work as Ray Train: the like-for-like baseline.
* plain loop, preloaded: the same rows decoded and augmented beforehand (not timed):
  the step alone, a bound no data pipeline reaches.

The three run interleaved, ``--repeats`` times (the machine drifts by several
percent over minutes); each is timed after as many warm-up steps as Ray Train's
first report interval. Ratio = Ray Train / plain loop + DataLoader, mean of the
repeats' images/s. Targets (reported, not asserted): Ray Train >= 0.97x the plain
loop with the same data work; exposed data loading < 5% of step time. Ray starts
here as ``raydd run`` starts it, with its dashboard, whose processes take CPU from
the 2 the runs share; ``--no-dashboard`` measures without them. Writes
``benchmarks/results/train_throughput.json`` (``train_throughput_no_dashboard.json``;
``--smoke``: a temporary file unless ``--results`` says otherwise).

    python benchmarks/train_throughput.py [--smoke] [--iterations 200] \
        [--log-every 20] [--images 64] [--repeats 3] [--no-dashboard]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import ray
import torch
import yaml

from raydd.config import Config, parse_config
from raydd.data.coco import coco_records
from raydd.data.demo import DemoSizes, write_demo_dataset
from raydd.ingest import (
    DRAWS,
    INDEX,
    LABELED,
    PSEUDO,
    Augment,
    Shuffle,
    prepare,
    split_batch,
    to_device,
)
from raydd.models import offline_mobilenet_v2_weights
from raydd.teacher import augment_for, labeled_training_records
from raydd.train import TrainJob, _build, fit, read_scalars, sgd_schedule

ROOT = Path(__file__).resolve().parents[1]
SMOKE_MODEL = {"min_size": [128], "max_size": 128}


def _config(work: Path, data: Path, iterations: int, log_every: int, smoke: bool):
    """configs/demo.yaml's model and student, on the benchmark's data and schedule."""
    raw = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    split = {
        name: {"annotations": str(data / f"{name}.json"), "images": str(data / name)}
        for name in ("labeled", "validation", "test")
    }
    raw["data"] = {**split, "unlabeled": {"images": str(data / "unlabeled")}}
    raw["output_dir"] = str(work / "output")
    raw["model"]["backbone_weights"] = offline_mobilenet_v2_weights()
    raw["model"] |= SMOKE_MODEL if smoke else {}
    raw["student"] |= {
        "iterations": iterations,
        "log_every": log_every,
        "checkpoint_every": iterations,  # only the final one: reports, not saving
        "eval_every": 0,
        "warmup_iterations": min(raw["student"]["warmup_iterations"], iterations),
        "cpus_per_worker": 1,
        "torch_threads": 2,
        "num_workers": 1,
        "use_gpu": False,
    }
    return parse_config(raw)


def _ray_train(config: Config, job: TrainJob, datasets: dict, work: Path) -> dict:
    """Runs ``fit``; steady-state throughput from its TensorBoard events."""
    cfg = job.train
    tic = time.perf_counter()
    fit(job, datasets, "train_throughput", work / "storage", work / "export")
    seconds = time.perf_counter() - tic
    scalars = read_scalars(job.log_dir)
    # per report interval, as Ray Train reports them (the first is left out)
    intervals = [
        (step, images_per_s, wait)
        for (step, _, images_per_s), (_, _, wait) in zip(
            scalars["data/images_per_s"], scalars["data/data_wait_share"], strict=True
        )
        if step > cfg.log_every
    ]
    # wall clock between the ends of steps (reports and logging included)
    walls = {step: wall for step, wall, _ in scalars["data/wait_s"]}
    waits = {step: wait for step, _, wait in scalars["data/wait_s"]}
    first, last = cfg.log_every, cfg.iterations
    span = walls[last] - walls[first]
    steps = last - first
    return {
        "seconds_total": round(seconds, 1),
        "timed_steps": steps,
        # wall clock over the timed steps: reports, logging and data waits included
        "images_per_s": steps * cfg.batch_size / span,
        "data_wait_share": sum(waits[s] for s in range(first + 1, last + 1)) / span,
        # typical step (robust to the slow steps after each epoch starts)
        "median_step_s": statistics.median(
            walls[s] - walls[s - 1] for s in range(first + 1, last + 1)
        ),
        # Ray Train's own metric: the mean over the report intervals (an interval's
        # clock starts after the previous report, so reports are not in it)
        "interval_images_per_s": statistics.mean(v for _, v, _ in intervals),
        "intervals": [
            {"step": s, "images_per_s": round(v, 3), "data_wait_share": round(w, 4)}
            for s, v, w in intervals
        ],
    }


def _undecoded(dataset: ray.data.Dataset) -> list[dict]:
    """A prepared set's undecoded rows as a :class:`RowStream` holds them: ordered
    by ``index`` and numbered ``0..n-1``."""
    rows = sorted(dataset.take_all(), key=lambda row: row[INDEX])
    return [{**row, INDEX: i} for i, row in enumerate(rows)]


def _planned(rows: list[dict], shuffle: Shuffle) -> Iterator[dict]:
    """A worker's rows of one set, epoch after epoch, with their draws: the
    order :class:`RowStream` sends to Ray Data (rank 0 of 1 worker)."""
    for epoch in itertools.count():
        for j in shuffle.order(len(rows), epoch):
            yield {**rows[j], DRAWS: shuffle.draws(epoch, int(rows[j][INDEX]))}


class _Steps(torch.utils.data.IterableDataset):
    """Every step's rows (labeled first, as :func:`raydd.ingest.next_batch`),
    decoded and augmented by ``augment`` where the iteration runs."""

    def __init__(
        self, rows: dict[str, list[dict]], sizes: dict[str, int], augment, seed, steps
    ) -> None:
        self.rows, self.sizes, self.augment = rows, sizes, augment
        self.seed, self.steps = seed, steps

    def __iter__(self) -> Iterator[list[dict]]:
        planned = {
            name: _planned(self.rows[name], Shuffle(self.seed, name))
            for name in self.sizes
        }
        for _ in range(self.steps):
            yield [
                dict(self._augment(row), source=name)
                for name, k in self.sizes.items()
                for row in itertools.islice(planned[name], k)
            ]

    def _augment(self, row: dict) -> dict:
        return self.augment.row(row, np.random.default_rng(row[DRAWS].tolist()))


def _as_is(rows: list[dict]) -> list[dict]:
    return rows


def _plain_loop(job: TrainJob, batches: Iterable, warmup: int, steps: int) -> dict:
    """The training step in this process over ``batches`` (a step's rows each);
    images/s over the steps after ``warmup``, the wait for the batch included."""
    cfg = job.train
    torch.manual_seed(cfg.seed)
    model = _build(job)
    model.train()
    optimizer, scheduler = sgd_schedule(model, cfg)
    device = torch.device("cpu")
    seconds, waits = [], []
    batches = iter(batches)
    for step in range(warmup + steps):
        tic = time.perf_counter()
        rows = next(batches)
        wait = time.perf_counter() - tic
        images, targets = to_device(rows, device)
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()  # what any loop logs
        if step >= warmup:
            seconds.append(time.perf_counter() - tic)
            waits.append(wait)
    return {
        "timed_steps": steps,
        "images_per_s": steps * cfg.batch_size / sum(seconds),
        "median_step_s": statistics.median(seconds),
        "data_wait_share": sum(waits) / sum(seconds),
    }


def _job(config: Config, work: Path) -> tuple[TrainJob, dict, Augment]:
    """The student job (3 labeled + 2 pseudo per step), its two datasets and their
    augmentation."""
    categories, labeled, names = labeled_training_records(config)
    pseudo = coco_records(config.data.validation, categories)
    cfg = config.student
    job = TrainJob(
        model=config.model,
        train=cfg,
        categories=categories,
        labeled_share=cfg.labeled_share,
        log_dir=str(work / "tensorboard"),
    )
    augment = augment_for(config, cfg, names)
    datasets = {LABELED: prepare(labeled, augment), PSEUDO: prepare(pseudo, augment)}
    return job, datasets, augment


def _machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


VARIANTS = ("preloaded", "dataloader", "ray_train")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="6 steps, 8+8 images")
    parser.add_argument("--iterations", type=int, default=200, help="training steps")
    parser.add_argument("--log-every", type=int, default=20, help="report interval")
    parser.add_argument("--images", type=int, default=64, help="labeled = pseudo")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--no-dashboard",
        action="store_true",
        help="start Ray without its dashboard (whose processes share the 2 CPUs)",
    )
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    iterations, log_every, images, repeats = (
        (6, 2, 8, 1)
        if args.smoke
        else (args.iterations, args.log_every, args.images, args.repeats)
    )
    results = Path(
        args.results
        or (
            Path(tempfile.gettempdir()) / "train_throughput_smoke.json"
            if args.smoke
            else ROOT
            / "benchmarks/results"
            / f"train_throughput{'_no_dashboard' * args.no_dashboard}.json"
        )
    )

    # [1] Data and config: two labeled demo splits as the labeled and pseudo sets.
    started = not ray.is_initialized()
    if started:
        # as `raydd run` starts Ray here: the dashboard included unless told not to
        ray.init(num_cpus=2, include_dashboard=not args.no_dashboard)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = DemoSizes(labeled=images, validation=images, unlabeled=1, test=1)
        data = write_demo_dataset(work / "data", seed=0, sizes=sizes)
        config = _config(work, data, iterations, log_every, args.smoke)
        cfg = config.student
        job, datasets, augment = _job(config, work)
        threads = cfg.torch_threads
        # [2] The Ray Train worker's steps, for the plain loops (prepared untimed).
        split = split_batch(cfg.batch_size, job.labeled_share, True)
        per_step = dict(zip((LABELED, PSEUDO), split, strict=True))
        undecoded = {name: _undecoded(ds) for name, ds in datasets.items()}
        steps = _Steps(undecoded, per_step, augment, cfg.seed, iterations)
        preloaded = list(steps)
        timed = iterations - log_every
        # [3] The three, interleaved, `repeats` times.
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        for repeat in range(repeats):
            loader = torch.utils.data.DataLoader(
                steps,
                batch_size=None,
                collate_fn=_as_is,  # numpy rows, as Ray Train's workers get them
                num_workers=1,
                prefetch_factor=cfg.prefetch_batches,
            )
            measured = {
                "preloaded": _plain_loop(job, preloaded, log_every, timed),
                "dataloader": _plain_loop(job, loader, log_every, timed),
                "ray_train": _ray_train(config, job, datasets, work / str(repeat)),
            }
            for variant in VARIANTS:
                runs.append({"repeat": repeat, "variant": variant, **measured[variant]})
            print(
                f"repeat {repeat}: "
                + ", ".join(f"{v} {measured[v]['images_per_s']:.3f}" for v in VARIANTS)
                + " images/s",
                flush=True,
            )
        torch.set_num_threads(before)
    ray_cpus = int(ray.cluster_resources().get("CPU", 0))
    if started:
        ray.shutdown()

    speed = {
        v: statistics.mean(r["images_per_s"] for r in runs if r["variant"] == v)
        for v in VARIANTS
    }
    per_repeat = [
        {v: r["images_per_s"] for r in runs if r["repeat"] == k for v in [r["variant"]]}
        for k in range(repeats)
    ]
    ratios = [x["ray_train"] / x["dataloader"] for x in per_repeat]
    ray_runs = [r for r in runs if r["variant"] == "ray_train"]
    record = {
        "benchmark": "train_throughput",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "command": "python benchmarks/train_throughput.py"
        + (" --smoke" if args.smoke else "")
        + f" --iterations {iterations} --log-every {log_every} --images {images}"
        + f" --repeats {repeats}"
        + (" --no-dashboard" if args.no_dashboard else ""),
        "model": config.model.name,
        "min_size": list(config.model.min_size),
        "max_size": config.model.max_size,
        "box_batch_size_per_image": config.model.kwargs.get("box_batch_size_per_image"),
        "batch_size": cfg.batch_size,
        "labeled_share": cfg.labeled_share,
        "workers": 1,
        "cpus_per_worker": cfg.cpus_per_worker,
        "torch_threads": threads,
        "ray_cpus": ray_cpus,
        # None: Ray was started by someone else, with or without one
        "dashboard": (not args.no_dashboard) if started else None,
        "timed_steps": timed,
        "repeats": repeats,
        "runs": runs,
        "images_per_s": speed,
        # Ray Train (wall clock) / plain loop + DataLoader: the same data work
        "ratio": round(speed["ray_train"] / speed["dataloader"], 4),
        "ratio_per_repeat": [round(x, 4) for x in ratios],
        "ratio_preloaded": round(speed["ray_train"] / speed["preloaded"], 4),
        # Ray Train's own metric: per report interval, reports left out
        "ratio_intervals": round(
            statistics.mean(r["interval_images_per_s"] for r in ray_runs)
            / speed["dataloader"],
            4,
        ),
        "data_wait_share": round(
            statistics.mean(r["data_wait_share"] for r in ray_runs), 4
        ),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    _print(record, results)


LABELS = {
    "preloaded": "plain loop, preloaded rows",
    "dataloader": "plain loop + DataLoader (1 worker)",
    "ray_train": "Ray Train (1 worker) + Ray Data",
}


def _print(r: dict, results: Path) -> None:
    print(f"{'run':<40}{'repeat':>7}{'images/s':>10}{'median s':>10}{'data wait':>11}")
    for run in r["runs"]:
        print(
            f"{LABELS[run['variant']]:<40}{run['repeat']:>7}"
            f"{run['images_per_s']:>10.3f}{run['median_step_s']:>10.3f}"
            f"{run['data_wait_share']:>11.1%}"
        )
    print(
        f"{r['timed_steps']} timed steps, 1 worker vs 1 process, {r['torch_threads']} "
        f"torch threads each. Ray Train / plain loop + DataLoader: {r['ratio']:.3f} "
        f"(per repeat {r['ratio_per_repeat']}; target >= 0.97); Ray Train / "
        f"preloaded: {r['ratio_preloaded']:.3f}; Ray Train's interval metric / "
        f"DataLoader: {r['ratio_intervals']:.3f}; exposed data loading "
        f"{r['data_wait_share']:.1%} of Ray Train's step time (target < 5%)"
    )
    print(f"results: {results}")


if __name__ == "__main__":
    main()
