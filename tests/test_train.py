"""Training: seeded shuffling and exact mixing from Ray Data, augmentation,
schedules, Ray Train runs."""

import hashlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, tiny_config
from torchvision.ops import FrozenBatchNorm2d

from raydd import schema
from raydd.config import CocoSplit, ConfigError, ModelConfig, TrainConfig, parse_config
from raydd.data.coco import (
    Categories,
    Record,
    coco_records,
    keypoint_flip_permutation,
    keypoint_names,
    load_coco,
)
from raydd.data.demo import KEYPOINT_NAMES
from raydd.ingest import (
    DRAWS,
    INDEX,
    LABELED,
    PSEUDO,
    Augment,
    RowStream,
    Shuffle,
    _Started,
    next_batch,
    prepare,
    record_row,
    split_batch,
    to_batch,
    to_device,
)
from raydd.masks import decode_rle
from raydd.models import build_model
from raydd.teacher import augment_for, labeled_training_records
from raydd.train import TrainJob, _build, fit, lr_factor, scaling_config


def _ids(ray, name, n):
    return ray.data.from_items([{"path": f"{name}-{i}"} for i in range(n)])


@pytest.mark.parametrize(
    "batch_size,share,labeled_per_batch",
    [(5, 0.6, 3), (10, 0.6, 6), (4, 0.5, 2), (8, 1.0, 8), (2, 0.1, 1)],
)
def test_every_batch_has_the_labeled_share_over_an_epoch(
    ray_local, batch_size, share, labeled_per_batch
):
    num_labeled, num_pseudo = 7, 40
    n_labeled, n_pseudo = split_batch(batch_size, share, pseudo=True)
    assert n_labeled == labeled_per_batch
    streams = {
        LABELED: RowStream(_ids(ray_local, "l", num_labeled).iterator(), n_labeled),
        PSEUDO: RowStream(_ids(ray_local, "p", num_pseudo).iterator(), n_pseudo),
    }
    sizes = {LABELED: n_labeled, PSEUDO: n_pseudo}
    steps = -(-num_pseudo // n_pseudo) if n_pseudo else 10  # one pseudo epoch
    seen = Counter()
    for _ in range(steps):
        batch = next_batch(streams, sizes)
        assert len(batch) == batch_size
        assert sum(r["source"] == LABELED for r in batch) == labeled_per_batch
        assert all(str(r["path"]).startswith("l-") for r in batch[:labeled_per_batch])
        seen.update(str(r["path"]) for r in batch)
    pseudo = {k: v for k, v in seen.items() if k.startswith("p-")}
    labeled = [v for k, v in seen.items() if k.startswith("l-")]
    if n_pseudo:  # every pseudo-labeled image once (the last step wraps around)
        assert len(pseudo) == num_pseudo
        assert sum(pseudo.values()) == steps * n_pseudo
    # the small labeled set is repeated, evenly: counts differ by at most one
    assert len(labeled) == num_labeled and max(labeled) - min(labeled) <= 1
    for stream in streams.values():
        stream.close()


def test_a_resumed_stream_continues_at_the_same_position(ray_local):
    data = _ids(ray_local, "x", 10)
    first = RowStream(data.iterator(), 4, shuffle=Shuffle(seed=3))
    taken = [str(r["path"]) for r in first.take(12)]  # 1 epoch + 2
    assert first.position() == {"epoch": 1, "offset": 2}
    assert sorted(taken[:10]) == sorted(f"x-{i}" for i in range(10))
    resumed = RowStream(data.iterator(), 4, **first.position(), shuffle=Shuffle(3))
    rest = [str(r["path"]) for r in resumed.take(8)]
    # exactly the rows the uninterrupted stream takes next: the rest of epoch 1
    assert rest == [str(r["path"]) for r in first.take(8)]
    assert sorted(taken[10:] + rest) == sorted(taken[:10])
    assert resumed.position() == first.position() == {"epoch": 1, "offset": 10}
    # a position at the very end of an epoch resumes with the next epoch
    at_end = RowStream(data.iterator(), 4, **first.position(), shuffle=Shuffle(3))
    assert [r["path"] for r in at_end.take(3)] == [r["path"] for r in first.take(3)]
    assert at_end.position() == {"epoch": 2, "offset": 3}
    for stream in (first, resumed, at_end):
        stream.close()


def test_every_epoch_is_a_new_permutation_sliced_across_workers():
    size, world = 8, 3  # 9 slots: one row is repeated, as in DistributedSampler
    for epoch in range(4):
        slices = [Shuffle(5, LABELED, r, world).order(size, epoch) for r in range(3)]
        assert [len(s) for s in slices] == [3, 3, 3]  # equal epochs on every worker
        taken = np.concatenate(slices)
        assert set(taken.tolist()) == set(range(size))
    orders = [tuple(Shuffle(5, LABELED).order(size, e)) for e in range(6)]
    assert sorted(orders[0]) == list(range(size))
    assert len(set(orders)) == 6  # a new order every epoch
    assert orders[0] == tuple(Shuffle(5, LABELED).order(size, 0))  # and repeatable
    assert orders[0] != tuple(Shuffle(6, LABELED).order(size, 0))  # another seed
    assert orders[0] != tuple(Shuffle(5, PSEUDO).order(size, 0))  # another set
    # rank 0's share changes from epoch to epoch too
    shares = {frozenset(Shuffle(5, LABELED, 0, 2).order(size, e)) for e in range(6)}
    assert len(shares) > 1


def test_a_rows_augmentation_depends_on_its_seed_not_its_batch(demo_dir):
    _, records = _demo_records(demo_dir)
    augment = Augment(
        (64, 96), 128, 0.5, _flip_permutation(demo_dir), masks=True, keypoints=True
    )
    shuffle = Shuffle(seed=1, name=LABELED)
    rows = [
        record_row(r) | {INDEX: i, DRAWS: shuffle.draws(epoch=0, index=i)}
        for i, r in enumerate(records)
    ]
    together = _unbatch(augment(to_batch(rows)))
    alone = [_unbatch(augment(to_batch([row])))[0] for row in reversed(rows)][::-1]
    assert [_fingerprint(r) for r in together] == [_fingerprint(r) for r in alone]
    assert [r[INDEX] for r in together] == list(range(len(rows)))
    # the draws vary: two scales and mirrored or not, over 8 rows x 4 epochs
    sizes = set()
    for epoch in range(4):
        for row in rows:
            row = row | {DRAWS: shuffle.draws(epoch, row[INDEX])}
            sizes.add(_unbatch(augment(to_batch([row])))[0][schema.IMAGE].shape)
    assert sizes == {(64, 64, 3), (96, 96, 3)}


def _unbatch(batch: dict[str, np.ndarray]) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch[schema.PATH]))]


