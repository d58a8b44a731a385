"""Pseudo-labels as a COCO instances JSON (``raydd export``).

The kept candidates (score at or above their label's threshold) of every readable
unlabeled image become a COCO dataset: ``images`` (ids numbered in path order,
``file_name`` the image's path), ``annotations`` (``bbox`` xywh, ``score``, COCO
category ids; ``segmentation`` as compressed RLE when the teacher predicts masks;
``keypoints``/``num_keypoints`` when it predicts keypoints) and the labeled set's
``categories`` (with their ``keypoints`` names). It trains any COCO-reading detector,
and its ``annotations`` load with pycocotools' ``loadRes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from pycocotools import mask as mask_utils

from raydd import schema
from raydd.data.coco import Categories
from raydd.evaluate import result_dicts
from raydd.threshold import above_thresholds


def pseudo_label_coco(
    candidates: pd.DataFrame,
    thresholds: dict[int, float],
    categories: Categories,
    keypoint_names: tuple[str, ...] = (),
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
        size = [int(row[schema.HEIGHT]), int(row[schema.WIDTH])]
        for i, ann in enumerate(result_dicts(kept, image_id, categories)):
            ann = {"id": len(annotations) + 1, **ann, "iscrowd": 0}
            ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            if schema.MASKS in kept:
                rle = {"size": size, "counts": str(kept[schema.MASKS][i])}
                ann["segmentation"] = rle
                ann["area"] = int(
                    mask_utils.area({**rle, "counts": rle["counts"].encode()})
                )
            if schema.KEYPOINTS in kept:
                points = kept[schema.KEYPOINTS][i]
                ann["keypoints"] = [round(float(v), 2) for v in points]
                ann["num_keypoints"] = len(points) // 3
            annotations.append(ann)
    cats = [
        {
            "id": i,
            "name": n,
            **({"keypoints": list(keypoint_names)} if keypoint_names else {}),
        }
        for i, n in zip(categories.ids, categories.names, strict=True)
    ]
    return {"images": images, "annotations": annotations, "categories": cats}


def export_coco(
    candidates: pd.DataFrame,
    thresholds: dict[int, float],
    categories: Categories,
    path: str | Path,
    keypoint_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Writes :func:`pseudo_label_coco` to ``path``; returns the dataset dict."""
    dataset = pseudo_label_coco(candidates, thresholds, categories, keypoint_names)
    Path(path).write_text(json.dumps(dataset))
    return dataset
