import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from torchvision.ops import FrozenBatchNorm2d

from raydd.config import ModelConfig, TrainConfig
from raydd.data.coco import DetectionDataset, Record, collate
from raydd.models import build_model
from raydd.train import MixedBatchSampler, lr_factor


@pytest.mark.parametrize(
    "batch_size,share,labeled_per_batch",
    [(5, 0.6, 3), (10, 0.6, 6), (4, 0.5, 2), (8, 1.0, 8)],
)
def test_every_batch_has_the_labeled_share(batch_size, share, labeled_per_batch):
    num_labeled, num_pseudo = 7, 40
    sampler = MixedBatchSampler(
        num_labeled, num_pseudo, batch_size, share, steps=60, seed=3
    )
    batches = list(sampler)
    assert len(batches) == 60
    for batch in batches:
        assert len(batch) == batch_size
        assert sum(i < num_labeled for i in batch) == labeled_per_batch
    seen = [i for b in batches for i in b]
    # the small labeled set is repeated; every pseudo-labeled image is visited
    assert set(i for i in seen if i < num_labeled) == set(range(num_labeled))
    if share < 1.0:
        assert set(i for i in seen if i >= num_labeled) == set(range(7, 47))


def test_each_pass_visits_every_image_once():
    sampler = MixedBatchSampler(6, 30, 5, 0.6, steps=10, seed=0)
    pseudo = [i for b in sampler for i in b if i >= 6]
    # 10 steps x 2 pseudo slots = 20 of the 30 pseudo images: no repeat within a pass
    assert len(pseudo) == 20 and len(set(pseudo)) == 20


def test_resumed_sampler_continues_with_the_same_batches():
    full = list(MixedBatchSampler(5, 20, 5, 0.6, steps=12, seed=1))
    resumed = list(MixedBatchSampler(5, 20, 5, 0.6, steps=12, seed=1, start_step=7))
    assert resumed == full[7:]


def test_workers_get_disjoint_batches():
    kwargs = dict(
        num_labeled=4, num_pseudo=100, batch_size=5, labeled_share=0.6, steps=10
    )
    rank0 = [
        i
        for b in MixedBatchSampler(**kwargs, rank=0, world_size=2)
        for i in b
        if i >= 4
    ]
    rank1 = [
        i
        for b in MixedBatchSampler(**kwargs, rank=1, world_size=2)
        for i in b
        if i >= 4
    ]
    assert not set(rank0) & set(rank1)


def test_lr_schedule_warms_up_and_steps_down():
    cfg = TrainConfig(iterations=100, warmup_iterations=10, lr_milestones=(0.7, 0.9))
    assert lr_factor(0, cfg) == pytest.approx(1 / 3)
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(69, cfg) == 1.0
    assert lr_factor(70, cfg) == pytest.approx(0.1)
    assert lr_factor(95, cfg) == pytest.approx(0.01)


def test_losses_are_finite_on_an_image_with_zero_boxes(demo_dir, weights):
    model = build_model(
        ModelConfig(backbone_weights=weights, **TINY_MODEL), num_classes=11
    )
    empty = Record(
        str(next((demo_dir / "labeled").glob("*.png"))),
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.int64),
    )
    images, targets = collate([DetectionDataset([empty])[0]])
    assert targets[0]["boxes"].shape == (0, 4)
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0


def test_student_starts_from_pretrained_or_from_the_teacher(tmp_path, weights):
    from raydd.checkpoint import save_detector
    from raydd.data.coco import Categories
    from raydd.train import TrainJob, _build

    config = ModelConfig(backbone_weights=weights, **TINY_MODEL)
    categories = Categories((1, 2), ("a", "b"))
    teacher = build_model(config, categories.num_classes)
    with torch.no_grad():
        teacher.roi_heads.box_predictor.cls_score.weight.fill_(0.125)
    save_detector(tmp_path, teacher, config, categories)
    job = TrainJob(model=config, train=TrainConfig(), categories=categories, labeled=[])

    fine_tuned = _build(TrainJob(**{**job.__dict__, "init_from": str(tmp_path)}))
    retrained = _build(job)
    head = "roi_heads.box_predictor.cls_score.weight"
    assert (fine_tuned.state_dict()[head] == 0.125).all()
    assert not (retrained.state_dict()[head] == 0.125).any()
    # both are built the same way: frozen batch norm, the same trainable stages
    for model in (fine_tuned, retrained):
        assert isinstance(model.backbone.body["1"].conv[0][1], FrozenBatchNorm2d)
        assert not model.backbone.body["1"].conv[0][0].weight.requires_grad
    # and start from the same ImageNet backbone
    first_conv = "backbone.body.0.0.weight"
    torch.testing.assert_close(
        retrained.state_dict()[first_conv], fine_tuned.state_dict()[first_conv]
    )