def _fingerprint(row: dict) -> tuple:
    """A training row's path and a digest of everything else it carries."""
    digest = hashlib.sha1()
    for name in sorted(row):
        if name not in (schema.PATH, "source"):
            digest.update(name.encode() + np.ascontiguousarray(row[name]).tobytes())
    return str(row[schema.PATH]), digest.hexdigest()


@pytest.fixture(scope="module")
def demo_sets(ray_local, demo_dir):
    """The demo's labeled (8 images) and validation (6) splits as training sets,
    with masks, keypoints, two scales and mirroring."""
    categories, labeled = _demo_records(demo_dir)
    pseudo = coco_records(
        CocoSplit(str(demo_dir / "validation.json"), str(demo_dir / "validation")),
        categories,
        masks=True,
        keypoints=True,
    )
    augment = Augment(
        (64, 96), 128, 0.5, _flip_permutation(demo_dir), masks=True, keypoints=True
    )
    return {LABELED: prepare(labeled, augment), PSEUDO: prepare(pseudo, augment)}


def _batches(sets, seed, steps, position=None):
    """``steps`` minibatches of 3 labeled + 2 pseudo-labeled rows, and the streams'
    positions after them."""
    sizes = {LABELED: 3, PSEUDO: 2}
    streams = {
        name: RowStream(
            sets[name].iterator(),
            n,
            **(position or {}).get(name, {}),
            shuffle=Shuffle(seed, name),
        )
        for name, n in sizes.items()
    }
    batches = [next_batch(streams, sizes) for _ in range(steps)]
    positions = {name: s.position() for name, s in streams.items()}
    for stream in streams.values():
        stream.close()
    return batches, positions


