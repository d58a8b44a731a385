import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raydd import schema
from raydd.config import ThresholdConfig
from raydd.data.coco import Record
from raydd.threshold import (
    BINS,
    bin_edges,
    evaluate_threshold,
    format_thresholds,
    histograms,
    match_ground_truth,
    plot_thresholds,
    score_histograms,
    search_threshold,
    thresholds_by_label,
)

GRID = ThresholdConfig(search="grid", num_samples=11)  # 0.0, 0.1, ..., 1.0


def candidates(images: list[list[tuple[float, int]]], errors: int = 0) -> pd.DataFrame:
    """One row per image from (score, label) pairs; boxes are unit squares."""
    rows = [
        {
            schema.PATH: f"img{i}.png",
            schema.ERROR: "",
            schema.SCORES: np.array([s for s, _ in dets], np.float32),
            schema.LABELS: np.array([c for _, c in dets], np.int64),
            schema.BOXES: np.tile([0.0, 0, 1, 1], (len(dets), 1)).astype(np.float32),
        }
        for i, dets in enumerate(images)
    ]
    rows += [
        {
            schema.PATH: f"bad{i}.png",
            schema.ERROR: "OSError: truncated",
            schema.SCORES: np.zeros(0, np.float32),
            schema.LABELS: np.zeros(0, np.int64),
            schema.BOXES: np.zeros((0, 4), np.float32),
        }
        for i in range(errors)
    ]
    return pd.DataFrame(rows)


def test_a_trial_counts_per_class_at_or_above_the_threshold(ray_local):
    frame = candidates([[(0.1, 1), (0.5, 1), (0.5, 2)], [(0.9, 2)]], 1)
    found = score_histograms(frame, 3)
    assert found.num_images == 2  # the unreadable image does not count
    metrics = evaluate_threshold(found, 0.5, np.array([0.0, 1.0, 0.5]))
    assert metrics["instances_per_image"] == 1.5
    assert metrics["gap"] == 0.0
    assert metrics["gap_1"] == pytest.approx(0.5)  # 0.5 kept per image vs 1.0 labeled
    assert metrics["gap_2"] == pytest.approx(0.5)  # 1.0 vs 0.5


def random_scores(
    rng: np.random.Generator, images: int = 60, classes: int = 3
) -> list[list[tuple[float, int]]]:
    """Scores on a 1e-3 grid (many ties; 0 and 1 included), labels ``1..classes``;
    the first images have no candidates."""
    sizes = rng.integers(0, 30, images)
    sizes[:4] = 0
    scores = np.round(rng.random(sizes.sum()), 3)
    scores[:2] = 0.0, 1.0
    pairs = list(zip(scores, rng.integers(1, classes + 1, len(scores)), strict=True))
    return [
        pairs[end - k : end] for k, end in zip(sizes, np.cumsum(sizes), strict=True)
    ]


def test_score_histograms_match_numpy_per_class(ray_local, tmp_path):
    frame = candidates(random_scores(np.random.default_rng(1)), errors=3)
    ok = frame[schema.ERROR] == ""  # candidates of unreadable images are ignored
    for column, junk in ((schema.SCORES, 0.5), (schema.LABELS, 1)):
        frame[column] = [
            v if k else np.full(2, junk, v.dtype)
            for v, k in zip(frame[column], ok, strict=True)
        ]
    columns = [schema.PATH, schema.ERROR, schema.SCORES, schema.LABELS]
    for part in range(2):  # two Parquet shards, as step 2 writes them
        frame.iloc[part::2][columns].to_parquet(tmp_path / f"part{part}.parquet")
    found = score_histograms(ray_local.data.read_parquet(str(tmp_path)), 4)
    assert found.num_images == 60 and found.counts.shape == (4, BINS + 1)
    scores = np.concatenate(list(frame[schema.SCORES][ok]))
    labels = np.concatenate(list(frame[schema.LABELS][ok]))
    edges = np.append(bin_edges(), np.inf)  # the last bin: scores of exactly 1
    for label in range(4):
        expected, _ = np.histogram(scores[labels == label], edges)
        np.testing.assert_array_equal(found.counts[label], expected)


def exact_choice(scores: np.ndarray, images: int, target: float) -> float:
    """Brute force over every threshold: the lowest one whose count of scores at or
    above it is closest to ``target`` per image (each count is first reached at 0 or
    just above a score)."""
    starts = np.append(np.float32(0), np.nextafter(np.unique(scores), np.float32(2)))
    kept = (scores >= starts[:, None]).sum(axis=1)
    return float(starts[np.argmin(np.abs(kept / images - target))])


