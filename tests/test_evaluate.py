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


# --- a hand-made COCO whose AP is known -------------------------------------------

# COCO interpolates precision at 101 recall points (0, 0.01, ..., 1): when only one
# of two objects is found, at full precision, 51 of them (recall <= 0.5) score 1.
HALF_FOUND = 51 / 101


def _two_objects():
    """Two 200x200 images, one 100x100 object each, of category id 7 (label 1)."""
    objects = {1: [10, 10, 100, 100], 2: [50, 60, 100, 100]}  # xywh
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": i, "file_name": f"{i}.png", "height": 200, "width": 200}
            for i in objects
        ],
        "annotations": [
            {
                "id": i,
                "image_id": i,
                "category_id": 7,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for i, box in objects.items()
        ],
        "categories": [{"id": 7, "name": "seven"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, Categories.from_coco(coco)


def _score(detections: dict[int, list[tuple[list[float], float]]]) -> dict:
    """AP of ``{image id: [(xyxy box, score), ...]}``, all of label 1."""
    coco, categories = _two_objects()
    frame = pd.DataFrame(
        [
            {
                schema.PATH: f"images/{image}.png",
                schema.BOXES: np.array([b for b, _ in dets], np.float32).reshape(-1, 4),
                schema.LABELS: np.ones(len(dets), np.int64),
                schema.SCORES: np.array([s for _, s in dets], np.float32),
            }
            for image, dets in detections.items()
        ]
    )
    return coco_metrics(coco, coco_results(frame, coco, "images", categories))


EXACT = {1: ([10, 10, 110, 110], 0.9), 2: ([50, 60, 150, 160], 0.8)}


@pytest.mark.parametrize(
    "detections,expected",
    [
        # both objects, exactly
        ({1: [EXACT[1]], 2: [EXACT[2]]}, (1.0, 1.0, 1.0)),
        # one of the two missed
        ({1: [EXACT[1]], 2: []}, (HALF_FOUND,) * 3),
        # a miss scored above the hit: precision 1/2 up to recall 1/2
        ({1: [([150, 150, 190, 190], 0.95), EXACT[1]], 2: []}, (HALF_FOUND / 2,) * 3),
        # the second box overlaps its object at IoU 0.68: a hit at the IoU
        # thresholds 0.50-0.65 (4 of 10), a miss at 0.70-0.95 (6 of 10)
        (
            {1: [EXACT[1]], 2: [([50, 60, 150, 128], 0.8)]},
            (0.4 + 0.6 * HALF_FOUND, 1.0, HALF_FOUND),
        ),
    ],
    ids=["perfect", "one-missed", "miss-above-hit", "loose-box"],
)
def test_ap_of_known_detections(detections, expected):
    metrics = _score(detections)
    assert (metrics["AP"], metrics["AP50"], metrics["AP75"]) == pytest.approx(expected)


def test_the_in_training_evaluation_scores_like_the_pipeline(
    ray_local, demo_dir, weights, tmp_path
):
    """evaluate_model (a training worker, in process) and evaluate_checkpoint (Ray
    Data actors) run the same Predictor: the same AP on the same model."""
    import torch
    from conftest import TINY_MODEL

    from raydd.checkpoint import load_detector, save_detector
    from raydd.config import EnsembleConfig, InferenceConfig, ModelConfig, ViewConfig
    from raydd.data.coco import Categories, image_paths, load_coco
    from raydd.data.images import load_rgb
    from raydd.evaluate import evaluate_checkpoint, evaluate_model
    from raydd.inference import Predictor, predict_dataset
    from raydd.models import build_model

    torch.manual_seed(0)
    split = CocoSplit(str(demo_dir / "test.json"), str(demo_dir / "test"))
    categories = Categories.from_coco(load_coco(split.annotations))
    config = ModelConfig(backbone_weights=weights, **TINY_MODEL)
    model = build_model(config, num_classes=categories.num_classes)
    save_detector(tmp_path, model, config, categories)
    view = ViewConfig(scale=160)
    piped = evaluate_checkpoint(
        str(tmp_path), split, [view], EnsembleConfig(), InferenceConfig(batch_size=2)
    )
    loaded, _ = load_detector(tmp_path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    in_process = evaluate_model(loaded, split, categories, view)
    assert in_process == pytest.approx(piped, abs=1e-6)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())
    # the same boxes, not just the same (near-zero, untrained) AP
    paths = image_paths(split)[:2]
    frame = predict_dataset(
        paths, str(tmp_path), [view], EnsembleConfig(), InferenceConfig()
    ).to_pandas()
    ours = Predictor.from_model(loaded, [view], EnsembleConfig()).predict(
        [load_rgb(p) for p in paths]
    )
    for path, dets in zip(paths, ours, strict=True):
        row = frame[frame[schema.PATH] == path].iloc[0]
        assert len(dets[schema.BOXES]) > 0
        np.testing.assert_allclose(
            schema.detections_from_row(row)[schema.BOXES], dets[schema.BOXES], atol=1e-3
        )