def _labeled_epochs(batches, size=8):
    paths = [str(r[schema.PATH]) for b in batches for r in b if r["source"] == LABELED]
    return [paths[i : i + size] for i in range(0, len(paths) - size + 1, size)]


def test_a_seed_repeats_the_batches_and_epochs_are_reshuffled(demo_sets):
    first, positions = _batches(demo_sets, seed=7, steps=20)
    again, _ = _batches(demo_sets, seed=7, steps=20)
    # (a) the same seed: the same rows, pixels, boxes, masks and keypoints
    assert [[_fingerprint(r) for r in b] for b in first] == [
        [_fingerprint(r) for r in b] for b in again
    ]
    # (d) every batch: exactly 3 labeled rows, then 2 pseudo-labeled ones
    for batch in first:
        assert [r["source"] for r in batch] == [LABELED] * 3 + [PSEUDO] * 2
    # 60 labeled rows = 7 epochs of 8 + 4, 40 pseudo-labeled = 6 epochs of 6 + 4
    assert positions == {
        LABELED: {"epoch": 7, "offset": 4},
        PSEUDO: {"epoch": 6, "offset": 4},
    }
    # (b) every epoch takes every image once, in a new order
    epochs = _labeled_epochs(first)
    assert len(epochs) == 7 and all(len(set(e)) == 8 for e in epochs)
    assert all(set(e) == set(epochs[0]) for e in epochs)
    assert all(a != b for a, b in zip(epochs, epochs[1:], strict=False))
    # ... and draws new augmentations: an image does not look the same every epoch
    looks = {}
    for row in (r for b in first for r in b):
        looks.setdefault(str(row[schema.PATH]), set()).add(_fingerprint(row)[1])
    assert all(len(v) > 1 for v in looks.values())
    # (c) another seed: another order, other draws
    other, _ = _batches(demo_sets, seed=8, steps=20)
    assert _labeled_epochs(other)[0] != epochs[0]
    assert [_fingerprint(r) for r in other[0]] != [_fingerprint(r) for r in first[0]]


def test_the_next_pipeline_starts_before_it_is_asked_for():
    """A pipeline's first rows are fetched in a thread from its start (its start-up
    overlaps the training on the rows before it); then every row comes in order, a
    failure comes out where a row is asked for, and closing it unread ends it."""

    def rows(started: threading.Event, closed: threading.Event):
        started.set()
        try:
            yield from range(3)
        finally:
            closed.set()

    started, closed = threading.Event(), threading.Event()
    pipeline = _Started(rows(started, closed))
    assert started.wait(5)  # no row asked for yet
    assert list(pipeline) == [0, 1, 2]
    started, closed = threading.Event(), threading.Event()
    unread = _Started(rows(started, closed))
    assert started.wait(5) and not closed.is_set()
    unread.close()
    assert closed.is_set()

    def failing():
        raise OSError("a shard is gone")
        yield

    with pytest.raises(OSError, match="a shard is gone"):
        next(_Started(failing()))


def test_a_resumed_stream_takes_the_rows_of_the_uninterrupted_one(demo_sets):
    # (e) 7 steps, then a new stream from the saved position: the same 13 next
    # batches as one stream running 20 steps (its decoding pipelines are cut
    # elsewhere, so this holds only because draws depend on (seed, epoch, row))
    whole, _ = _batches(demo_sets, seed=7, steps=20)
    head, position = _batches(demo_sets, seed=7, steps=7)
    assert position == {
        LABELED: {"epoch": 2, "offset": 5},
        PSEUDO: {"epoch": 2, "offset": 2},
    }
    tail, _ = _batches(demo_sets, seed=7, steps=13, position=position)
    assert [[_fingerprint(r) for r in b] for b in head + tail] == [
        [_fingerprint(r) for r in b] for b in whole
    ]


def test_split_batch():
    assert split_batch(5, 0.6, pseudo=False) == (5, 0)
    assert split_batch(5, 0.6, pseudo=True) == (3, 2)
    assert split_batch(4, 0.01, pseudo=True) == (1, 3)  # never without labeled images


