"""The Ray Train loop shared by the teacher (step 1) and the student (step 4).

The driver hands ``TorchTrainer`` two Ray Datasets, ``labeled`` and ``pseudo``
(prepared by :mod:`raydd.ingest`). Each worker reads both whole and streams its slice
of every epoch's permutation of each, decoded, resized and mirrored by Ray Data with
draws seeded from ``seed`` (:class:`raydd.ingest.RowStream`), in lockstep, so *every*
minibatch holds exactly the configured number of labeled images, and runs an
iteration-based SGD schedule (warm-up, x0.1 at 70% and 90%; AMP on GPU).

Every ``checkpoint_every`` steps rank 0 reports a checkpoint: the plain torchvision
``state_dict`` with the resolved config (``metadata.json``) plus the optimizer,
scheduler, AMP scaler and data position. A worker that dies is restarted from it
(``train.max_failures``), and launching the same run name again resumes from it.
Per-step losses, learning rate, images/s, the labeled share and the time each step
waited for data go to Ray Train and to TensorBoard (``log_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import struct
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from raydd import storage
from raydd.checkpoint import load_state_dict, save_detector
from raydd.config import CocoSplit, ModelConfig, TrainConfig, ViewConfig, to_dict
from raydd.data.coco import Categories
from raydd.evaluate import evaluate_model
from raydd.ingest import (
    LABELED,
    PSEUDO,
    RowStream,
    Shuffle,
    next_batch,
    split_batch,
    to_device,
)
from raydd.models import build_model
from raydd.runtime import setup_logging

logger = logging.getLogger(__name__)

# settings a run's checkpoints stay valid under: a longer schedule (``iterations``)
# continues a finished run; any other change starts a new run (TrainJob.run_name)
RESUMABLE = (
    "iterations",
    "passes",
    "checkpoint_every",
    "log_every",
    "eval_every",
    "max_failures",
    "prefetch_batches",
    "max_workers",
)
TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"  # the last metrics the run reported


def sized(train: TrainConfig, images: int, per_step: int) -> TrainConfig:
    """``train`` with its ``iterations`` from ``passes`` when set: the steps in
    which ``per_step`` images of a set go over its ``images`` ``passes`` times
    (rounded up, at least one); as it is otherwise."""
    if not train.passes:
        return train
    steps = math.ceil(train.passes * images / max(per_step, 1))
    return dataclasses.replace(train, iterations=max(1, steps))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 1/3, then ×0.1 at each milestone fraction of training."""
    if step < config.warmup_iterations:
        alpha = step / config.warmup_iterations
        return 1.0 / 3 * (1 - alpha) + alpha
    passed = sum(step >= m * config.iterations for m in config.lr_milestones)
    return 0.1**passed


