"""One inference path: a detector (from a checkpoint or in memory), every view of
each image, detections mapped back to the original pixels and fused.

:class:`Predictor` is used three ways, with the same code for the model, the views
and the fusion:

- as a Ray Data stage (:func:`predict_dataset`): pseudo-labeling
  (:mod:`raydd.pseudo_label`) and the evaluation of checkpoints
  (:func:`raydd.evaluate.evaluate_checkpoint`), on an actor pool (GPU if any);
- in-process on a training worker (:meth:`Predictor.from_model`), for the
  evaluation points of a training run (:func:`raydd.evaluate.evaluate_model`);
- in-process for a few images (:meth:`Predictor.predict`): the report's gallery.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

from raydd import schema
from raydd.checkpoint import load_detector
from raydd.config import Config, EnsembleConfig, InferenceConfig, ViewConfig
from raydd.data.images import to_tensor
from raydd.ensemble import fuse
from raydd.masks import mask_rles
from raydd.models import permissive_inference
from raydd.sources import load_batch
from raydd.views import View

logger = logging.getLogger(__name__)

_NOT_WRITTEN = (schema.IMAGE, "bytes", "data")


def _detach_branch(model: nn.Module, kind: str) -> tuple[nn.Module, ...] | None:
    """Takes the ``mask`` or ``keypoint`` branch off a torchvision R-CNN.

    The detection pass then predicts boxes only (torchvision's ``RoIHeads`` skips a
    branch whose RoI pool is ``None``); the branch runs later on the *fused* boxes.
    """
    heads = getattr(model, "roi_heads", None)
    parts = tuple(
        getattr(heads, f"{kind}_{p}", None) for p in ("roi_pool", "head", "predictor")
    )
    if heads is None or any(p is None for p in parts):
        return None
    setattr(heads, f"{kind}_roi_pool", None)
    return parts


class Predictor:
    """Model-holding Ray Data stage: all views of a batch, mapped back and fused.

    Reads the batch of :func:`raydd.sources.load_batch` (``path``, ``image``,
    ``height``, ``width``, ``error`` + pass-through columns) and returns a candidates
    table (:func:`raydd.schema.candidates_schema`) plus the pass-through columns. Rows
    whose ``error`` is set get zero detections. Boxes come out in the pixels of the
    *original* image even when ``image`` was downscaled on load.

    Masks and keypoints follow Detectron's test-time augmentation: the boxes are fused
    first, then every view predicts the soft mask (heatmaps) of each *fused* box,
    mirrored back under a flip and averaged (``SOFT_AVG`` / ``HM_AVG``).

    Args:
        checkpoint: directory written by :func:`raydd.checkpoint.save_detector`, a
            local folder or a URI every node reaches (storage, on a cluster); or
            the detector itself (see :meth:`from_model`).
        views: the test-time views; one view means no fusion.
        ensemble: fusion settings (also caps detections per image).
        score_floor: detections below this score are not kept at all.
        num_threads: torch threads when running on the CPU.
        keypoint_flip: for each keypoint, the index of its mirror image (left eye ->
            right eye); default: no swap.
    """

    def __init__(
        self,
        checkpoint: str | nn.Module,
        views: Sequence[ViewConfig],
        ensemble: EnsembleConfig,
        score_floor: float = 0.0,
        num_threads: int = 1,
        keypoint_flip: Sequence[int] | None = None,
    ) -> None:
        if isinstance(checkpoint, nn.Module):  # see from_model
            model = checkpoint
            self.device = next(model.parameters()).device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if self.device.type == "cpu":
                torch.set_num_threads(num_threads)
            model, _ = load_detector(checkpoint, self.device)
        self.model = permissive_inference(model.eval(), ensemble.max_detections)
        self.mask_branch = _detach_branch(self.model, "mask")
        self.keypoint_branch = _detach_branch(self.model, "keypoint")
        self.num_keypoints = (
            self.keypoint_branch[2].out_channels if self.keypoint_branch else 0
        )
        self.keypoint_flip = list(keypoint_flip or range(self.num_keypoints))
        self.views = [View.from_config(v) for v in views]
        self.ensemble = ensemble
        self.score_floor = score_floor
        self.schema = schema.candidates_schema(
            masks=self.mask_branch is not None, keypoints=self.num_keypoints > 0
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        views: Sequence[ViewConfig],
        ensemble: EnsembleConfig,
        **kwargs: Any,
    ) -> Predictor:
        """A Predictor of an in-memory detector (a training worker's), on the
        model's device. It works on a copy: ``model`` is left as it is."""
        return cls(copy.deepcopy(model), views, ensemble, **kwargs)

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Detections of each ``uint8 [h, w, 3]`` image, in pixels of an original
        image of ``sizes[i] = (height, width)`` (default: the image's own size)."""
        if not images:  # e.g. a batch of unreadable files only
            return []
        tensors = [to_tensor(i).to(self.device) for i in images]
        shapes = [tuple(t.shape[-2:]) for t in tensors]
        boxes, scores, labels, owners = self._detect(tensors, shapes)
        keep = scores >= self.score_floor
        boxes, scores, labels, owners = (
            x[keep] for x in (boxes, scores, labels, owners)
        )
        counts = torch.bincount(owners, minlength=len(tensors)).tolist()
        per_image = list(
            zip(*(x.split(counts) for x in (boxes, scores, labels)), strict=True)
        )
        maps = self._instance_maps(
            tensors,
            shapes,
            [b for b, _, _ in per_image],
            [lab for *_, lab in per_image],
        )
        results = []
        for i, (b, s, lab) in enumerate(per_image):
            h, w = shapes[i]
            height, width = sizes[i] if sizes is not None else (h, w)
            factor = torch.tensor([width / w, height / h] * 2, device=b.device)
            dets = {
                schema.BOXES: (b * factor).cpu().numpy(),
                schema.SCORES: s.cpu().numpy(),
                schema.LABELS: lab.cpu().numpy(),
            }
            if "masks" in maps:
                dets[schema.MASKS] = mask_rles(
                    maps["masks"][i], b * factor, height, width
                )
            if "keypoints" in maps:
                dets.update(self._keypoints(maps["keypoints"][i], b, factor))
            results.append(dets)
        return results

    def _detect(
        self, tensors: list[torch.Tensor], shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, ...]:
        """Every view's detections mapped back to the (loaded) images, fused."""
        boxes, scores, labels, owners = [], [], [], []
        for view in self.views:
            outputs = self.model([view.apply(t) for t in tensors])
            for i, (out, (h, w)) in enumerate(zip(outputs, shapes, strict=True)):
                boxes.append(view.invert_boxes(out["boxes"], h, w))
                scores.append(out["scores"])
                labels.append(out["labels"])
                owners.append(torch.full_like(out["labels"], i))
        merged = [torch.cat(x) for x in (boxes, scores, labels, owners)]
        if len(self.views) == 1:
            return tuple(merged)  # the model's own output: sorted, capped
        return fuse(*merged, self.ensemble, num_views=len(self.views))

    def _instance_maps(
        self,
        tensors: list[torch.Tensor],
        shapes: list[tuple[int, int]],
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
    ) -> dict[str, list[torch.Tensor]]:
        """Soft masks ``[N, M, M]`` / keypoint heatmaps ``[N, K, S, S]`` of the fused
        boxes of each image, averaged over the views (box-relative grids)."""
        branches = {
            name: branch
            for name, branch in (
                ("masks", self.mask_branch),
                ("keypoints", self.keypoint_branch),
            )
            if branch is not None
        }
        if not branches or sum(len(b) for b in boxes) == 0:
            return {}
        totals: dict[str, torch.Tensor] = {}
        label = torch.cat(labels)
        for view in self.views:
            batch, _ = self.model.transform([view.apply(t) for t in tensors])
            features = self.model.backbone(batch.tensors)
            rois = [
                view.apply_boxes(b, h, w)
                for b, (h, w) in zip(boxes, shapes, strict=True)
            ]
            for name, (pool, head, predictor) in branches.items():
                out = predictor(head(pool(features, rois, batch.image_sizes)))
                if name == "masks":  # the soft mask of each box's own class
                    out = out[torch.arange(len(out)), label].sigmoid()
                    out = view.invert_masks(out)
                else:
                    out = view.invert_heatmaps(out, self.keypoint_flip)
                totals[name] = out if name not in totals else totals[name] + out
        counts = [len(b) for b in boxes]
        return {k: (v / len(self.views)).split(counts) for k, v in totals.items()}

    def _keypoints(
        self, heatmaps: torch.Tensor, boxes: torch.Tensor, factor: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """COCO keypoint triplets (original pixels, ``v = 2``) and their scores."""
        n = len(boxes)
        if n == 0:
            empty = schema.empty_detections(self.num_keypoints)
            return {k: empty[k] for k in (schema.KEYPOINTS, schema.KEYPOINT_SCORES)}
        points, point_scores = heatmaps_to_keypoints(heatmaps, boxes)
        points[..., :2] *= factor[:2]
        points[..., 2] = 2.0  # COCO: labeled and visible
        return {
            schema.KEYPOINTS: points.reshape(n, -1).cpu().numpy(),
            schema.KEYPOINT_SCORES: point_scores.cpu().numpy(),
        }

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        errors = batch[schema.ERROR]
        ok = [i for i, e in enumerate(errors) if not e]
        found = self.predict(
            [batch[schema.IMAGE][i] for i in ok],
            [(int(batch[schema.HEIGHT][i]), int(batch[schema.WIDTH][i])) for i in ok],
        )
        detections = dict(zip(ok, found, strict=True))
        empty = schema.empty_detections(self.num_keypoints)
        rows = [
            {
                **{k: batch[k][i] for k in (schema.PATH, schema.HEIGHT, schema.WIDTH)},
                schema.ERROR: errors[i],
                **empty,  # masks/keypoints too when a batch has no detection at all
                **detections.get(i, {}),
            }
            for i in range(len(errors))
        ]
        table = schema.candidates_table(rows, self.schema)
        for name, column in batch.items():  # e.g. shard and index of the plan
            if name not in table.column_names and name not in _NOT_WRITTEN:
                table = table.append_column(name, pa.array(column))
        return table


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
    the reader and hangs: measured on 2 CPUs, Ray 2.60, a reader that needs CPU tasks
    plus a fixed pool of two 1-CPU actors waits forever) but running torch on all of
    the node's cores:
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


def max_image_size(config: Config) -> int:
    """Longer side images are downscaled to right after decoding."""
    if config.inference.max_image_size is not None:
        return config.inference.max_image_size
    scales = [v.scale for v in config.views if v.scale is not None]
    return max([config.model.max_size, *scales])


def predict_dataset(
    images: Sequence[str] | ray.data.Dataset,
    checkpoint: str,
    views: Sequence[ViewConfig],
    ensemble: EnsembleConfig,
    inference: InferenceConfig,
    max_size: int | None = None,
    keypoint_flip: Sequence[int] | None = None,
    model_stage: type | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of candidates of ``images``: URIs, or a dataset with a
    ``path`` column (other columns pass through). One row per input row.

    ``model_stage`` replaces :class:`Predictor` (same constructor arguments and
    batch contract): ``benchmarks/scale.py`` measures the data plane with a
    detector that returns fixed boxes."""
    pool = plan_pool(inference)
    if not isinstance(images, ray.data.Dataset):
        images = ray.data.from_items([{schema.PATH: p} for p in images])
    ds = images.map_batches(
        load_batch, fn_kwargs={"max_size": max_size}, batch_size=inference.batch_size
    )
    return ds.map_batches(
        model_stage or Predictor,
        fn_constructor_kwargs=dict(
            checkpoint=checkpoint,
            views=list(views),
            ensemble=ensemble,
            score_floor=inference.score_floor,
            num_threads=pool.num_threads,
            keypoint_flip=keypoint_flip,
        ),
        batch_size=inference.batch_size,
        # 4 blocks queued per actor (Ray Data's default 2 left a CPU actor idle
        # between tasks: 924 -> 1,118 images/s per core, benchmarks/scale.py)
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=pool.actors, max_tasks_in_flight_per_actor=4
        ),
        num_gpus=pool.num_gpus,
        num_cpus=1,
    )