def test_lr_schedule_warms_up_and_steps_down():
    cfg = TrainConfig(iterations=100, warmup_iterations=10, lr_milestones=(0.7, 0.9))
    assert lr_factor(0, cfg) == pytest.approx(1 / 3)
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(69, cfg) == 1.0
    assert lr_factor(70, cfg) == pytest.approx(0.1)
    assert lr_factor(95, cfg) == pytest.approx(0.01)


def _demo_records(demo_dir, masks=True, keypoints=True):
    split = CocoSplit(str(demo_dir / "labeled.json"), str(demo_dir / "labeled"))
    categories = Categories.from_coco(load_coco(split.annotations))
    return categories, coco_records(split, categories, masks, keypoints)


def _flip_permutation(demo_dir):
    names = keypoint_names(load_coco(str(demo_dir / "labeled.json")))
    assert names == KEYPOINT_NAMES
    return tuple(keypoint_flip_permutation(names))


def test_hflip_mirrors_image_boxes_masks_and_swaps_left_right(demo_dir):
    _, records = _demo_records(demo_dir)
    record = next(r for r in records if len(r.labels))
    rng = np.random.default_rng(0)
    common = dict(
        min_sizes=(128,),
        max_size=128,
        flip_permutation=_flip_permutation(demo_dir),
        masks=True,
        keypoints=True,
    )
    plain = Augment(**common).row(record_row(record), rng)
    flip = Augment(**common, hflip_prob=1.0).row(record_row(record), rng)
    width = plain[schema.IMAGE].shape[1]
    np.testing.assert_array_equal(flip[schema.IMAGE], plain[schema.IMAGE][:, ::-1])
    np.testing.assert_array_equal(flip[schema.MASKS], plain[schema.MASKS][..., ::-1])
    x0, y0, x1, y1 = plain[schema.BOXES].T
    np.testing.assert_allclose(
        flip[schema.BOXES], np.stack([width - x1, y0, width - x0, y1], 1)
    )
    left, right = KEYPOINT_NAMES.index("left"), KEYPOINT_NAMES.index("right")
    top = KEYPOINT_NAMES.index("top")
    mirrored = plain[schema.KEYPOINTS].copy()
    mirrored[..., 0] = width - mirrored[..., 0]
    # the flipped image's left-most point is the original right-most one, mirrored
    np.testing.assert_allclose(flip[schema.KEYPOINTS][:, left], mirrored[:, right])
    np.testing.assert_allclose(flip[schema.KEYPOINTS][:, right], mirrored[:, left])
    np.testing.assert_allclose(flip[schema.KEYPOINTS][:, top], mirrored[:, top])
    # and it really is left of the right-most one
    assert (
        flip[schema.KEYPOINTS][:, left, 0] <= flip[schema.KEYPOINTS][:, right, 0]
    ).all()


def test_multi_scale_resize_scales_every_target(demo_dir):
    _, records = _demo_records(demo_dir)
    record = next(r for r in records if len(r.labels))
    augment = Augment(
        (64, 96), 1000, 0.0, _flip_permutation(demo_dir), masks=True, keypoints=True
    )
    sizes = set()
    for seed in range(8):
        out = augment.row(record_row(record), np.random.default_rng(seed))
        h, w = out[schema.IMAGE].shape[:2]
        sizes.add(min(h, w))
        ratio = w / record.width
        np.testing.assert_allclose(out[schema.BOXES], record.boxes * ratio, rtol=1e-5)
        assert out[schema.MASKS].shape == (len(record.labels), h, w)
        points = record.keypoints.reshape(len(record.labels), -1, 3)
        np.testing.assert_allclose(
            out[schema.KEYPOINTS][..., :2], points[..., :2] * ratio, rtol=1e-5
        )
    assert sizes == {64, 96}


