import pytest
import torch

from raydd.config import ConfigError, EnsembleConfig
from raydd.ensemble import FUSION_METHODS, check_method, fuse


def test_box_voting_merges_overlapping_same_class_boxes():
    boxes = torch.tensor([[10.0, 10, 50, 50], [12, 10, 52, 50], [100, 100, 140, 140]])
    scores = torch.tensor([0.9, 0.3, 0.8])
    labels = torch.tensor([1, 1, 1])
    out_boxes, out_scores, out_labels = fuse(boxes, scores, labels, EnsembleConfig())
    assert out_boxes.shape == (2, 4)
    # score-weighted mean of the two overlapping boxes: x0 = (0.9*10 + 0.3*12) / 1.2
    torch.testing.assert_close(out_boxes[0], torch.tensor([10.5, 10, 50.5, 50]))
    assert out_scores.tolist() == pytest.approx([0.9, 0.8])
    assert out_labels.tolist() == [1, 1]


def test_different_classes_are_never_merged():
    boxes = torch.tensor([[10.0, 10, 50, 50], [10, 10, 50, 50]])
    scores = torch.tensor([0.9, 0.8])
    labels = torch.tensor([1, 2])
    for method in FUSION_METHODS:
        out_boxes, _, out_labels = fuse(
            boxes, scores, labels, EnsembleConfig(method=method)
        )
        assert sorted(out_labels.tolist()) == [1, 2]
        torch.testing.assert_close(out_boxes, boxes)


def test_nms_keeps_the_highest_score():
    boxes = torch.tensor([[10.0, 10, 50, 50], [12, 10, 52, 50]])
    out_boxes, out_scores, _ = fuse(
        boxes,
        torch.tensor([0.3, 0.9]),
        torch.tensor([1, 1]),
        EnsembleConfig(method="nms"),
    )
    assert out_scores.tolist() == pytest.approx([0.9])
    torch.testing.assert_close(out_boxes, boxes[1:])


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_no_detections_fuse_to_none(method):
    out = fuse(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        EnsembleConfig(method=method),
    )
    assert [t.shape[0] for t in out] == [0, 0, 0]


def test_max_detections_caps_the_output():
    boxes = torch.tensor([[i * 20.0, 0, i * 20 + 10, 10] for i in range(10)])
    out = fuse(
        boxes,
        torch.linspace(0.1, 0.9, 10),
        torch.ones(10, dtype=torch.int64),
        EnsembleConfig(max_detections=3),
    )
    assert out[1].tolist() == pytest.approx([0.9, 0.8111111, 0.7222222])


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="box_voting.*nms"):
        check_method("wbf2")