def test_histogram_threshold_is_the_exact_one_within_a_bin():
    rng = np.random.default_rng(0)
    dets = [d for image in random_scores(rng, 80) for d in image]
    scores = np.array([s for s, _ in dets], np.float32)
    labels = np.array([c for _, c in dets])
    found = histograms(scores, labels, 80, 4)
    targets = np.append(0.0, 0.4 * np.bincount(labels)[1:] / 80)
    # the histogram search over every bin edge, ties to the lowest
    trials = pd.DataFrame(
        [evaluate_threshold(found, float(t), targets) for t in bin_edges()]
    )
    for gap, keep, target in [
        ("gap", labels > 0, targets.sum()),
        *((f"gap_{c}", labels == c, targets[c]) for c in (1, 2, 3)),
    ]:
        chosen = trials.loc[trials[gap].idxmin(), "threshold"]
        assert abs(chosen - exact_choice(scores[keep], 80, target)) <= 1 / BINS

    # a threshold on a bin edge (every grid point) is counted exactly; any other
    # as if it were the next edge up
    for t in [*np.round(np.linspace(0, 1, 41), 6), *rng.random(20)]:
        up = bin_edges()[np.searchsorted(bin_edges(), np.float32(t))]
        exact = np.bincount(labels[scores >= up], minlength=4)
        np.testing.assert_array_equal(found.kept(t), exact)
        if t == round(t, 4):
            assert up == np.float32(t)
            assert evaluate_threshold(found, t, targets)["instances_per_image"] == (
                np.count_nonzero(scores >= np.float32(t)) / 80
            )


def test_global_search_finds_the_analytic_threshold(ray_local, tmp_path):
    # Exactly 2 instances per image remain for t in (0.55, 0.70]; the lowest grid
    # point there is 0.6.
    scores = [[0.95, 0.7, 0.3], [0.9, 0.8, 0.55, 0.1], [0.99, 0.75], [0.72, 0.71, 0.2]]
    frame = candidates([[(s, 1) for s in image] for image in scores], errors=2)
    dataset = ray_local.data.from_pandas(frame.drop(columns=schema.BOXES))
    result, trials = search_threshold(dataset, np.array([0.0, 2.0]), GRID, tmp_path)
    assert result.threshold == pytest.approx(0.6)
    assert result.pseudo_instances_per_image == 2.0
    assert result.trials == len(trials) == 11
    assert list((tmp_path / "threshold").rglob("events.out.tfevents*"))


def test_per_class_search_matches_each_class_rate(ray_local, tmp_path):
    # Class 1 is confident (0.85, 0.95), class 2 is not (0.35, 0.45), each with a
    # 0.05 noise candidate; the labeled set has 2 of each per image. Per class, the
    # lowest grid point keeping exactly 2 per image is 0.1 (0.0 keeps the noise).
    image = [(0.95, 1), (0.85, 1), (0.45, 2), (0.35, 2), (0.05, 1), (0.05, 2)]
    frame = candidates([image] * 4)
    targets = np.array([0.0, 2.0, 2.0, 0.5])  # class 3: labeled, never predicted
    result, _ = search_threshold(frame, targets, GRID, tmp_path)
    assert result.per_class == {
        "1": pytest.approx(0.1),
        "2": pytest.approx(0.1),
        "3": pytest.approx(0.0),
    }
    # the global heuristic: 4.5 per image wanted, 4 is the closest reachable at t>=0.1
    assert result.threshold == pytest.approx(0.1)
    assert thresholds_by_label(result, per_class=False) == {1: 0.1, 2: 0.1, 3: 0.1}

    targets = np.array([0.0, 2.0, 1.0, 0.5])  # now class 2 wants only its best one
    result, _ = search_threshold(frame, targets, GRID, tmp_path / "b")
    assert result.per_class["2"] == pytest.approx(0.4)
    assert result.per_class["1"] == pytest.approx(0.1)


def test_precision_and_recall_against_ground_truth():
    truth = [
        Record(
            "img0.png",
            np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
            np.array([1, 1]),
        )
    ]
    frame = pd.DataFrame(
        [
            {
                schema.PATH: "img0.png",
                schema.ERROR: "",
                schema.BOXES: np.array(
                    [
                        [0, 0, 10, 10],
                        [0, 0, 10, 10],
                        [20, 20, 30, 31],
                        [50, 50, 60, 60],
                    ],
                    np.float32,
                ),
                schema.SCORES: np.array([0.9, 0.8, 0.6, 0.7], np.float32),
                schema.LABELS: np.array([1, 1, 1, 1]),
            }
        ]
    )
    table = match_ground_truth(frame, truth)
    # 0.9 matches box 0; 0.8 is a duplicate of it; 0.6 matches box 1; 0.7 hits nothing
    assert table.is_tp.tolist() == [True, False, True, False]
    assert table.num_gt == 2
    found = histograms(table.scores, table.labels, table.num_images, 2)
    at = {
        t: evaluate_threshold(found, t, np.array([0.0, 1.0]), table)
        for t in (0.5, 0.85)
    }
    assert (at[0.5]["precision"], at[0.5]["recall"]) == (0.5, 1.0)
    assert (at[0.85]["precision"], at[0.85]["recall"]) == (1.0, 0.5)
    assert at[0.85]["f1"] == pytest.approx(2 / 3)