def test_color_jitter_draws_after_the_others_and_keeps_the_targets(demo_dir):
    """With jitter the same scale, flip and boxes as without (its draws come
    last), the pixels brightened or darkened; the same seed, the same pixels."""
    _, records = _demo_records(demo_dir)
    record = next(r for r in records if len(r.labels))
    plain = Augment((64, 96), 128, 0.5)
    jittered = Augment((64, 96), 128, 0.5, color_jitter=0.4)
    changed = 0
    for seed in range(6):
        a = plain.row(record_row(record), np.random.default_rng(seed))
        b = jittered.row(record_row(record), np.random.default_rng(seed))
        again = jittered.row(record_row(record), np.random.default_rng(seed))
        assert a[schema.IMAGE].shape == b[schema.IMAGE].shape
        np.testing.assert_array_equal(a[schema.BOXES], b[schema.BOXES])
        np.testing.assert_array_equal(b[schema.IMAGE], again[schema.IMAGE])
        changed += not np.array_equal(a[schema.IMAGE], b[schema.IMAGE])
    assert changed == 6


def test_jitter_scales_contrast_around_the_mean_then_brightness():
    from raydd.ingest import jitter

    pixels = np.array([[[100, 100, 100], [200, 200, 200]]], np.uint8)  # mean 150
    out = jitter(pixels, brightness=1.1, contrast=0.5)
    assert out[..., 0].tolist() == [[138, 192]]  # (150 -/+ 25) * 1.1, half to even
    assert jitter(pixels, 2.0, 1.0)[..., 0].tolist() == [[200, 255]]  # clipped


def test_the_pseudo_labeled_images_get_their_own_augmentation():
    from raydd.config import StudentConfig
    from raydd.student import pseudo_augment

    labeled = Augment((96, 128), 144, 0.5)
    student = StudentConfig(pseudo_min_size=(64, 160), pseudo_color_jitter=0.3)
    pseudo = pseudo_augment(labeled, student)
    assert (pseudo.min_sizes, pseudo.color_jitter) == ((64, 160), 0.3)
    assert (pseudo.max_size, pseudo.hflip_prob) == (144, 0.5)
    assert pseudo_augment(labeled, StudentConfig()) == labeled


def test_each_training_set_keeps_its_own_augmentation(ray_local, demo_dir):
    """The labeled and the pseudo-labeled set carry different Augments, and each
    worker's split (what Ray Train hands a worker) finds its own set's."""
    from raydd.ingest import AUGMENT_KEY

    _, records = _demo_records(demo_dir)
    plain = Augment((64, 96), 128, 0.5)
    jittered = Augment((48, 160), 128, 0.5, color_jitter=0.3)
    sets = {LABELED: prepare(records[:4], plain), PSEUDO: prepare(records, jittered)}
    for name, augment in ((LABELED, plain), (PSEUDO, jittered)):
        (split,) = sets[name].streaming_split(1)
        assert split.get_context().get_config(AUGMENT_KEY) == augment


def test_augment_passes_an_empty_batch_through():
    empty = {schema.PATH: np.array([], dtype=str), schema.LABELS: np.array([])}
    out = Augment((64,), 100)(empty)
    assert len(out[schema.PATH]) == 0 and set(out) == set(empty)


def test_masks_come_from_the_coco_segmentation(demo_dir):
    _, records = _demo_records(demo_dir)
    record = next(r for r in records if len(r.labels))
    mask = decode_rle(record.masks[0], record.height, record.width)
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = record.boxes[0]
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


@pytest.mark.parametrize(
    "name",
    [
        "fasterrcnn_mobilenet_v2_fpn",
        "maskrcnn_mobilenet_v2_fpn",
        "keypointrcnn_mobilenet_v2_fpn",
        "retinanet_mobilenet_v2_fpn",
        "fcos_mobilenet_v2_fpn",
    ],
)
def test_models_train_from_demo_rows_with_finite_losses(
    ray_local, demo_dir, weights, name
):
    """A few SGD steps on Ray Data rows, an image with zero boxes in each batch."""
    from raydd.models import targets

    masks, keypoints = targets(name)
    categories, records = _demo_records(demo_dir, masks, keypoints)
    records = [r for r in records if len(r.labels)][:3]
    empty = Record(
        records[0].path,
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.int64),
        np.zeros(0, object) if masks else None,
        np.zeros((0, 12), np.float32) if keypoints else None,
        records[0].height,
        records[0].width,
    )
    augment = Augment(
        (96, 128), 128, 0.5, _flip_permutation(demo_dir), masks, keypoints
    )
    stream = RowStream(prepare([*records, empty], augment).iterator(), 4)
    rows = stream.take(4)  # one epoch: every image once, in a seeded order
    stream.close()
    assert sorted(len(r[schema.LABELS]) for r in rows)[0] == 0
    kwargs = {"num_keypoints": 4} if keypoints else {}
    if "rcnn" not in name:  # one-stage models take no RPN settings
        kwargs |= {"anchor_sizes": TINY_MODEL["kwargs"]["anchor_sizes"]}
        model_config = ModelConfig(
            name=name,
            backbone_weights=weights,
            min_size=(128,),
            max_size=128,
            kwargs=kwargs,
        )
    else:
        model_config = ModelConfig(
            name=name,
            backbone_weights=weights,
            **{**TINY_MODEL, "kwargs": TINY_MODEL["kwargs"] | kwargs},
        )
    job = TrainJob(model=model_config, train=TrainConfig(), categories=categories)
    model = _build(job).train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.005
    )
    for _ in range(2):
        images, batch_targets = to_device(rows, torch.device("cpu"))
        losses = model(images, batch_targets)
        assert losses and all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    if masks:
        assert "loss_mask" in losses
    if keypoints:
        assert "loss_keypoint" in losses