def sgd_schedule(
    model: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over the trainable parameters, stepped by :func:`lr_factor` each step."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    schedule = functools.partial(lr_factor, config=config)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs besides the data; pickled to the workers.

    Attributes:
        init_from: checkpoint directory to start from (the student's ``init:
            teacher``); ``None`` starts from the initial (pretrained-backbone) weights.
        labeled_share: fraction of every minibatch taken from ``labeled``.
        evaluation: the split rank 0 scores (COCO AP) every ``eval_every`` steps,
            through ``evaluation_view`` with up to ``max_detections`` per image (as
            the pipeline's final evaluation does).
        log_dir: where rank 0 writes TensorBoard event files, a local folder or a
            URI (``None``: none).
        metadata: saved in every checkpoint's ``metadata.json``.
    """

    model: ModelConfig
    train: TrainConfig
    categories: Categories
    labeled_share: float = 1.0
    init_from: str | None = None
    evaluation: CocoSplit | None = None
    evaluation_view: ViewConfig = ViewConfig()
    max_detections: int = 100
    log_dir: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def run_name(self, role: str) -> str:
        """``role-<digest>`` of every setting the weights depend on (model, labeled
        data, schedule but its length, thresholds...): launching the same settings
        again resumes, other settings start a new run instead of resuming a stale
        one (:data:`RESUMABLE`)."""
        config = self.metadata.get("config", {})
        identity = {
            "model": to_dict(self.model),
            "train": {
                k: v for k, v in to_dict(self.train).items() if k not in RESUMABLE
            },
            "categories": to_dict(self.categories),
            "labeled_share": self.labeled_share,
            "init_from": self.init_from,
            "labeled": config.get("data", {}).get("labeled"),
            **{k: v for k, v in self.metadata.items() if k != "config"},
        }
        text = json.dumps(identity, sort_keys=True, default=str)
        return f"{role}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> tuple[int, dict[str, dict[str, int]]]:
    """Loads the latest checkpoint, if any; returns its step and data position."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / TRAIN_STATE_FILE, weights_only=True)
        model.load_state_dict(load_state_dict(d))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    logger.info(
        "resumed from step %d at data position %s", state["step"], state["data"]
    )
    return int(state["step"]), state["data"]


@dataclass
class _State:
    """What a checkpoint restores besides the model."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    streams: dict[str, RowStream]
    resumed_from: int

    def to_dict(self, step: int) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": step,
            "data": {name: s.position() for name, s in self.streams.items()},
        }


def _report(
    job: TrainJob,
    model: torch.nn.Module,
    state: _State,
    step: int,
    metrics: dict[str, float],
    checkpoint: bool,
) -> None:
    """``ray.train.report`` on every worker; rank 0 attaches the checkpoint."""
    if not checkpoint or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_detector(
            d,
            model,
            job.model,
            job.categories,
            step=step,
            resumed_from=state.resumed_from,
            **job.metadata,
        )
        torch.save(state.to_dict(step), Path(d) / TRAIN_STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _build(job: TrainJob) -> torch.nn.Module:
    """The detector, built the way the teacher was (pretrained backbone: frozen batch
    norm, the same trainable stages) and, for ``init_from``, loaded with its weights.

    Ray Data already resized the images to a training scale, so the model's own
    transform skips resizing in training (it still normalises, and resizes in eval).
    """
    model = build_model(job.model, job.categories.num_classes, pretrained=True)
    if job.init_from is not None:  # a folder or URI (storage, on a cluster)
        model.load_state_dict(load_state_dict(job.init_from))
    model.transform._skip_resize = True
    return model


class _Meter:
    """Running sums of one report interval: loss components, images, seconds."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.tic = time.perf_counter()

    def add(self, losses: dict[str, float], wait: float, rows: list[dict]) -> None:
        for name, value in losses.items():
            self.sums[name] += value
        self.sums["data_wait_s"] += wait
        self.sums["images"] += len(rows)
        self.sums["labeled"] += sum(r["source"] == LABELED for r in rows)
        self.steps += 1

    def metrics(self, world_size: int) -> dict[str, float]:
        seconds = time.perf_counter() - self.tic
        out = {
            k: v / self.steps
            for k, v in self.sums.items()
            if k not in ("images", "labeled", "data_wait_s")
        }
        out["images_per_s"] = self.sums["images"] * world_size / seconds
        out["labeled_share"] = self.sums["labeled"] / self.sums["images"]
        out["data_wait_share"] = self.sums["data_wait_s"] / seconds
        return out


def _shard(name: str) -> Any | None:
    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:  # not passed to the trainer (the teacher has no pseudo set)
        return None


def _streams(
    job: TrainJob, position: dict[str, dict[str, int]], rank: int, world: int
) -> dict[str, RowStream]:
    """This worker's stream of each dataset, seeded by ``seed``, at the saved
    position (rank 0's: every worker's epochs have one length, see ``Shuffle``)."""
    cfg = job.train
    shards = {LABELED: _shard(LABELED), PSEUDO: _shard(PSEUDO)}
    sizes = split_batch(cfg.batch_size, job.labeled_share, shards[PSEUDO] is not None)
    return {
        name: RowStream(
            shards[name],
            n,
            cfg.prefetch_batches,
            **position.get(name, {}),
            shuffle=Shuffle(cfg.seed, name, rank, world),
        )
        for name, n in zip((LABELED, PSEUDO), sizes, strict=True)
        if n > 0
    }


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function (``train_loop_config={"job": TrainJob}``)."""
    job: TrainJob = loop_config["job"]
    cfg = job.train
    setup_logging()  # progress and resume lines reach the job's log
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    amp = cfg.use_gpu and cfg.amp and device.type == "cuda"
    model = _build(job).to(device)
    optimizer, scheduler = sgd_schedule(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    start, position = _restore(model, optimizer, scheduler, scaler)
    streams = _streams(job, position, rank, world)
    state = _State(optimizer, scheduler, scaler, streams, start)
    sizes = {name: s.batch_size for name, s in streams.items()}
    ddp_model = ray.train.torch.prepare_model(model)
    ddp_model.train()
    board = _TensorBoard(job.log_dir) if rank == 0 and job.log_dir else None
    writer = board and board.writer
    meter = _Meter()
    for step in range(start + 1, cfg.iterations + 1):
        tic = time.perf_counter()
        rows = next_batch(streams, sizes)
        wait = time.perf_counter() - tic
        values = _step(ddp_model, *to_device(rows, device), state, amp)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        meter.add(values, wait, rows)
        if writer is not None:
            _write(writer, step, values, scheduler.get_last_lr()[0], wait)
        if not _report_point(cfg, step):
            continue
        metrics = {"step": step, "lr": scheduler.get_last_lr()[0]}
        metrics |= meter.metrics(world)
        if rank == 0 and _evaluation_point(cfg, step) and job.evaluation is not None:
            ap = evaluate_model(
                model,
                job.evaluation,
                job.categories,
                job.evaluation_view,
                job.max_detections,
            )
            metrics |= {f"test_{k}": v for k, v in ap.items()}
        if board is not None:
            _write_interval(board.writer, step, metrics)
            board.flush()
        logger.info("step %d/%d %s", step, cfg.iterations, _brief(metrics))
        checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.iterations
        _report(job, model, state, step, metrics, checkpoint)
        meter = _Meter()
    if start >= cfg.iterations:  # re-launched after it had finished: hand back the end
        _report(job, model, state, start, {"step": start}, checkpoint=True)
    for stream in streams.values():
        stream.close()
    if board is not None:
        board.close()


class _TensorBoard:
    """Rank 0's event files at ``location``. A URI (storage, on a cluster) is
    written in a local temporary folder and copied there at every flush, so the
    files reach storage from whichever node rank 0 runs on."""

    def __init__(self, location: str) -> None:
        self.location = location
        remote = storage.is_remote(location)
        self.folder = tempfile.mkdtemp(prefix="raydd-tb-") if remote else location
        self.writer = SummaryWriter(storage.filesystem(self.folder)[1])

    def flush(self) -> None:
        self.writer.flush()
        if self.folder != self.location:
            storage.copy(self.folder, self.location)

    def close(self) -> None:
        self.writer.close()
        self.flush()
        if self.folder != self.location:
            shutil.rmtree(self.folder, ignore_errors=True)


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float, float]]]:
    """``tag -> [(step, wall_time, value)]`` from the TensorBoard event files in the
    local folder ``log_dir`` (e.g. ``test/AP`` of :func:`fit`'s evaluations), read
    without TensorFlow (TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
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


def _step(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    state: _State,
    amp: bool,
) -> dict[str, float]:
    """One SGD step (mixed precision when ``amp``); returns the loss components and
    their sum (``loss``), read back from the device in one transfer."""
    with torch.autocast(images[0].device.type, enabled=amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    state.optimizer.zero_grad()
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    values = torch.stack([*losses.values(), loss]).detach().float().cpu().tolist()
    return dict(zip([*losses, "loss"], values, strict=True))


def _report_point(cfg: TrainConfig, step: int) -> bool:
    return (
        step % cfg.log_every == 0
        or step % cfg.checkpoint_every == 0
        or step == cfg.iterations
        or _evaluation_point(cfg, step)
    )


def _evaluation_point(cfg: TrainConfig, step: int) -> bool:
    return cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.iterations)


def _write(
    writer: SummaryWriter, step: int, losses: dict[str, float], lr: float, wait: float
) -> None:
    for name, value in losses.items():
        writer.add_scalar(f"loss/{name}", value, step)
    writer.add_scalar("lr", lr, step)
    writer.add_scalar("data/wait_s", wait, step)


def _write_interval(
    writer: SummaryWriter, step: int, metrics: dict[str, float]
) -> None:
    for name in ("images_per_s", "labeled_share", "data_wait_share"):
        writer.add_scalar(f"data/{name}", metrics[name], step)
    for name, value in metrics.items():
        if name.startswith("test_"):
            writer.add_scalar(f"test/{name[5:]}", value, step)


def _brief(metrics: dict[str, float]) -> str:
    keys = ("loss", "lr", "images_per_s", "labeled_share", "data_wait_share")
    shown = {k: metrics[k] for k in keys if k in metrics}
    shown |= {k: v for k, v in metrics.items() if k.startswith("test_")}
    return " ".join(f"{k}={v:.4g}" for k, v in shown.items())


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    """Ray Train's scaling from the config; ``max_workers`` makes it elastic."""
    workers = (
        cfg.num_workers
        if cfg.max_workers is None
        else (cfg.num_workers, cfg.max_workers)
    )
    return ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=cfg.use_gpu,
        resources_per_worker={"CPU": cfg.cpus_per_worker},
    )


def fit(
    job: TrainJob,
    datasets: dict[str, ray.data.Dataset],
    name: str,
    storage_path: str | Path,
    export_to: str | Path,
) -> Path:
    """Runs :func:`train_loop` on Ray Train and exports the final detector.

    Args:
        job: what to train.
        datasets: ``labeled`` and optionally ``pseudo`` training sets
            (:func:`raydd.ingest.prepare`); each worker takes its slice of every
            epoch.
        name: the role (``teacher``, ``student``, ``control``); the run is named
            :meth:`TrainJob.run_name`, and launching the same settings under the
            same ``storage_path`` again resumes from its latest checkpoint.
        storage_path: where Ray Train keeps checkpoints (local path or URI; on a
            multi-node cluster it must be storage every node reaches).
        export_to: directory that receives the final ``model.pt`` + ``metadata.json``
            and the run's last reported metrics (``metrics.json``).

    Returns:
        ``export_to`` as a path.
    """
    cfg = job.train
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        datasets=datasets,
        # every worker reads each (undecoded, small) set whole and takes its slice
        # of each epoch's permutation (raydd.ingest.Shuffle): no split coordinator
        # actors, and an order that a seed repeats whatever the number of workers
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=job.run_name(name),
            storage_path=storage.absolute(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} reported no checkpoint")
    export_to = Path(export_to)
    result.checkpoint.to_directory(str(export_to))
    (export_to / TRAIN_STATE_FILE).unlink(missing_ok=True)
    (export_to / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))
    return export_to
