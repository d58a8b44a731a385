"""Step 2: multi-view inference and fusion of unlabeled images as a Ray Data pipeline.

::

    read_binary_files ──► decode_batch (CPU) ──► Predictor (actor pool, GPU if any)
                                                        │ every view of every image,
                                                        │ boxes mapped back, fused
                                                        ▼
                                               write_parquet (one row per image)

Inference, inverse transforms and fusion of one image happen in one actor call: no
shuffle or group-by crosses the cluster.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch

from raydd import schema
from raydd.checkpoint import load_detector
from raydd.config import (
    Config,
    EnsembleConfig,
    InferenceConfig,
    ViewConfig,
    unlabeled_files,
)
from raydd.data.coco import image_paths
from raydd.data.images import decode_batch, to_tensor
from raydd.ensemble import fuse
from raydd.models import permissive_inference
from raydd.views import View

logger = logging.getLogger(__name__)

CANDIDATES_DIR = "candidates"
VALIDATION_CANDIDATES_DIR = "validation_candidates"


class Predictor:
    """Model-holding Ray Data stage: all views of a batch, mapped back and fused.

    Reads ``path``, ``image``, ``height``, ``width``, ``error``; returns a
    :data:`raydd.schema.CANDIDATES_SCHEMA` table (``image`` dropped). Rows whose
    ``error`` is set get zero detections.

    Args:
        checkpoint: directory written by :func:`raydd.checkpoint.save_detector`.
        views: the test-time views; one view means no fusion.
        ensemble: fusion settings (also caps detections per image).
        score_floor: detections below this score are not kept at all.
        num_threads: torch threads when running on the CPU.
    """

    def __init__(
        self,
        checkpoint: str,
        views: Sequence[ViewConfig],
        ensemble: EnsembleConfig,
        score_floor: float = 0.0,
        num_threads: int = 1,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        model, _ = load_detector(checkpoint, self.device)
        self.model = permissive_inference(model, ensemble.max_detections)
        self.views = [View.from_config(v) for v in views]
        self.ensemble = ensemble
        self.score_floor = score_floor

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detections of each ``uint8 [H, W, 3]`` image in original-image pixels."""
        tensors = [to_tensor(i) for i in images]
        sizes = [t.shape[-2:] for t in tensors]
        per_image: list[list[dict[str, torch.Tensor]]] = [[] for _ in tensors]
        for view in self.views:
            outputs = self.model([view.apply(t).to(self.device) for t in tensors])
            for dets, out, (h, w) in zip(per_image, outputs, sizes, strict=True):
                out = {k: v.cpu() for k, v in out.items()}
                out["boxes"] = view.invert_boxes(out["boxes"], h, w)
                dets.append(out)
        return [self._fuse(dets) for dets in per_image]

    def _fuse(self, dets: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
        boxes, scores, labels = (
            torch.cat([d[k] for d in dets]) for k in ("boxes", "scores", "labels")
        )
        if len(dets) > 1:
            boxes, scores, labels = fuse(boxes, scores, labels, self.ensemble)
        keep = scores >= self.score_floor
        return {
            schema.BOXES: boxes[keep].numpy(),
            schema.SCORES: scores[keep].numpy(),
            schema.LABELS: labels[keep].numpy(),
        }

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        ok = [i for i, e in enumerate(batch[schema.ERROR]) if not e]
        detections = dict(
            zip(ok, self.predict([batch[schema.IMAGE][i] for i in ok]), strict=True)
        )
        rows = []
        for i in range(len(batch[schema.PATH])):
            row = {
                k: batch[k][i]
                for k in (schema.PATH, schema.HEIGHT, schema.WIDTH, schema.ERROR)
            }
            rows.append({**row, **detections.get(i, schema.empty_detections())})
        return schema.candidates_table(rows)


@dataclass(frozen=True)
class Pool:
    """How the Predictor stage runs: actor count, resources and torch threads."""

    actors: int
    num_gpus: float
    num_threads: int


def plan_pool(inference: InferenceConfig) -> Pool:
    """Sizes the Predictor actor pool from the cluster (unless the config says).

    With GPUs: one actor per GPU. CPU-only: one actor per node, reserving one CPU
    (so the read/decode tasks always get cores; a pool that reserves every CPU starves
    the reader and hangs, see RAY-NOTES) but running torch on all of the node's cores:
    one multi-threaded forward pass is as fast as several single-threaded ones and
    holds one model copy.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    num_gpus = inference.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_gpus:
        actors, threads = int(gpus / num_gpus), 1
    else:
        cpu_nodes = [n["CPU"] for n in nodes if n.get("CPU", 0) >= 1]
        actors, threads = len(cpu_nodes), int(min(cpu_nodes, default=1))
    return Pool(max(1, inference.num_actors or actors), num_gpus, threads)


def predict_dataset(
    paths: Sequence[str],
    checkpoint: str,
    views: Sequence[ViewConfig],
    ensemble: EnsembleConfig,
    inference: InferenceConfig,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of candidates for ``paths`` (one row per path)."""
    pool = plan_pool(inference)
    ds = ray.data.read_binary_files(list(paths), include_paths=True)
    ds = ds.map_batches(decode_batch, batch_size=inference.batch_size)
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            checkpoint=checkpoint,
            views=list(views),
            ensemble=ensemble,
            score_floor=inference.score_floor,
            num_threads=pool.num_threads,
        ),
        batch_size=inference.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.actors),
        num_gpus=pool.num_gpus,
        num_cpus=1,
    )


@dataclass(frozen=True)
class PseudoLabelResult:
    candidates: str
    images: int
    errors: int
    seconds: float


def _write_candidates(
    paths: Sequence[str], checkpoint: str, config: Config, out: Path
) -> pd.DataFrame:
    shutil.rmtree(out, ignore_errors=True)
    ds = predict_dataset(
        paths, checkpoint, config.views, config.ensemble, config.inference
    )
    ds.write_parquet(str(out.resolve()))
    return read_candidates(out)


def pseudo_label(config: Config, teacher_checkpoint: str) -> PseudoLabelResult:
    """Runs the teacher with every view on the unlabeled set; writes Parquet candidates.

    Writes ``OUTPUT_DIR/candidates/*.parquet`` (replacing an earlier run's) and an
    ``errors.csv`` of images that could not be decoded. With a validation split, its
    images are pseudo-labeled the same way into ``OUTPUT_DIR/validation_candidates``.
    """
    start = time.perf_counter()
    output = Path(config.output_dir)
    paths = unlabeled_files(config.data.unlabeled)
    logger.info(
        "pseudo-labeling %d images with %d views", len(paths), len(config.views)
    )
    table = _write_candidates(
        paths, teacher_checkpoint, config, output / CANDIDATES_DIR
    )
    errors = table[table[schema.ERROR] != ""][[schema.PATH, schema.ERROR]]
    errors.rename(columns={schema.PATH: "uri", schema.ERROR: "reason"}).to_csv(
        output / "errors.csv", index=False
    )
    if config.data.validation is not None:
        _write_candidates(
            image_paths(config.data.validation),
            teacher_checkpoint,
            config,
            output / VALIDATION_CANDIDATES_DIR,
        )
    return PseudoLabelResult(
        str(output / CANDIDATES_DIR),
        len(table),
        len(errors),
        time.perf_counter() - start,
    )


def read_candidates(directory: str | Path) -> pd.DataFrame:
    """Reads the candidates Parquet written by :func:`pseudo_label`, sorted by path."""
    frame = pd.read_parquet(directory)
    return frame.sort_values(schema.PATH, ignore_index=True)