def test_student_starts_from_pretrained_or_from_the_teacher(tmp_path, weights):
    from raydd.checkpoint import save_detector

    config = ModelConfig(backbone_weights=weights, **TINY_MODEL)
    categories = Categories((1, 2), ("a", "b"))
    teacher = build_model(config, categories.num_classes)
    with torch.no_grad():  # a teacher unlike any fresh model, in every tensor
        for value in teacher.state_dict().values():
            if value.is_floating_point():
                value.add_(0.125)
    save_detector(tmp_path, teacher, config, categories)
    job = TrainJob(model=config, train=TrainConfig(), categories=categories)

    fine_tuned = _build(TrainJob(**{**job.__dict__, "init_from": str(tmp_path)}))
    retrained = _build(job)
    ours = teacher.state_dict()
    # init: teacher -- every tensor is the teacher's, box predictor included
    for name, value in fine_tuned.state_dict().items():
        assert torch.equal(value, ours[name]), name
    # init: pretrained -- the ImageNet backbone and fresh heads, none the teacher's
    fresh = retrained.state_dict()
    for name in (
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.bbox_pred.weight",
        "rpn.head.cls_logits.weight",
        "backbone.body.0.0.weight",
    ):
        assert not torch.equal(fresh[name], ours[name]), name
    imagenet = torch.load(weights, weights_only=True)["features.0.0.weight"]
    assert torch.equal(fresh["backbone.body.0.0.weight"], imagenet)
    # both are built the same way: frozen batch norm, the same trainable stages
    for model in (fine_tuned, retrained):
        assert isinstance(model.backbone.body["1"].conv[0][1], FrozenBatchNorm2d)
        assert not model.backbone.body["1"].conv[0][0].weight.requires_grad


# --- real Ray Train runs ---------------------------------------------------------


def _student_run(demo_dir, weights, out, overrides):
    """A student-like run: labeled + pseudo-labeled (the validation split) sets."""
    config = parse_config(tiny_config(demo_dir, out, weights), overrides)
    categories, labeled, names = labeled_training_records(config)
    pseudo = coco_records(
        CocoSplit(str(demo_dir / "validation.json"), str(demo_dir / "validation")),
        categories,
    )
    augment = augment_for(config, config.student, names)
    job = TrainJob(
        model=config.model,
        train=config.student,
        categories=categories,
        labeled_share=config.student.labeled_share,
        log_dir=str(out / "tb"),
        metadata={"role": "student"},
    )
    datasets = {LABELED: prepare(labeled, augment), PSEUDO: prepare(pseudo, augment)}
    return job, datasets


