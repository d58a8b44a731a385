import contextlib
import io

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from raydd import schema
from raydd.data.coco import Categories
from raydd.export import export_coco


def test_pseudo_labels_load_with_pycocotools(tmp_path):
    categories = Categories((3, 7), ("cat", "dog"))
    frame = pd.DataFrame(
        [
            {
                schema.PATH: "/u/a.jpg",
                schema.HEIGHT: 40,
                schema.WIDTH: 60,
                schema.ERROR: "",
                schema.BOXES: np.array(
                    [[0, 0, 10, 20], [5, 5, 25, 15], [1, 1, 2, 2]], np.float32
                ),
                schema.LABELS: np.array([1, 2, 2]),
                schema.SCORES: np.array([0.9, 0.6, 0.3], np.float32),
            },
            {
                schema.PATH: "/u/b.jpg",
                schema.HEIGHT: 30,
                schema.WIDTH: 30,
                schema.ERROR: "",
                schema.BOXES: np.zeros((0, 4), np.float32),
                schema.LABELS: np.zeros(0, np.int64),
                schema.SCORES: np.zeros(0, np.float32),
            },
            {
                schema.PATH: "/u/bad.jpg",
                schema.HEIGHT: 0,
                schema.WIDTH: 0,
                schema.ERROR: "OSError: truncated",
                schema.BOXES: np.zeros((0, 4), np.float32),
                schema.LABELS: np.zeros(0, np.int64),
                schema.SCORES: np.zeros(0, np.float32),
            },
        ]
    )
    # label 1 (cat) needs 0.5, label 2 (dog) 0.5: the 0.3 dog is dropped
    dataset = export_coco(frame, {1: 0.5, 2: 0.5}, categories, tmp_path / "p.json")
    assert [i["file_name"] for i in dataset["images"]] == ["/u/a.jpg", "/u/b.jpg"]
    assert [(a["category_id"], a["bbox"]) for a in dataset["annotations"]] == [
        (3, [0, 0, 10, 20]),
        (7, [5, 5, 20, 10]),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "p.json"))
        results = coco.loadRes(dataset["annotations"])
    assert coco.getCatIds() == [3, 7] and len(coco.getAnnIds()) == 2
    assert results.loadAnns(results.getAnnIds(imgIds=[1]))[0]["score"] == np.float32(
        0.9
    )
    assert results.getAnnIds(imgIds=[2]) == []  # an image with zero pseudo-labels
