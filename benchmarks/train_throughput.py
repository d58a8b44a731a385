"""Training throughput: raydd's Ray Train loop vs a plain single-process torch loop.

Both train the same student (the demo's Faster R-CNN MobileNetV2-FPN, ImageNet
backbone) with the same optimizer and schedule on 5-image minibatches of 3 labeled +
2 "pseudo-labeled" demo canvases (the labeled and validation splits), with the same
number of torch threads:

* Ray Train: :func:`raydd.train.fit` on one worker (``cpus_per_worker=1``,
  ``torch_threads=2``, as ``configs/demo.yaml``); Ray Data decodes, resizes and
  streams the images alongside (the other CPU). Images/s and the share of step time
  spent waiting for data are read back from the run's TensorBoard events: the first
  report interval (start-up, warm-up) is left out.
* plain loop: one process, the SAME prepared rows materialised in memory beforehand
  (``prepare(...).take_all()``, not timed), mixed 3:2 per step, moved with
  :func:`raydd.ingest.to_device` and trained step after step; timed after as many
  warm-up steps as the Ray run's first interval. It runs before and after the Ray
  Train run (the mean is the baseline; the two show the machine's drift).

Overhead = 1 - Ray Train images/s / plain images/s. Targets (reported, not asserted):
overhead <= 3% at equal workers, exposed data loading < 5% of step time. Writes
``benchmarks/results/train_throughput.json`` (``--smoke``: a temporary file unless
``--results`` says otherwise).

    python benchmarks/train_throughput.py [--smoke] [--iterations 60] [--log-every 10]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import struct
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ray
import torch
import yaml
from tensorboardX.proto import event_pb2

from raydd.config import Config, parse_config
from raydd.data.coco import coco_records
from raydd.data.demo import DemoSizes, write_demo_dataset
from raydd.ingest import LABELED, PSEUDO, RowStream, prepare, split_batch, to_device
from raydd.models import offline_mobilenet_v2_weights
from raydd.teacher import augment_for, labeled_training_records
from raydd.train import TrainJob, _build, fit, sgd_schedule

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


def _read_scalars(log_dir: str) -> dict[str, list[tuple[int, float, float]]]:
    """``tag -> [(step, wall_time, value)]`` from TensorBoard event files (TFRecord
    framing: u64 length, u32 crc, payload, u32 crc) without TensorFlow."""
    scalars = defaultdict(list)
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars[value.tag].append(
                    (event.step, event.wall_time, value.simple_value)
                )
    return scalars


def _ray_train(config: Config, job: TrainJob, datasets: dict, work: Path) -> dict:
    """Runs ``fit``; steady-state throughput from its TensorBoard events."""
    cfg = job.train
    tic = time.perf_counter()
    fit(job, datasets, "train_throughput", work / "storage", work / "export")
    seconds = time.perf_counter() - tic
    scalars = _read_scalars(job.log_dir)
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
        "intervals": [
            {"step": s, "images_per_s": round(v, 3), "data_wait_share": round(w, 4)}
            for s, v, w in intervals
        ],
        # Ray Train's own metric: the mean over the report intervals (an interval's
        # clock starts after the previous report, so reports are not in it)
        "images_per_s": statistics.mean(v for _, v, _ in intervals),
        "data_wait_share": statistics.mean(w for _, _, w in intervals),
        # wall clock over the same steps, report/TensorBoard time included
        "wall_images_per_s": steps * cfg.batch_size / span,
        "wall_data_wait_share": sum(waits[s] for s in range(first + 1, last + 1))
        / span,
        # typical step (robust to the slow steps after each epoch starts)
        "median_step_s": statistics.median(
            walls[s] - walls[s - 1] for s in range(first + 1, last + 1)
        ),
    }


def _decoded(dataset: ray.data.Dataset) -> list[dict]:
    """Every row of a prepared training set, decoded and augmented as a stream
    gives it to a worker (epoch 0's order)."""
    stream = RowStream(dataset.iterator(), 1)
    rows = stream.take(dataset.count())
    stream.close()
    return rows


def _plain_loop(
    job: TrainJob, rows: dict[str, list[dict]], warmup: int, steps: int, threads: int
) -> dict:
    """The same training step in this process on preloaded rows; images/s."""
    cfg = job.train
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = _build(job)
    model.train()
    optimizer, scheduler = sgd_schedule(model, cfg)
    split = split_batch(cfg.batch_size, job.labeled_share, True)
    sizes = dict(zip((LABELED, PSEUDO), split, strict=True))
    streams = {name: itertools.cycle(rows[name]) for name in sizes}
    device = torch.device("cpu")
    seconds = []
    for step in range(warmup + steps):
        tic = time.perf_counter()
        batch = [next(streams[n]) for n, k in sizes.items() for _ in range(k)]
        images, targets = to_device(batch, device)
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()  # what any loop logs
        if step >= warmup:
            seconds.append(time.perf_counter() - tic)
    torch.set_num_threads(before)
    return {
        "timed_steps": steps,
        "images_per_s": steps * cfg.batch_size / sum(seconds),
        "median_step_s": statistics.median(seconds),
    }


def _job(config: Config, work: Path) -> tuple[TrainJob, dict]:
    """The student job (3 labeled + 2 pseudo per step) and its two datasets."""
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
    return job, datasets


def _machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="6 steps, 8+8 images")
    parser.add_argument("--iterations", type=int, default=60, help="training steps")
    parser.add_argument("--log-every", type=int, default=10, help="report interval")
    parser.add_argument("--images", type=int, default=64, help="labeled = pseudo")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    iterations, log_every, images = (
        (6, 2, 8) if args.smoke else (args.iterations, args.log_every, args.images)
    )
    results = Path(
        args.results
        or (
            Path(tempfile.gettempdir()) / "train_throughput_smoke.json"
            if args.smoke
            else ROOT / "benchmarks/results/train_throughput.json"
        )
    )

    # [1] Data and config: two labeled demo splits as the labeled and pseudo sets.
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = DemoSizes(labeled=images, validation=images, unlabeled=1, test=1)
        data = write_demo_dataset(work / "data", seed=0, sizes=sizes)
        config = _config(work, data, iterations, log_every, args.smoke)
        job, datasets = _job(config, work)
        threads = config.student.torch_threads
        # [2] The same prepared rows, materialised for the plain loop (not timed).
        rows = {name: _decoded(ds) for name, ds in datasets.items()}
        steps = iterations - log_every
        # [3] Plain loop, Ray Train, plain loop again.
        before = _plain_loop(job, rows, log_every, steps, threads)
        ray_run = _ray_train(config, job, datasets, work)
        after = _plain_loop(job, rows, log_every, steps, threads)
    ray_cpus = int(ray.cluster_resources().get("CPU", 0))
    if started:
        ray.shutdown()

    plain = statistics.mean([before["images_per_s"], after["images_per_s"]])
    ratio = ray_run["images_per_s"] / plain
    wall_ratio = ray_run["wall_images_per_s"] / plain
    plain_median = statistics.mean([before["median_step_s"], after["median_step_s"]])
    record = {
        "benchmark": "train_throughput",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "command": "python benchmarks/train_throughput.py"
        + (" --smoke" if args.smoke else "")
        + f" --iterations {iterations} --log-every {log_every} --images {images}",
        "model": config.model.name,
        "min_size": list(config.model.min_size),
        "max_size": config.model.max_size,
        "batch_size": config.student.batch_size,
        "labeled_share": config.student.labeled_share,
        "workers": 1,
        "cpus_per_worker": config.student.cpus_per_worker,
        "torch_threads": threads,
        "ray_cpus": ray_cpus,
        "plain": {"before": before, "after": after, "images_per_s": plain},
        "ray_train": ray_run,
        "ratio": round(ratio, 4),
        "overhead": round(1 - ratio, 4),
        "wall_ratio": round(wall_ratio, 4),
        "wall_overhead": round(1 - wall_ratio, 4),
        "median_step_ratio": round(ray_run["median_step_s"] / plain_median, 4),
        "data_wait_share": round(ray_run["data_wait_share"], 4),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    _print(record, results)


def _print(r: dict, results: Path) -> None:
    ray_run, plain = r["ray_train"], r["plain"]
    print(f"{'run':<36}{'steps':>7}{'images/s':>10}{'median s':>10}{'data wait':>11}")
    for name in ("before", "after"):
        p = plain[name]
        print(
            f"{'plain loop, ' + name:<36}{p['timed_steps']:>7}"
            f"{p['images_per_s']:>10.3f}{p['median_step_s']:>10.3f}"
        )
    for label, speed, wait in (
        ("Ray Train (reported intervals)", "images_per_s", "data_wait_share"),
        ("Ray Train (wall clock)", "wall_images_per_s", "wall_data_wait_share"),
    ):
        print(
            f"{label:<36}{ray_run['timed_steps']:>7}{ray_run[speed]:>10.3f}"
            f"{ray_run['median_step_s']:>10.3f}{ray_run[wait]:>11.1%}"
        )
    print(
        f"1 worker vs 1 process, {r['torch_threads']} torch threads each. Ray Train / "
        f"plain: {r['ratio']:.3f} (overhead {r['overhead']:.1%}, target <= 3%); wall "
        f"clock {r['wall_ratio']:.3f}; median step Ray / plain "
        f"{r['median_step_ratio']:.3f}; exposed data loading "
        f"{r['data_wait_share']:.1%} of step time (target < 5%)"
    )
    print(f"results: {results}")


if __name__ == "__main__":
    main()