def _checkpoint_kind(path: Path) -> tuple:
    meta = json.loads((path / "metadata.json").read_text())
    state = torch.load(path / "model.pt", weights_only=True)
    files = sorted(p.name for p in path.iterdir())
    return files, sorted(meta), {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_kind_of_checkpoint(
    ray_local, demo_dir, weights, tmp_path
):
    kinds, metrics = [], []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        job, datasets = _student_run(
            demo_dir,
            weights,
            out,
            [
                f"student.num_workers={workers}",
                "student.cpus_per_worker=0.5",
                "student.iterations=4",
                "student.log_every=1",
            ],
        )
        path = fit(job, datasets, "student", out / "ray_train", out / "student")
        kinds.append(_checkpoint_kind(path))
        metrics.append(json.loads((path / "metadata.json").read_text()))
        assert list((out / "tb").glob("events.out.tfevents.*"))
    assert kinds[0] == kinds[1]
    assert metrics[0]["step"] == metrics[1]["step"] == 4


def _recording_pids(loop, folder: Path):
    """``loop``, first leaving its worker's pid in ``folder``: the test then kills
    the workers of its own run, never another run's on the same machine. (A nested
    function: cloudpickle sends it by value, the workers need not import tests.)"""

    def recorded(config):
        (folder / str(os.getpid())).touch()
        loop(config)

    return recorded


def _is_train_worker(pid: int) -> bool:
    import psutil

    try:
        return any("RayTrainWorker" in p for p in psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_a_killed_worker_resumes_from_its_checkpoint(
    ray_local, demo_dir, weights, tmp_path, monkeypatch
):
    """SIGKILL the training worker after its first checkpoint: Ray Train restarts
    it (FailureConfig), the loop restores model, optimizer and data position, and
    the run ends with its final metrics."""
    import raydd.train

    job, datasets = _student_run(
        demo_dir,
        weights,
        tmp_path,
        [
            "student.iterations=14",
            "student.checkpoint_every=4",
            "student.max_failures=1",
        ],
    )
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr(
        raydd.train, "train_loop", _recording_pids(raydd.train.train_loop, pids)
    )
    killed, run = [], tmp_path / "ray_train" / job.run_name("student")

    def kill_after_a_checkpoint():
        # a second checkpoint folder means the first one is registered with Ray Train
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if len(list(run.glob("checkpoint_*"))) > 1:
                for pid in (int(p.name) for p in pids.iterdir()):
                    if _is_train_worker(pid):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    killer.start()
    path = fit(job, datasets, "student", tmp_path / "ray_train", tmp_path / "student")
    killer.join()
    assert len(killed) == 1, "this run's training worker was not found to kill"
    # the worker that finished the run is a new process, and it recorded itself
    assert sorted(int(p.name) for p in pids.iterdir()) != killed
    assert len(list(pids.iterdir())) == 2
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["step"] == 14
    assert meta["resumed_from"] in (4, 8, 12)  # from a checkpoint, not from step 0
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["step"] == 14 and np.isfinite(metrics["loss"])
    assert metrics["labeled_share"] == pytest.approx(3 / 5)


def test_scaling_is_fixed_or_elastic_from_the_config():
    fixed = scaling_config(TrainConfig(num_workers=4, use_gpu=True))
    assert (fixed.num_workers, fixed.use_gpu) == (4, True)
    elastic = scaling_config(
        TrainConfig(num_workers=2, max_workers=8, cpus_per_worker=3)
    )
    assert elastic.num_workers == (2, 8)
    assert elastic.resources_per_worker == {"CPU": 3}


@pytest.mark.parametrize(
    "override,message",
    [
        ("student.max_workers=1", "max_workers (1) must be at least num_workers"),
        ("teacher.cpus_per_worker=0", "cpus_per_worker must be positive"),
        ("teacher.lr_milestones=[0.7,1.5]", "lr_milestones"),
        ("student.log_every=0", "student.log_every must be at least 1"),
        ("student.ignore_band=1.5", "student.ignore_band is a score difference"),
        ("model.name=fcos_mobilenet_v2_fpn", "ignore_band needs a two-stage R-CNN"),
        ("student.pseudo_min_size=[0]", "pseudo_min_size: positive"),
        ("student.pseudo_color_jitter=1", "pseudo_color_jitter must be in"),
    ],
)
def test_bad_training_settings_are_rejected(
    demo_dir, weights, tmp_path, override, message
):
    raw = tiny_config(demo_dir, tmp_path, weights)
    overrides = [override] + (
        ["student.num_workers=2"] if "max_workers" in override else []
    )
    overrides += ["student.ignore_band=0.1"] if "fcos" in override else []
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_config(raw, overrides)
