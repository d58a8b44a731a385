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
========== ====================== ==================================================

``N`` varies per image and may be 0: the per-image arrays are ragged, so inside a
batch ``boxes``/``labels``/``scores`` are object arrays holding one array per image.
On disk (Parquet) the same columns are plain Arrow lists (:data:`CANDIDATES_SCHEMA`),
readable by pandas or any Parquet reader without Ray.

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


def empty_detections() -> dict[str, np.ndarray]:
    """Detections of an image with no instances: ``(0, 4)`` boxes, ``(0,)`` others."""
    return {
        BOXES: np.zeros((0, 4), np.float32),
        LABELS: np.zeros((0,), np.int64),
        SCORES: np.zeros((0,), np.float32),
    }


def candidates_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Builds a :data:`CANDIDATES_SCHEMA` table from per-image dicts.

    Args:
        rows: one dict per image with every column of the schema; ``boxes`` is a
            float ``[N, 4]`` array, ``labels``/``scores`` are ``[N]`` arrays.
    """
    columns = {name: [row[name] for row in rows] for name in CANDIDATES_SCHEMA.names}
    columns[BOXES] = [
        np.asarray(b, np.float32).reshape(-1, 4).tolist() for b in columns[BOXES]
    ]
    columns[LABELS] = [np.asarray(v, np.int64).tolist() for v in columns[LABELS]]
    columns[SCORES] = [np.asarray(v, np.float32).tolist() for v in columns[SCORES]]
    return pa.table(columns, schema=CANDIDATES_SCHEMA)


def detections_from_row(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """Reads one candidates row (from Parquet via pandas/Ray) back into arrays."""
    boxes = row[BOXES]
    return {
        BOXES: np.array([np.asarray(b, np.float32) for b in boxes], np.float32).reshape(
            -1, 4
        ),
        LABELS: np.asarray(row[LABELS], np.int64).reshape(-1),
        SCORES: np.asarray(row[SCORES], np.float32).reshape(-1),
    }
