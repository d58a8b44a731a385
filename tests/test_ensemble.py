import math
import warnings

import numpy as np
import pytest
import torch

from raydd.config import ConfigError, EnsembleConfig
from raydd.ensemble import FUSION_METHODS, check_method, fuse

SIZE = np.array([640, 480, 640, 480], dtype=np.float32)  # W, H, W, H of every image


def one_image(boxes, scores, labels, method, **config):
    n = len(scores)
    out = fuse(
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels),
        torch.zeros(n, dtype=torch.int64),
        EnsembleConfig(method=method, **config),
        num_views=2,
    )
    assert out[3].tolist() == [0] * len(out[3])
    return out[:3]


def views_of_images(rng, images, views=8, per_view=30, labels=4):
    """Per image, a list of views' (boxes, scores, labels): boxes jittered around a
    few objects, mostly with the object's label."""
    data = []
    for _ in range(images):
        k = int(rng.integers(3, 8))
        centre = rng.uniform([50, 50], [590, 430], (k, 2))
        half = rng.uniform(10, 75, (k, 2))
        label = rng.integers(0, labels, k)
        per_image = []
        for _ in range(views):
            obj = rng.integers(0, k, per_view)
            jitter = 1 + rng.normal(0, 0.1, (per_view, 4))
            lo = centre[obj] - half[obj] * jitter[:, :2]
            hi = centre[obj] + half[obj] * jitter[:, 2:]
            box = np.concatenate([lo, hi], 1).clip(0, SIZE).astype(np.float32)
            lab = np.where(
                rng.random(per_view) < 0.8,
                label[obj],
                rng.integers(0, labels, per_view),
            )
            per_image.append((box, rng.random(per_view).astype(np.float32), lab))
        data.append(per_image)
    return data


def batch_of(data):
    """The union of every view of every image, as ``fuse`` takes it."""
    flat = [(i, *view) for i, image in enumerate(data) for view in image]
    return (
        torch.tensor(np.concatenate([b for _, b, _, _ in flat])),
        torch.tensor(np.concatenate([s for _, _, s, _ in flat])),
        torch.tensor(np.concatenate([lab for _, _, _, lab in flat])),
        torch.tensor(np.concatenate([np.full(len(s), i) for i, _, s, _ in flat])),
    )


def rows(boxes, scores, labels):
    """``[n, 6]`` (label, score, normalised box), sorted by label then score."""
    table = np.concatenate(
        [
            np.asarray(labels, np.float64)[:, None],
            np.asarray(scores, np.float64)[:, None],
            np.asarray(boxes, np.float64).reshape(-1, 4),
        ],
        1,
    )
    return table[np.lexsort((-table[:, 1], table[:, 0]))]


def reference(method, image, config):
    """``ensemble-boxes`` on one image's views, boxes normalised to [0, 1]."""
    ensemble_boxes = pytest.importorskip("ensemble_boxes")
    args = (
        [b / SIZE for b, _, _ in image],
        [s for _, s, _ in image],
        [lab for _, _, lab in image],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "wbf":
            return ensemble_boxes.weighted_boxes_fusion(
                *args, iou_thr=config.wbf_iou, skip_box_thr=0.0, conf_type="avg"
            )
        if method == "nms":
            return ensemble_boxes.nms(*args, iou_thr=config.nms_iou)
        return ensemble_boxes.soft_nms(
            *args, sigma=config.soft_nms_sigma, thresh=config.soft_nms_min_score
        )


def test_box_voting_merges_overlapping_same_class_boxes():
    boxes, scores, labels = one_image(
        [[10.0, 10, 50, 50], [12, 10, 52, 50], [100, 100, 140, 140]],
        [0.9, 0.3, 0.8],
        [1, 1, 1],
        "box_voting",
    )
    assert boxes.shape == (2, 4)
    # score-weighted mean of the two overlapping boxes: x0 = (0.9*10 + 0.3*12) / 1.2
    torch.testing.assert_close(boxes[0], torch.tensor([10.5, 10, 50.5, 50]))
    torch.testing.assert_close(boxes[1], torch.tensor([100.0, 100, 140, 140]))
    assert scores.tolist() == pytest.approx([0.9, 0.8])
    assert labels.tolist() == [1, 1]


def test_box_voting_ignores_boxes_below_vote_iou():
    # IoU of the two boxes is 38/42 = 0.905: a voter at vote_iou 0.9, not at 0.95.
    data = [[10.0, 10, 50, 50], [12, 10, 52, 50]], [0.9, 0.3], [1, 1]
    voted, _, _ = one_image(*data, "box_voting", nms_iou=0.95, vote_iou=0.9)
    torch.testing.assert_close(voted[0], torch.tensor([10.5, 10, 50.5, 50]))
    alone, _, _ = one_image(*data, "box_voting", nms_iou=0.95, vote_iou=0.95)
    torch.testing.assert_close(alone[0], torch.tensor([10.0, 10, 50, 50]))


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_different_classes_are_never_merged(method):
    boxes, _, labels = one_image(
        [[10.0, 10, 50, 50], [10, 10, 50, 50]], [0.9, 0.8], [1, 2], method
    )
    assert labels.tolist() == [1, 2]
    torch.testing.assert_close(boxes, torch.tensor([[10.0, 10, 50, 50]] * 2))


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_different_images_are_never_merged(method):
    box = torch.tensor([[10.0, 10, 50, 50]])
    out = fuse(
        box.repeat(3, 1),
        torch.tensor([0.5, 0.9, 0.7]),
        torch.tensor([1, 1, 1]),
        torch.tensor([2, 0, 1]),
        EnsembleConfig(method=method),
        num_views=1,
    )
    assert out[3].tolist() == [0, 1, 2]
    assert out[1].tolist() == pytest.approx([0.9, 0.7, 0.5])
    torch.testing.assert_close(out[0], box.repeat(3, 1))


def test_nms_keeps_the_highest_score():
    boxes, scores, _ = one_image(
        [[10.0, 10, 50, 50], [12, 10, 52, 50]], [0.3, 0.9], [1, 1], "nms"
    )
    assert scores.tolist() == pytest.approx([0.9])
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 10, 52, 50]]))


