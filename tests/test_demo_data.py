import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from raydd.data.demo import DemoSizes, write_demo_dataset


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
