import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d
from torchvision.transforms.functional import pil_to_tensor

from raydd.config import ModelConfig
from raydd.data.coco import (
    Categories,
    keypoint_flip_permutation,
    keypoint_names,
    load_coco,
)
from raydd.data.demo import KEYPOINT_NAMES
from raydd.models import (
    RAYDD_BUILDERS,
    build_model,
    permissive_inference,
)

NEW_BUILDERS = ["maskrcnn_mobilenet_v2_fpn", "keypointrcnn_mobilenet_v2_fpn"]
COCO_PERSON = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
]


def tiny_config(name: str, weights: str | None) -> ModelConfig:
    kwargs = {**TINY_MODEL["kwargs"], "num_keypoints": len(KEYPOINT_NAMES)}
    # fewer sampled RoIs keep the 8-conv keypoint head quick on a CPU
    kwargs["box_batch_size_per_image"] = 32
    if name != "keypointrcnn_mobilenet_v2_fpn":
        kwargs.pop("num_keypoints")
    if "rcnn" not in name:  # one-stage detectors: no RPN, no RoI sampling
        kwargs = {"anchor_sizes": kwargs["anchor_sizes"]}
    return ModelConfig(
        name=name, backbone_weights=weights, **{**TINY_MODEL, "kwargs": kwargs}
    )


def demo_sample(demo_dir, image_index: int = 0):
    """The first labeled demo image and its full target (boxes, masks, keypoints)."""
    coco = load_coco(str(demo_dir / "labeled.json"))
    categories = Categories.from_coco(coco)
    info = coco.dataset["images"][image_index]
    anns = coco.imgToAnns[info["id"]]
    image = pil_to_tensor(Image.open(demo_dir / "labeled" / info["file_name"])) / 255
    x, y, w, h = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).T
    target = {
        "boxes": torch.stack([x, y, x + w, y + h], dim=1),
        "labels": torch.tensor([categories.to_label(a["category_id"]) for a in anns]),
        "masks": torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])),
        "keypoints": torch.tensor(
            [a["keypoints"] for a in anns], dtype=torch.float32
        ).reshape(len(anns), -1, 3),
    }
    return image, target, categories.num_classes


def empty_target(image: torch.Tensor, num_keypoints: int) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, *image.shape[-2:]), dtype=torch.uint8),
        "keypoints": torch.zeros((0, num_keypoints, 3)),
    }


@pytest.fixture(params=[True, False], ids=["offline-weights", "random-init"])
def maybe_weights(request, weights):
    return weights if request.param else None


@pytest.mark.parametrize("name", NEW_BUILDERS)
def test_train_step_then_permissive_inference(name, maybe_weights, demo_dir):
    torch.manual_seed(0)
    image, target, num_classes = demo_sample(demo_dir)
    model = build_model(tiny_config(name, maybe_weights), num_classes)
    head_loss = "loss_mask" if name.startswith("mask") else "loss_keypoint"

    model.train()
    # a real image and one with zero boxes in the same batch
    losses = model([image, image], [target, empty_target(image, 4)])
    assert {"loss_classifier", "loss_box_reg", head_loss} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses[head_loss] > 0
    sum(losses.values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()

    model = permissive_inference(model.eval(), max_detections=7)
    with torch.no_grad():
        (detections,) = model([image])
    n = len(detections["boxes"])
    assert 0 < n <= 7
    if name.startswith("mask"):
        assert detections["masks"].shape == (n, 1, 128, 128)
        assert "keypoints" not in detections
    else:
        assert detections["keypoints"].shape == (n, 4, 3)
        assert detections["keypoints_scores"].shape == (n, 4)
        assert "masks" not in detections


@pytest.mark.parametrize("name", sorted(RAYDD_BUILDERS))
def test_builders_share_the_offline_backbone(name, weights):
    state = torch.load(weights, weights_only=True)
    model = build_model(tiny_config(name, weights), num_classes=11)
    first_conv = model.backbone.body["0"][0].weight
    assert torch.equal(first_conv, state["features.0.0.weight"])
    assert isinstance(model.backbone.body["0"][1], FrozenBatchNorm2d)
    anchors = model.rpn.anchor_generator if "rcnn" in name else model.anchor_generator
    # one anchor size per FPN level, from anchor_sizes (RetinaNet: 3 octaves each)
    assert [round(s[0]) for s in anchors.sizes] == [16, 32, 64, 128]

    scratch = build_model(tiny_config(name, weights), num_classes=11, pretrained=False)
    assert isinstance(scratch.backbone.body["0"][1], torch.nn.BatchNorm2d)
    # checkpoint.load_detector rebuilds with pretrained=False, then loads the weights
    scratch.load_state_dict(model.state_dict())


def test_heads_and_helpers(weights):
    faster, mask, keypoint = (
        build_model(tiny_config(name, weights), num_classes=11)
        for name in ("fasterrcnn_mobilenet_v2_fpn", *NEW_BUILDERS)
    )
    assert keypoint.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 4
    assert keypoint.roi_heads.keypoint_roi_pool.output_size == (14, 14)
    assert mask.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert mask.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2"]
    assert not faster.roi_heads.has_mask() and not faster.roi_heads.has_keypoint()


def test_keypoint_names_of_the_demo(demo_dir, tmp_path):
    assert keypoint_names(load_coco(str(demo_dir / "labeled.json"))) == KEYPOINT_NAMES

    coco = json.loads((demo_dir / "labeled.json").read_text())
    for category in coco["categories"][1:]:
        del category["keypoints"]
    (tmp_path / "one.json").write_text(json.dumps(coco))
    assert keypoint_names(load_coco(str(tmp_path / "one.json"))) == KEYPOINT_NAMES
    coco["categories"][1]["keypoints"] = ["top", "bottom"]
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="disagree"):
        keypoint_names(load_coco(str(tmp_path / "bad.json")))
    for category in coco["categories"]:
        category.pop("keypoints", None)
    (tmp_path / "none.json").write_text(json.dumps(coco))
    assert keypoint_names(load_coco(str(tmp_path / "none.json"))) == ()


