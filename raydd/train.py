"""The Ray Train loop shared by the teacher (step 1) and the student (step 4).

Each worker builds the detector, draws minibatches from :class:`MixedBatchSampler`
(a fixed number of labeled images in *every* batch, the rest pseudo-labeled) and runs
an iteration-based SGD schedule. Every ``checkpoint_every`` steps rank 0 reports a
checkpoint (plain torchvision ``state_dict`` + optimizer/scheduler/step); launching
the same run name again resumes from the latest one, at the same data position.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch.utils.data import ConcatDataset, DataLoader

from raydd.checkpoint import MODEL_FILE, save_detector
from raydd.config import ModelConfig, TrainConfig
from raydd.data.coco import Categories, DetectionDataset, Record, collate
from raydd.models import build_model

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


def _stream(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless sequence of shuffled passes."""
    out = []
    for k in range(start, start + count):
        epoch, position = divmod(k, n)
        out.append(int(_permutation(n, seed, epoch)[position]))
    return out


class MixedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches over ``ConcatDataset([labeled, pseudo])`` with a fixed labeled share.

    Every batch holds exactly ``round(batch_size * labeled_share)`` labeled indices
    (``0 .. num_labeled-1``) and the rest pseudo-labeled ones (offset by
    ``num_labeled``). Each set is read in shuffled passes, repeated as often as needed
    (the labeled set is usually far smaller). Global batch ``g`` goes to worker
    ``g % world_size``; batches are a pure function of ``(seed, g)``, so a run that
    resumes at ``start_step`` continues with exactly the batches it would have seen.
    """

    def __init__(
        self,
        num_labeled: int,
        num_pseudo: int,
        batch_size: int,
        labeled_share: float,
        steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if num_labeled == 0:
            raise ValueError("the labeled set is empty")
        self.n_labeled = (
            batch_size if num_pseudo == 0 else round(batch_size * labeled_share)
        )
        self.n_pseudo = batch_size - self.n_labeled
        self.num_labeled, self.num_pseudo = num_labeled, num_pseudo
        self.steps, self.seed, self.start_step = steps, seed, start_step
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            g = step * self.world_size + self.rank
            labeled = _stream(
                self.num_labeled, self.seed, g * self.n_labeled, self.n_labeled
            )
            pseudo = [
                self.num_labeled + i
                for i in _stream(
                    max(self.num_pseudo, 1),
                    self.seed + 1,
                    g * self.n_pseudo,
                    self.n_pseudo,
                )
            ]
            yield labeled + pseudo


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 1/3, then ×0.1 at each milestone fraction of training."""
    if step < config.warmup_iterations:
        alpha = step / config.warmup_iterations
        return 1.0 / 3 * (1 - alpha) + alpha
    passed = sum(step >= m * config.iterations for m in config.lr_milestones)
    return 0.1**passed


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs; pickled to the Ray Train workers.

    ``init_from`` is a checkpoint directory to start from (the student's
    ``init: teacher``); ``None`` starts from the pretrained backbone.
    """

    model: ModelConfig
    train: TrainConfig
    categories: Categories
    labeled: list[Record]
    pseudo: list[Record] = field(default_factory=list)
    labeled_share: float = 1.0
    init_from: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / TRAIN_STATE_FILE, weights_only=True)
        model.load_state_dict(torch.load(Path(d) / MODEL_FILE, weights_only=True))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resumed from step %d", state["step"])
    return int(state["step"])


def _report(
    job: TrainJob,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    resumed_from: int,
    metrics: dict[str, float],
) -> None:
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_detector(
            d,
            model,
            job.model,
            job.categories,
            step=step,
            resumed_from=resumed_from,
            **job.metadata,
        )
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
            },
            Path(d) / TRAIN_STATE_FILE,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _build(job: TrainJob) -> torch.nn.Module:
    """The detector, built the way the teacher was (pretrained backbone: frozen batch
    norm, the same trainable stages) and, for ``init_from``, loaded with its weights."""
    model = build_model(job.model, job.categories.num_classes, pretrained=True)
    if job.init_from is not None:
        state = torch.load(Path(job.init_from) / MODEL_FILE, weights_only=True)
        model.load_state_dict(state)
    return model


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function (``train_loop_config={"job": TrainJob}``)."""
    job: TrainJob = loop_config["job"]
    cfg = job.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    model = _build(job)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, config=cfg)
    )
    start = _restore(model, optimizer, scheduler)
    ddp_model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    dataset = ConcatDataset(
        [
            DetectionDataset(job.labeled, cfg.hflip_prob),
            DetectionDataset(job.pseudo, cfg.hflip_prob),
        ]
    )
    sampler = MixedBatchSampler(
        len(job.labeled),
        len(job.pseudo),
        cfg.batch_size,
        job.labeled_share,
        cfg.iterations,
        cfg.seed,
        rank,
        world,
        start,
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    ddp_model.train()
    step, losses, tic = start, [], time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=start + 1):
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss = sum(ddp_model(images, targets).values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
            seconds = time.perf_counter() - tic
            metrics = {
                "step": step,
                "loss": float(np.mean(losses)),
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": len(losses) * cfg.batch_size * world / seconds,
            }
            logger.info("step %d/%d %s", step, cfg.iterations, metrics)
            _report(job, model, optimizer, scheduler, step, start, metrics)
            losses, tic = [], time.perf_counter()
    if start >= cfg.iterations:  # re-launched after it had finished: hand back the end
        _report(job, model, optimizer, scheduler, step, start, {"step": step})


def fit(
    job: TrainJob, name: str, storage_path: str | Path, export_to: str | Path
) -> Path:
    """Runs :func:`train_loop` on Ray Train and exports the final detector.

    Args:
        job: what to train.
        name: the run name; launching the same name under the same ``storage_path``
            again resumes from its latest checkpoint.
        storage_path: where Ray Train keeps checkpoints (local path or URI).
        export_to: directory that receives the final ``model.pt`` + ``metadata.json``.

    Returns:
        ``export_to`` as a path.
    """
    cfg = job.train
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=_absolute(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} reported no checkpoint")
    export_to = Path(export_to)
    result.checkpoint.to_directory(str(export_to))
    (export_to / TRAIN_STATE_FILE).unlink(missing_ok=True)
    return export_to


def _absolute(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())
