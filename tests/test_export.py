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


def test_masks_and_keypoints_export_as_coco_rle_and_triplets(tmp_path):
    from pycocotools import mask as mask_utils

    from raydd.masks import crop_rle

    square = np.ones((4, 5), bool)  # a 5x4 mask at (2, 3) in a 10x12 image
    rle = crop_rle(square, 2, 3, 10, 12)
    frame = pd.DataFrame(
        [
            {
                schema.PATH: "/u/a.jpg",
                schema.HEIGHT: 10,
                schema.WIDTH: 12,
                schema.ERROR: "",
                schema.BOXES: np.array([[2, 3, 7, 7], [0, 0, 1, 1]], np.float32),
                schema.LABELS: np.array([1, 1]),
                schema.SCORES: np.array([0.9, 0.1], np.float32),
                schema.MASKS: np.array([rle, rle], object),
                schema.KEYPOINTS: np.array(
                    [[2.5, 3.5, 2, 6.5, 6.5, 2], [0, 0, 2, 1, 1, 2]], np.float32
                ),
                schema.KEYPOINT_SCORES: np.array([[3.0, 4.0], [1, 1]], np.float32),
            }
        ]
    )
    categories = Categories((1,), ("digit",))
    dataset = export_coco(
        frame, {1: 0.5}, categories, tmp_path / "p.json", ("left", "right")
    )
    (ann,) = dataset["annotations"]
    assert ann["segmentation"] == {"size": [10, 12], "counts": rle}
    assert ann["area"] == 20
    decoded = mask_utils.decode({"size": [10, 12], "counts": rle.encode()})
    assert decoded.sum() == 20 and decoded[3:7, 2:7].all()
    assert ann["keypoints"] == [2.5, 3.5, 2, 6.5, 6.5, 2] and ann["num_keypoints"] == 2
    assert dataset["categories"][0]["keypoints"] == ["left", "right"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "p.json"))
        results = coco.loadRes(dataset["annotations"])
    assert coco.annToMask(coco.loadAnns(coco.getAnnIds())[0]).sum() == 20
    assert results.loadAnns(results.getAnnIds())[0]["area"] == 20
