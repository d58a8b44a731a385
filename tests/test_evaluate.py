import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raydd import schema
from raydd.config import CocoSplit
from raydd.data.coco import Categories, coco_records, load_coco
from raydd.evaluate import coco_metrics, coco_results


def noisy_predictions(demo_dir, seed=0) -> pd.DataFrame:
    """Ground truth with jittered boxes, random scores, some misses, some false hits."""
    rng = np.random.default_rng(seed)
    split = CocoSplit(str(demo_dir / "test.json"), str(demo_dir / "test"))
    categories = Categories.from_coco(load_coco(split.annotations))
    rows = []
    for record in coco_records(split, categories):
        keep = rng.random(len(record.labels)) > 0.2
        boxes = record.boxes[keep] + rng.normal(0, 2, (keep.sum(), 4))
        labels = record.labels[keep]
        fake = rng.uniform(0, 90, (2, 2))
        boxes = np.concatenate([boxes, np.hstack([fake, fake + 30])]).astype(np.float32)
        labels = np.concatenate([labels, rng.integers(1, 11, 2)])
        rows.append(
            {
                schema.PATH: record.path,
                schema.BOXES: boxes,
                schema.LABELS: labels,
                schema.SCORES: rng.random(len(labels)).astype(np.float32),
            }
        )
    return pd.DataFrame(rows), split, categories


def test_metrics_equal_a_direct_pycocotools_run(demo_dir, tmp_path):
    frame, split, categories = noisy_predictions(demo_dir)
    coco = load_coco(split.annotations)
    results = coco_results(frame, coco, split.images, categories)
    ours = coco_metrics(coco, results)

    # the same predictions through a results file and pycocotools alone
    (tmp_path / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(split.annotations)
        direct = COCOeval(gt, gt.loadRes(str(tmp_path / "results.json")), "bbox")
        direct.evaluate(), direct.accumulate(), direct.summarize()
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == pytest.approx(direct.stats[:3])
    assert 0.2 < ours["AP50"] < 1.0


def test_perfect_predictions_score_one(demo_dir):
    split = CocoSplit(str(demo_dir / "test.json"), str(demo_dir / "test"))
    categories = Categories.from_coco(load_coco(split.annotations))
    frame = pd.DataFrame(
        [
            {
                schema.PATH: r.path,
                schema.BOXES: r.boxes,
                schema.LABELS: r.labels,
                schema.SCORES: np.ones(len(r.labels), np.float32),
            }
            for r in coco_records(split, categories)
        ]
    )
    coco = load_coco(split.annotations)
    assert coco_metrics(coco, coco_results(frame, coco, split.images, categories)) == {
        "AP": pytest.approx(1.0),
        "AP50": pytest.approx(1.0),
        "AP75": pytest.approx(1.0),
    }


def test_no_detections_score_zero(demo_dir):
    coco = load_coco(str(demo_dir / "test.json"))
    assert coco_metrics(coco, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_categories_map_non_contiguous_ids():
    coco = COCO()
    coco.dataset = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": 7, "name": "b"},
            {"id": 3, "name": "a"},
            {"id": 90, "name": "c"},
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    cats = Categories.from_coco(coco)
    assert cats.ids == (3, 7, 90) and cats.num_classes == 4
    assert [cats.to_label(i) for i in (3, 7, 90)] == [1, 2, 3]
    assert [cats.to_category(label) for label in (1, 2, 3)] == [3, 7, 90]