def test_optuna_search_gets_close(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    frame = candidates([[(s, 1) for s in rng.random(20)] for _ in range(50)])
    cfg = ThresholdConfig(search="optuna", num_samples=12)
    result, _ = search_threshold(frame, np.array([0.0, 5.0]), cfg, tmp_path)
    # 20 uniform scores per image: 5 per image above t = 0.75
    assert result.threshold == pytest.approx(0.75, abs=0.08)


def test_no_candidates_at_all(ray_local, tmp_path):
    frame = candidates([[], []])
    cfg = ThresholdConfig(num_samples=3)
    result, _ = search_threshold(frame, np.array([0.0, 3.0]), cfg, tmp_path)
    assert result.pseudo_instances_per_image == 0.0 and result.threshold == 0.0


def test_plot_marks_the_chosen_threshold(ray_local, tmp_path):
    truth = [
        Record(f"img{i}.png", np.array([[0, 0, 1, 1]], np.float32), np.array([1]))
        for i in range(3)
    ]
    frame = candidates([[(0.9, 1), (0.4, 1)]] * 3)
    validation = match_ground_truth(frame, truth)
    result, trials = search_threshold(
        frame, np.array([0.0, 1.0]), GRID, tmp_path, validation
    )
    assert result.threshold == pytest.approx(0.5)
    assert (result.precision, result.recall) == (1.0, 1.0)
    assert result.per_class_quality == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    path = plot_thresholds(trials, result, tmp_path / "thresholds.png")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    assert red.sum() > 30  # the chosen point's star
    found = score_histograms(frame, 2)
    text = format_thresholds(result, np.array([0.0, 1.0]), found, ["one"])
    assert "global threshold: precision 1.000, recall 1.000" in text
    assert (
        "per-class thresholds: precision 1.000, recall 1.000" in text and "one" in text
    )


def test_empty_histograms_are_harmless():
    empty = histograms(np.zeros(0, np.float32), np.zeros(0, np.int64), 0, 2)
    assert evaluate_threshold(empty, 0.5, np.array([0.0, 1.0]))["gap"] == 1.0


def test_per_class_thresholds_pick_the_students_pseudo_labels(ray_local):
    """{1: 0.3, 2: 0.8}: class 1 keeps scores >= 0.3, class 2 >= 0.8, class 3 (no
    threshold) nothing; the kept boxes, masks and keypoints are those of the
    student's training rows."""
    from raydd.ingest import records_dataset
    from raydd.student import pseudo_records

    found = [(0.29, 1), (0.3, 1), (0.9, 1), (0.79, 2), (0.8, 2), (0.95, 3)]
    frame = candidates([found, [(0.5, 2)]], errors=1)
    n = len(found)
    frame.at[0, schema.BOXES] = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    frame[schema.MASKS] = [
        np.array([f"m{i}" for i in range(len(s))]) for s in frame[schema.SCORES]
    ]
    frame[schema.KEYPOINTS] = [
        np.full((len(s), 3), np.arange(len(s))[:, None], np.float32)
        for s in frame[schema.SCORES]
    ]
    frame[schema.HEIGHT], frame[schema.WIDTH] = 64, 96
    records = pseudo_records(frame, {1: 0.3, 2: 0.8})
    kept = [1, 2, 4]  # 0.3 and 0.9 of class 1, 0.8 of class 2
    # the unreadable image is left out; images left without boxes stay (background)
    assert [r.path for r in records] == ["img0.png", "img1.png"]
    assert records[0].labels.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(records[0].boxes, frame.at[0, schema.BOXES][kept])
    assert records[0].masks.tolist() == [f"m{i}" for i in kept]
    assert records[0].keypoints[:, 0].tolist() == kept
    assert len(records[1].labels) == 0 and records[1].boxes.shape == (0, 4)
    assert records[1].keypoints.shape == (0, 3) and len(records[1].masks) == 0
    assert (records[0].height, records[0].width) == (64, 96)

    rows = {r[schema.PATH]: r for r in records_dataset(records).take_all()}
    assert rows["img0.png"][schema.LABELS].tolist() == [1, 1, 2]
    np.testing.assert_array_equal(rows["img0.png"][schema.BOXES], records[0].boxes)
    assert list(rows["img0.png"][schema.MASKS]) == ["m1", "m2", "m4"]
    assert len(rows["img1.png"][schema.LABELS]) == 0


def test_keypoint_candidates_of_an_image_without_detections():
    from raydd.student import pseudo_records

    frame = candidates([[]])
    frame[schema.HEIGHT], frame[schema.WIDTH] = 64, 96
    frame[schema.KEYPOINTS] = [np.zeros((0, 12), np.float32)]
    (record,) = pseudo_records(frame, {1: 0.5})
    assert len(record.labels) == 0 and len(record.keypoints) == 0