def test_soft_nms_decays_by_the_overlap_with_each_earlier_pick():
    # A and B overlap by IoU 1/3, C is A again. Worked by hand with sigma 0.5:
    # pick A (0.9); B -> 0.8 e^(-2/9) = 0.6406, C -> 0.5 e^(-2) = 0.0677;
    # pick B; C -> 0.0677 e^(-2/9) = 0.0542; pick C.
    data = [[0.0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 10]], [0.9, 0.8, 0.5], [3] * 3
    boxes, scores, labels = one_image(*data, "soft_nms", soft_nms_min_score=0.001)
    decay = math.exp(-2 / 9)
    expected = [0.9, 0.8 * decay, 0.5 * math.exp(-2) * decay]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(boxes, torch.tensor(data[0]))
    assert labels.tolist() == [3, 3, 3]
    _, scores, _ = one_image(*data, "soft_nms", soft_nms_min_score=0.06)
    assert scores.tolist() == pytest.approx(expected[:2], rel=1e-6)


def test_wbf_rescales_the_mean_score_by_the_views_that_agree():
    boxes, scores, _ = one_image(
        [[10.0, 10, 50, 50], [12, 10, 52, 50], [100, 100, 140, 140]],
        [0.9, 0.3, 0.8],
        [1, 1, 1],
        "wbf",
    )
    # (0.9 + 0.3) / 2 * min(2, 2) / 2 views, and 0.8 * 1 / 2 views
    assert scores.tolist() == pytest.approx([0.6, 0.4])
    torch.testing.assert_close(boxes[0], torch.tensor([10.5, 10, 50.5, 50]))


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_zero_area_boxes_overlap_nothing(method):
    data = [[5.0, 5, 5, 9], [5, 5, 5, 9], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [1] * 3
    boxes, scores, _ = one_image(*data, method)
    torch.testing.assert_close(boxes, torch.tensor(data[0]))
    assert scores.isfinite().all()


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_no_detections_fuse_to_none(method):
    out = fuse(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        EnsembleConfig(method=method),
        num_views=4,
    )
    assert [tuple(t.shape) for t in out] == [(0, 4), (0,), (0,), (0,)]
    assert [t.dtype for t in out] == [torch.float32] * 2 + [torch.int64] * 2


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_max_detections_caps_each_image(method):
    boxes = torch.tensor([[i * 20.0, 0, i * 20 + 10, 10] for i in range(10)])
    out = fuse(
        boxes.repeat(2, 1),
        torch.linspace(0.1, 0.9, 10).repeat(2),
        torch.ones(20, dtype=torch.int64),
        torch.arange(2).repeat_interleave(10),
        EnsembleConfig(method=method, max_detections=3),
        num_views=1,
    )
    assert out[3].tolist() == [0, 0, 0, 1, 1, 1]
    assert out[1].tolist() == pytest.approx([0.9, 0.8111111, 0.7222222] * 2)


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_a_batch_fuses_like_each_image_alone(method):
    data = views_of_images(np.random.default_rng(7), images=5)
    config = EnsembleConfig(method=method, max_detections=20)
    batch = fuse(*batch_of(data), config, num_views=8)
    for i, image in enumerate(data):
        alone = fuse(*batch_of([image]), config, num_views=8)
        mine = batch[3] == i
        for got, want in zip(batch[:3], alone[:3], strict=True):
            torch.testing.assert_close(got[mine], want)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_matches_ensemble_boxes(method, seed):
    data = views_of_images(np.random.default_rng(seed), images=3)
    config = EnsembleConfig(method=method, max_detections=10_000)
    boxes, scores, labels, images = fuse(*batch_of(data), config, num_views=8)
    for i, image in enumerate(data):
        mine = images == i
        got = rows(boxes[mine].numpy() / SIZE, scores[mine], labels[mine])
        want = rows(*reference(method, image, config))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_soft_nms_keeps_the_boxes_ensemble_boxes_keeps(seed):
    # ensemble-boxes' soft_nms keeps the same boxes but returns their original,
    # undecayed scores (it indexes the input with the kept indices), so only the
    # boxes and labels can be compared; the decayed scores are checked by hand above.
    data = views_of_images(np.random.default_rng(seed), images=3)
    config = EnsembleConfig(method="soft_nms", max_detections=10_000)
    boxes, _, labels, images = fuse(*batch_of(data), config, num_views=8)
    for i, image in enumerate(data):
        mine = images == i
        got = rows(boxes[mine].numpy() / SIZE, np.zeros(int(mine.sum())), labels[mine])
        want_boxes, _, want_labels = reference("soft_nms", image, config)
        want = rows(want_boxes, np.zeros(len(want_labels)), want_labels)
        got, want = (t[np.lexsort(t.T[::-1])] for t in (got, want))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="box_voting.*nms.*soft_nms.*wbf"):
        check_method("wbf2")