def test_flip_permutation_of_coco_person():
    permutation = keypoint_flip_permutation(COCO_PERSON)
    # torchvision references/detection/transforms.py: _flip_coco_person_keypoints
    assert permutation == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert [permutation[i] for i in permutation] == list(range(17))


def test_flip_permutation_of_the_demo(caplog):
    assert keypoint_flip_permutation(KEYPOINT_NAMES) == [0, 1, 3, 2]
    with caplog.at_level(logging.WARNING):
        assert keypoint_flip_permutation(["left_eye", "nose"]) == [0, 1]
    assert "no mirror 'right_eye'" in caplog.text
    with pytest.raises(ValueError, match="duplicate"):
        keypoint_flip_permutation(["nose", "nose"])


def test_boxes_in_the_ignore_band_are_neither_object_nor_background(weights):
    """A box labeled IGNORE: the RPN's anchors and the box head's proposals that
    match it are left out of both losses; the real box's stay positive and the
    far ones negative. torchvision's own RPN would call that anchor an object."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from raydd.ingest import IGNORE
    from raydd.models import IgnoreAwareRPN

    model = build_model(tiny_config("fasterrcnn_mobilenet_v2_fpn", weights), 3)
    assert type(model.rpn) is IgnoreAwareRPN
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [70.0, 70.0, 110.0, 110.0]])
    target = {"boxes": boxes, "labels": torch.tensor([2, IGNORE])}
    # anchors/proposals: on the object, on the ignored box, on neither
    candidates = torch.tensor(
        [[10.0, 10.0, 40.0, 40.0], [72.0, 70.0, 110.0, 112.0], [0.0, 60.0, 30.0, 95.0]]
    )
    (anchors,), _ = model.rpn.assign_targets_to_anchors([candidates], [target])
    assert anchors.tolist() == [1.0, -1.0, 0.0]
    (plain,), _ = RegionProposalNetwork.assign_targets_to_anchors(
        model.rpn, [candidates], [target]
    )
    assert plain.tolist() == [1.0, 1.0, 0.0]
    _, (labels,) = model.roi_heads.assign_targets_to_proposals(
        [candidates], [boxes], [target["labels"]]
    )
    assert labels.tolist() == [2, IGNORE, 0]
    (positive,), (negative,) = model.roi_heads.fg_bg_sampler([labels])
    assert positive.tolist() == [1, 0, 0] and negative.tolist() == [0, 0, 1]


def test_a_training_step_with_ignored_boxes_has_finite_losses(weights, demo_dir):
    """Ignored boxes next to real ones, and an image with ignored boxes only."""
    from raydd.ingest import IGNORE

    torch.manual_seed(0)
    image, target, num_classes = demo_sample(demo_dir)
    config = tiny_config("fasterrcnn_mobilenet_v2_fpn", weights)
    model = build_model(config, num_classes).train()
    boxes = {"boxes": target["boxes"], "labels": target["labels"]}
    half = {"boxes": target["boxes"], "labels": target["labels"].clone()}
    half["labels"][::2] = IGNORE
    ignored = {"boxes": target["boxes"], "labels": torch.full_like(half["labels"], -1)}
    losses = model([image] * 3, [boxes, half, ignored])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
