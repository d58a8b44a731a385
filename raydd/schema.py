"""The one batch contract every raydd stage reads and writes.

A Ray Data batch is a ``dict[str, np.ndarray]`` with one entry per image:

========== ====================== ==================================================
column     dtype / shape           meaning
========== ====================== ==================================================
``path``   str                     where the image was read from (its identity)
``image``  uint8 ``[H, W, 3]``     decoded RGB pixels, EXIF-rotated (dropped after
                                   inference; never written)
``height`` int64                   height of the original image in pixels
``width``  int64                   width of the original image in pixels
``error``  str                     ``""`` when the image decoded, else the reason
``boxes``  float32 ``[N, 4]``      xyxy, absolute pixels of the *original* image
``labels`` int64 ``[N]``           contiguous labels ``1..K`` (0 is background)
``scores`` float32 ``[N]``         teacher confidence in ``[0, 1]``
``masks``  str ``[N]``             (Mask R-CNN teachers) each instance's mask as the
                                   ``counts`` of a compressed COCO RLE of size
                                   ``[height, width]``
``keypoints`` float32 ``[N, 3K]``  (Keypoint R-CNN teachers) COCO keypoint triplets
                                   ``x, y, v`` in original pixels, ``v = 2``
``keypoint_scores`` f32 ``[N, K]`` the fused heatmaps' score of each keypoint
========== ====================== ==================================================

``N`` varies per image and may be 0: the per-image arrays are ragged, so inside a
batch ``boxes``/``labels``/``scores`` are object arrays holding one array per image.
On disk (Parquet) the same columns are plain Arrow lists (:data:`CANDIDATES_SCHEMA`),
readable by pandas or any Parquet reader without Ray.

``masks`` and ``keypoints``/``keypoint_scores`` are present only when the teacher
predicts them (:func:`candidates_schema`).

Labels are contiguous (torchvision wants ``1..K``); :class:`raydd.data.coco.Categories`
maps them to and from the dataset's COCO category ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

PATH = "path"
IMAGE = "image"
HEIGHT = "height"
WIDTH = "width"
ERROR = "error"
BOXES = "boxes"
LABELS = "labels"
SCORES = "scores"
MASKS = "masks"
KEYPOINTS = "keypoints"
KEYPOINT_SCORES = "keypoint_scores"

CANDIDATES_SCHEMA = pa.schema(
    [
        (PATH, pa.string()),
        (HEIGHT, pa.int64()),
        (WIDTH, pa.int64()),
        (ERROR, pa.string()),
        (BOXES, pa.list_(pa.list_(pa.float32(), 4))),
        (LABELS, pa.list_(pa.int64())),
        (SCORES, pa.list_(pa.float32())),
    ]
)
MASK_FIELDS = [(MASKS, pa.list_(pa.string()))]
KEYPOINT_FIELDS = [
    (KEYPOINTS, pa.list_(pa.list_(pa.float32()))),
    (KEYPOINT_SCORES, pa.list_(pa.list_(pa.float32()))),
]


def candidates_schema(masks: bool = False, keypoints: bool = False) -> pa.Schema:
    """The candidates schema, with the mask / keypoint columns when asked for."""
    fields = list(CANDIDATES_SCHEMA)
    fields += [pa.field(*f) for f in MASK_FIELDS] if masks else []
    fields += [pa.field(*f) for f in KEYPOINT_FIELDS] if keypoints else []
    return pa.schema(fields)


def empty_detections(num_keypoints: int = 0) -> dict[str, np.ndarray]:
    """Detections of an image with no instances: ``(0, 4)`` boxes, ``(0,)`` others.

    Includes empty ``masks`` and ``keypoints``/``keypoint_scores`` (``num_keypoints``
    per instance); :func:`candidates_table` writes only the columns its schema has.
    """
    return {
        BOXES: np.zeros((0, 4), np.float32),
        LABELS: np.zeros((0,), np.int64),
        SCORES: np.zeros((0,), np.float32),
        MASKS: np.zeros((0,), object),
        KEYPOINTS: np.zeros((0, 3 * num_keypoints), np.float32),
        KEYPOINT_SCORES: np.zeros((0, num_keypoints), np.float32),
    }


def candidates_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Builds a candidates table (see :func:`candidates_schema`) from per-image dicts.

    Args:
        rows: one dict per image with every column of ``schema``; ``boxes`` is a
            float ``[N, 4]`` array, ``labels``/``scores``/``masks`` are ``[N]``
            arrays, ``keypoints``/``keypoint_scores`` ``[N, 3K]``/``[N, K]``.
    """
    columns = {name: [row[name] for row in rows] for name in schema.names}
    columns[BOXES] = [
        np.asarray(b, np.float32).reshape(-1, 4).tolist() for b in columns[BOXES]
    ]
    columns[LABELS] = [np.asarray(v, np.int64).tolist() for v in columns[LABELS]]
    columns[SCORES] = [np.asarray(v, np.float32).tolist() for v in columns[SCORES]]
    if MASKS in columns:
        columns[MASKS] = [[str(m) for m in v] for v in columns[MASKS]]
    for name in (KEYPOINTS, KEYPOINT_SCORES):
        if name in columns:
            columns[name] = [np.asarray(v, np.float32).tolist() for v in columns[name]]
    return pa.table(columns, schema=schema)


def detections_from_row(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """Reads one candidates row (from Parquet via pandas/Ray) back into arrays.

    ``masks`` (object array of RLE strings) and ``keypoints``/``keypoint_scores``
    (float32 ``[N, 3K]``/``[N, K]``) are included when the row has them.
    """
    boxes = row[BOXES]
    dets = {
        BOXES: np.array([np.asarray(b, np.float32) for b in boxes], np.float32).reshape(
            -1, 4
        ),
        LABELS: np.asarray(row[LABELS], np.int64).reshape(-1),
        SCORES: np.asarray(row[SCORES], np.float32).reshape(-1),
    }
    n = len(dets[LABELS])
    if MASKS in row:
        dets[MASKS] = np.array(list(row[MASKS]), dtype=object).reshape(n)
    for name in (KEYPOINTS, KEYPOINT_SCORES):
        if name in row:
            rows = [np.asarray(k, np.float32) for k in row[name]]
            # no detection: no row tells K, and reshape(0, -1) is ambiguous
            dets[name] = (
                np.array(rows, np.float32).reshape(n, -1)
                if n
                else (np.zeros((0, 0), np.float32))
            )
    return dets
