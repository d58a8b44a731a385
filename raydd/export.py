"""Pseudo-labels as a COCO instances JSON (``raydd export``).

The kept candidates (score at or above their label's threshold) of every readable
unlabeled image become a COCO dataset: ``images`` (ids numbered in path order,
``file_name`` the image's path), ``annotations`` (``bbox`` xywh, ``score``, COCO
category ids) and the labeled set's ``categories``. It trains any COCO-reading
detector, and its ``annotations`` load with pycocotools' ``loadRes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from raydd import schema
from raydd.data.coco import Categories
from raydd.evaluate import result_dicts
from raydd.threshold import above_thresholds

EXPORT_FILE = "pseudo_labels.json"


def pseudo_label_coco(
    candidates: pd.DataFrame, thresholds: dict[int, float], categories: Categories
) -> dict[str, Any]:
    """The COCO dataset dict of the pseudo-labels (see the module docstring)."""
    images, annotations = [], []
    readable = candidates[candidates[schema.ERROR] == ""]
    for image_id, row in enumerate(readable.to_dict("records"), start=1):
        images.append(
            {
                "id": image_id,
                "file_name": row[schema.PATH],
                "height": int(row[schema.HEIGHT]),
                "width": int(row[schema.WIDTH]),
            }
        )
        dets = schema.detections_from_row(row)
        keep = above_thresholds(dets, thresholds)
        kept = {k: v[keep] for k, v in dets.items()}
        for ann in result_dicts(kept, image_id, categories):
            w, h = ann["bbox"][2:]
            annotations.append(
                {"id": len(annotations) + 1, **ann, "area": w * h, "iscrowd": 0}
            )
    cats = [
        {"id": i, "name": n}
        for i, n in zip(categories.ids, categories.names, strict=True)
    ]
    return {"images": images, "annotations": annotations, "categories": cats}


def export_coco(
    candidates: pd.DataFrame,
    thresholds: dict[int, float],
    categories: Categories,
    path: str | Path,
) -> dict[str, Any]:
    """Writes :func:`pseudo_label_coco` to ``path``; returns the dataset dict."""
    dataset = pseudo_label_coco(candidates, thresholds, categories)
    Path(path).write_text(json.dumps(dataset))
    return dataset
