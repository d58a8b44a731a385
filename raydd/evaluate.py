"""COCO evaluation (pycocotools) of a detector checkpoint on the test split.

Predictions come from the same inference code as pseudo-labeling
(:mod:`raydd.inference`), with one view (the plain teacher or student) or all views
fused (the teacher with views).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from raydd import schema, storage
from raydd.checkpoint import read_metadata
from raydd.config import CocoSplit, EnsembleConfig, InferenceConfig, ViewConfig
from raydd.data.coco import Categories, image_location, image_paths, load_coco
from raydd.data.images import load_rgb
from raydd.inference import Predictor, predict_dataset
from raydd.layout import METRICS


def result_dicts(
    dets: dict[str, np.ndarray], image_id: int, categories: Categories
) -> list[dict[str, Any]]:
    """One image's detections as COCO result dicts (xywh, COCO category ids)."""
    xywh = box_convert(torch.from_numpy(dets[schema.BOXES]), "xyxy", "xywh").tolist()
    return [
        {
            "image_id": image_id,
            "bbox": [round(v, 2) for v in box],
            "category_id": categories.to_category(int(label)),
            "score": float(score),
        }
        for box, label, score in zip(
            xywh, dets[schema.LABELS], dets[schema.SCORES], strict=True
        )
    ]


def coco_results(
    predictions: pd.DataFrame, coco: COCO, images_dir: str, categories: Categories
) -> list[dict[str, Any]]:
    """Candidates rows of ``coco``'s images -> COCO result dicts for ``loadRes``."""
    by_path = {
        storage.join(images_dir, img["file_name"]): img["id"]
        for img in coco.dataset["images"]
    }
    results = []
    for row in predictions.to_dict("records"):
        image_id = by_path[row[schema.PATH]]
        results += result_dicts(schema.detections_from_row(row), image_id, categories)
    return results


def coco_metrics(coco: COCO, results: list[dict[str, Any]]) -> dict[str, float]:
    """AP, AP50 and AP75 (COCO's 0-1 scale) of ``results`` against ``coco``."""
    if not results:  # loadRes rejects an empty list; nothing detected scores zero
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats[:3], 0.0)  # -1 means "no ground truth"
    return {name: float(v) for name, v in zip(METRICS, stats, strict=True)}


def evaluate_checkpoint(
    checkpoint: str,
    split: CocoSplit,
    views: Sequence[ViewConfig],
    ensemble: EnsembleConfig,
    inference: InferenceConfig,
) -> dict[str, float]:
    """Runs ``checkpoint`` on every test image (through Ray Data) and scores it."""
    coco = load_coco(split.annotations)
    meta = read_metadata(checkpoint)["categories"]
    categories = Categories(tuple(meta["ids"]), tuple(meta["names"]))
    paths = image_paths(split)
    frame = predict_dataset(paths, checkpoint, views, ensemble, inference).to_pandas()
    return coco_metrics(coco, coco_results(frame, coco, split.images, categories))


def evaluate_model(
    model: torch.nn.Module,
    split: CocoSplit,
    categories: Categories,
    view: ViewConfig | None = None,
    max_detections: int = 100,
    batch_size: int = 8,
) -> dict[str, float]:
    """COCO AP of an in-memory detector on ``split``, in this process.

    Used at the evaluation points of a training run (rank 0 of Ray Train), where
    starting a Ray Data pipeline per evaluation would cost more than the images.
    Scores like :func:`evaluate_checkpoint` with one view, through the same
    :class:`~raydd.inference.Predictor` (on a copy of the model, which is left
    untouched): permissive (no score filter, up to ``max_detections``), each image
    seen through ``view`` (default: as it is), boxes mapped back.
    """
    predictor = Predictor.from_model(
        model, [view or ViewConfig()], EnsembleConfig(max_detections=max_detections)
    )
    coco = load_coco(split.annotations)
    infos = coco.dataset["images"]
    results = []
    for start in range(0, len(infos), batch_size):
        chunk = infos[start : start + batch_size]
        images = [load_rgb(image_location(split, i["file_name"])) for i in chunk]
        for info, dets in zip(chunk, predictor.predict(images), strict=True):
            results += result_dicts(dets, info["id"], categories)
    return coco_metrics(coco, results)
