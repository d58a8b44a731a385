import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_MODEL, tiny_config
from PIL import Image

from raydd import schema
from raydd.checkpoint import save_detector
from raydd.config import (
    EnsembleConfig,
    InferenceConfig,
    ModelConfig,
    ViewConfig,
    parse_config,
)
from raydd.data.coco import Categories
from raydd.data.images import load_rgb
from raydd.inference import Predictor, predict_dataset
from raydd.masks import decode_rle
from raydd.models import build_model
from raydd.pseudo_label import (
    CANDIDATES_DIR,
    ERRORS_FILE,
    label_sources,
    pseudo_label,
    read_candidates,
)
from raydd.sources import sources
from raydd.storage import read_bytes
from raydd.teacher import TEACHER_DIR
from raydd.views import View, hflip_boxes

VIEWS = [ViewConfig(), ViewConfig(scale=160), ViewConfig(hflip=True)]
DIGITS = Categories(tuple(range(1, 11)), tuple(map(str, range(10))))


def _save_untrained(path, weights, name="fasterrcnn_mobilenet_v2_fpn", **kwargs):
    """An untrained detector (pretrained backbone, random heads): plenty of boxes."""
    torch.manual_seed(0)
    model = dict(TINY_MODEL, kwargs={**TINY_MODEL["kwargs"], **kwargs})
    config = ModelConfig(name=name, backbone_weights=weights, **model)
    save_detector(path, build_model(config, num_classes=11), config, DIGITS)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights):
    return _save_untrained(tmp_path_factory.mktemp("ckpt"), weights)


def test_fused_views_give_sorted_capped_boxes_inside_the_image(checkpoint, demo_dir):
    images = [load_rgb(str(p)) for p in sorted((demo_dir / "test").glob("*.png"))[:2]]
    predictor = Predictor(checkpoint, VIEWS, EnsembleConfig(max_detections=50))
    for image, dets in zip(images, predictor.predict(images), strict=True):
        boxes = dets[schema.BOXES]
        assert 0 < len(boxes) <= 50
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4
        h, w = image.shape[:2]
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w + 1e-3).all()
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h + 1e-3).all()
        assert (np.diff(dets[schema.SCORES]) <= 0).all()  # sorted by score


@pytest.mark.parametrize(
    "view",
    [ViewConfig(scale=160), ViewConfig(scale=96, hflip=True), ViewConfig(hflip=True)],
    ids=lambda v: View.from_config(v).name,
)
def test_a_views_boxes_come_back_to_the_original_pixels(checkpoint, demo_dir, view):
    """The model's boxes on the view's pixels, un-scaled and un-flipped by hand."""
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    predictor = Predictor(checkpoint, [view], EnsembleConfig())
    ours = predictor.predict([image])[0][schema.BOXES]
    h, w = image.shape[:2]
    shown = View.from_config(view)
    with torch.inference_mode():
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        raw = predictor.model([shown.apply(tensor)])[0]["boxes"].numpy()
    view_h, view_w = shown.output_size(h, w)
    assert (view_h, view_w) != (h, w) or view.hflip
    if view.hflip:  # x in the view -> view_w - x, the corners swap
        x0, y0, x1, y1 = raw.T
        raw = np.stack([view_w - x1, y0, view_w - x0, y1], 1)
    expected = raw * np.array([w / view_w, h / view_h] * 2, np.float32)
    assert len(ours) > 0
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_the_flip_view_of_a_mirror_finds_the_mirrored_boxes(checkpoint, demo_dir):
    """The flip view of the mirrored image sees the original pixels: mapped back,
    its boxes are exactly the mirror of the plain view's on the original."""
    image, plain, flipped = _mirror_pair(checkpoint, demo_dir)
    assert len(plain[schema.BOXES]) > 0
    mirrored = hflip_boxes(torch.from_numpy(plain[schema.BOXES]), image.shape[1])
    np.testing.assert_allclose(flipped[schema.BOXES], mirrored.numpy(), atol=1e-4)
    np.testing.assert_array_equal(flipped[schema.LABELS], plain[schema.LABELS])


def test_single_identity_view_is_the_model_output(checkpoint, demo_dir):
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    predictor = Predictor(checkpoint, [ViewConfig()], EnsembleConfig())
    ours = predictor.predict([image])[0]
    with torch.inference_mode():
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        direct = predictor.model([tensor])[0]
    np.testing.assert_allclose(ours[schema.BOXES], direct["boxes"].numpy(), atol=1e-4)


def test_downscaled_images_get_boxes_in_original_pixels(checkpoint, demo_dir):
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    predictor = Predictor(checkpoint, VIEWS, EnsembleConfig())
    own = predictor.predict([image])[0]
    original = predictor.predict([image], sizes=[(256, 384)])[0]  # loaded at 1/2, 1/3
    np.testing.assert_allclose(
        original[schema.BOXES], own[schema.BOXES] * [3, 2, 3, 2], rtol=1e-5
    )


@pytest.fixture(scope="module")
def mask_checkpoint(tmp_path_factory, weights):
    return _save_untrained(
        tmp_path_factory.mktemp("mask"), weights, "maskrcnn_mobilenet_v2_fpn"
    )


@pytest.fixture(scope="module")
def keypoint_checkpoint(tmp_path_factory, weights):
    return _save_untrained(
        tmp_path_factory.mktemp("kp"),
        weights,
        "keypointrcnn_mobilenet_v2_fpn",
        num_keypoints=4,
    )


def test_one_view_masks_are_the_mask_rcnn_masks(mask_checkpoint, demo_dir):
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    ours = Predictor(mask_checkpoint, [ViewConfig()], EnsembleConfig()).predict(
        [image]
    )[0]
    model = build_model(
        ModelConfig(name="maskrcnn_mobilenet_v2_fpn", **TINY_MODEL), 11, False
    )
    model.load_state_dict(torch.load(f"{mask_checkpoint}/model.pt"))
    from raydd.models import permissive_inference

    model = permissive_inference(model.eval(), 100)
    with torch.inference_mode():
        direct = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    assert len(ours[schema.MASKS]) == len(direct["masks"]) > 0
    for rle, soft in zip(ours[schema.MASKS], direct["masks"], strict=True):
        mask = decode_rle(rle, *image.shape[:2])
        np.testing.assert_array_equal(mask, (soft[0] > 0.5).numpy())


def _mirror_pair(checkpoint, demo_dir, **kwargs):
    """Results of the identity view on an image and of the flip view on its mirror:
    the flip view sees exactly the original pixels, so after mapping back its output
    must be the mirror image of the identity view's."""
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    plain = Predictor(checkpoint, [ViewConfig()], EnsembleConfig(), **kwargs)
    flipped = Predictor(
        checkpoint, [ViewConfig(hflip=True)], EnsembleConfig(), **kwargs
    )
    return image, plain.predict([image])[0], flipped.predict([image[:, ::-1]])[0]


def test_flip_view_soft_masks_are_mirrored_back(mask_checkpoint, demo_dir):
    # The flip view of the mirrored image sees exactly the original pixels, so the
    # soft mask it gives the mirrored box must be the mirror of the plain one. (After
    # pasting, whole-pixel truncation of the box corners does not commute with
    # mirroring, so the check is on the soft masks the views average.)
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    plain = Predictor(mask_checkpoint, [ViewConfig()], EnsembleConfig())
    flip = Predictor(mask_checkpoint, [ViewConfig(hflip=True)], EnsembleConfig())
    h, w = image.shape[:2]
    with torch.inference_mode():
        tensor = [torch.from_numpy(image).permute(2, 0, 1).float() / 255]
        boxes, _, labels, _ = plain._detect(tensor, [(h, w)])
        mirrored = hflip_boxes(boxes, w)
        masks = plain._instance_maps(tensor, [(h, w)], [boxes], [labels])["masks"]
        flipped = flip._instance_maps(
            [tensor[0].flip(-1)], [(h, w)], [mirrored], [labels]
        )["masks"]
    assert len(boxes) > 0 and masks[0].shape == (len(boxes), 28, 28)
    torch.testing.assert_close(flipped[0], masks[0].flip(-1), atol=1e-5, rtol=0)
    assert (flipped[0] - masks[0]).abs().max() > 0.1  # the check can fail


def test_mask_and_keypoint_columns_exist_even_without_any_detection(
    mask_checkpoint, keypoint_checkpoint, demo_dir
):
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    batch = {
        schema.PATH: np.array(["a.png", "bad.png"]),
        schema.IMAGE: np.array([image, np.zeros((1, 1, 3), np.uint8)], object),
        schema.HEIGHT: np.array([128, 0]),
        schema.WIDTH: np.array([128, 0]),
        schema.ERROR: np.array(["", "OSError: truncated"], object),
    }
    for checkpoint, columns in (
        (mask_checkpoint, [schema.MASKS]),
        (keypoint_checkpoint, [schema.KEYPOINTS, schema.KEYPOINT_SCORES]),
    ):
        predictor = Predictor(checkpoint, VIEWS, EnsembleConfig(), score_floor=1.01)
        table = predictor(batch).to_pydict()
        for column in [schema.BOXES, *columns]:
            assert table[column] == [[], []]


def test_averaged_masks_of_several_views(mask_checkpoint, demo_dir):
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    dets = Predictor(mask_checkpoint, VIEWS, EnsembleConfig()).predict([image])[0]
    assert len(dets[schema.MASKS]) == len(dets[schema.BOXES]) > 0
    masks = [decode_rle(m, *image.shape[:2]) for m in dets[schema.MASKS]]
    assert any(m.any() for m in masks)
    for mask, box in zip(masks, dets[schema.BOXES], strict=True):
        ys, xs = np.nonzero(mask)  # every mask pixel lies in (or next to) its box
        if len(xs):
            assert xs.min() >= box[0] - 2 and xs.max() <= box[2] + 1
            assert ys.min() >= box[1] - 2 and ys.max() <= box[3] + 1


class _FakeBranch:
    """Stands in for a mask or keypoint branch (RoI pool, head, predictor): it
    records the RoIs each view asks about and answers view ``i`` with
    ``outputs[i]``, so the average over the views is known in advance."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs, self.rois = outputs, []

    def pool(self, features, rois, image_sizes):
        self.rois.append([r.clone() for r in rois])
        return torch.cat(rois)

    def predict(self, pooled):
        assert len(pooled) == len(self.outputs[0])
        return self.outputs[len(self.rois) - 1]

    def parts(self):
        return self.pool, (lambda x: x), self.predict


def _two_images(demo_dir):
    """Two 128x128 test images as tensors, with 2 and 1 fused boxes."""
    paths = sorted((demo_dir / "test").glob("*.png"))[:2]
    tensors = [
        torch.from_numpy(load_rgb(str(p))).permute(2, 0, 1).float() / 255 for p in paths
    ]
    boxes = [
        torch.tensor([[10.0, 20.0, 50.0, 60.0], [64.0, 0.0, 128.0, 40.0]]),
        torch.tensor([[5.0, 5.0, 100.0, 90.0]]),
    ]
    labels = [torch.tensor([3, 7]), torch.tensor([1])]
    return tensors, [(128, 128)] * 2, boxes, labels


def test_soft_masks_are_averaged_over_the_views(mask_checkpoint, demo_dir):
    """SOFT_AVG: each view's soft mask of the box's own class, mirrored back under
    a flip, averaged."""
    tensors, shapes, boxes, labels = _two_images(demo_dir)
    n, classes, side = 3, 11, 4
    ramp = torch.tensor([0.1, 0.3, 0.5, 0.7]).expand(n, side, side)  # along x
    own = [torch.full((n, side, side), 0.2), torch.full((n, side, side), 0.6), ramp]
    outputs = []
    for probability in own:  # every other class says 0.99: it must not be read
        view = torch.full((n, classes, side, side), 0.99)
        view[torch.arange(n), torch.cat(labels)] = probability
        outputs.append(torch.logit(view))
    fake = _FakeBranch(outputs)
    predictor = Predictor(mask_checkpoint, VIEWS, EnsembleConfig())
    predictor.mask_branch = fake.parts()
    with torch.inference_mode():
        masks = predictor._instance_maps(tensors, shapes, boxes, labels)["masks"]
    # views: as is, scale 160 (x1.25), flipped (the ramp comes back reversed)
    expected = (0.2 + 0.6 + torch.tensor([0.7, 0.5, 0.3, 0.1])) / 3
    assert [m.shape for m in masks] == [(2, side, side), (1, side, side)]
    for mask in torch.cat(masks):
        torch.testing.assert_close(mask, expected.expand(side, side), atol=1e-5, rtol=0)
    # each view was asked about the fused boxes in its own pixels
    for image, box in enumerate(boxes):
        torch.testing.assert_close(fake.rois[0][image], box)
        torch.testing.assert_close(fake.rois[1][image], box * 1.25)
        torch.testing.assert_close(fake.rois[2][image], hflip_boxes(box, 128))


def test_keypoint_heatmaps_are_averaged_over_the_views(keypoint_checkpoint, demo_dir):
    """HM_AVG: each view's heatmaps, mirrored back and left/right swapped under a
    flip, averaged."""
    tensors, shapes, boxes, labels = _two_images(demo_dir)
    n, side, flip = 3, 3, [0, 1, 3, 2]  # top, bottom, left, right
    keypoint = torch.arange(4.0)[None, :, None, None].expand(n, 4, side, side)
    x = torch.arange(float(side)).expand(n, 4, side, side)
    outputs = [keypoint, 10 + keypoint, 100 * keypoint + x]  # the last: flipped
    fake = _FakeBranch(outputs)
    predictor = Predictor(
        keypoint_checkpoint, VIEWS, EnsembleConfig(), keypoint_flip=flip
    )
    predictor.keypoint_branch = fake.parts()
    with torch.inference_mode():
        maps = predictor._instance_maps(tensors, shapes, boxes, labels)["keypoints"]
    assert [m.shape for m in maps] == [(2, 4, side, side), (1, 4, side, side)]
    # the flipped view's come back mirrored (x reversed) and left <-> right
    back = 100 * torch.tensor(flip, dtype=torch.float32)[:, None, None]
    back = back + torch.tensor([2.0, 1.0, 0.0])
    expected = (2 * torch.arange(4.0)[:, None, None] + 10 + back) / 3
    for heatmaps in torch.cat(maps):
        torch.testing.assert_close(
            heatmaps, expected.expand(4, side, side), atol=1e-5, rtol=0
        )


def test_flip_view_swaps_left_and_right_keypoints(keypoint_checkpoint, demo_dir):
    flip = [0, 1, 3, 2]  # top, bottom, left, right
    image, plain, flipped = _mirror_pair(
        keypoint_checkpoint, demo_dir, keypoint_flip=flip
    )
    n = len(plain[schema.BOXES])
    assert n > 0 and plain[schema.KEYPOINTS].shape == (n, 12)
    assert plain[schema.KEYPOINT_SCORES].shape == (n, 4)
    a = plain[schema.KEYPOINTS].reshape(n, 4, 3)
    b = flipped[schema.KEYPOINTS].reshape(n, 4, 3)[:, flip]  # the mirror's left...
    mirrored_x = image.shape[1] - b[..., 0]
    assert np.median(np.abs(mirrored_x - a[..., 0])) <= 1.0
    assert np.median(np.abs(b[..., 1] - a[..., 1])) <= 1.0
    assert (a[..., 2] == 2).all()
    # without the swap, the flipped "left" keypoints land on the plain "right" ones
    unswapped = image.shape[1] - flipped[schema.KEYPOINTS].reshape(n, 4, 3)[..., 0]
    assert np.median(np.abs(unswapped[:, 2] - a[:, 2, 0])) > np.median(
        np.abs(mirrored_x[:, 2] - a[:, 2, 0])
    )


def test_pipeline_writes_one_row_per_image_even_bad_or_empty(
    ray_local, checkpoint, demo_dir, tmp_path
):
    paths = sorted(str(p) for p in (demo_dir / "unlabeled").glob("*.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    shutil.copy(paths[0], tmp_path / "copy.png")
    paths += [str(corrupt), str(tmp_path / "copy.png")]
    for floor, expect_boxes in ((0.0, True), (1.01, False)):
        frame = predict_dataset(
            paths,
            checkpoint,
            VIEWS,
            EnsembleConfig(),
            InferenceConfig(batch_size=4, score_floor=floor),
        ).to_pandas()
        assert sorted(frame[schema.PATH]) == sorted(paths)
        bad = frame[frame[schema.PATH] == str(corrupt)].iloc[0]
        assert bad[schema.ERROR] and len(bad[schema.BOXES]) == 0
        good = frame[frame[schema.ERROR] == ""]
        assert len(good) == len(paths) - 1
        assert (good[schema.HEIGHT] == 128).all() and (good[schema.WIDTH] == 128).all()
        counts = good[schema.BOXES].map(len)
        assert (counts > 0).all() if expect_boxes else (counts == 0).all()


def _config(demo_dir, out, weights, **unlabeled):
    raw = tiny_config(demo_dir, out, weights)
    raw["data"]["unlabeled"].update(unlabeled)
    raw["inference"] = {"batch_size": 2}
    return raw


def _parts(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def test_parts_are_named_by_their_inputs_and_appending_keeps_finished_ones(
    ray_local, checkpoint, demo_dir, weights, tmp_path
):
    listing = tmp_path / "list.txt"
    uris = sorted(str(p) for p in (demo_dir / "unlabeled").glob("*.png"))
    listing.write_text("\n".join(uris))
    raw = _config(demo_dir, tmp_path / "out", weights, shard_size=3)
    raw["data"]["unlabeled"]["images"] = str(listing)
    config = parse_config(raw)
    out = tmp_path / "out" / CANDIDATES_DIR
    first = label_sources(sources(config.data.unlabeled), checkpoint, config, out)
    assert (first.images, first.written_parts, first.skipped_parts) == (10, 4, 0)
    written = _parts(out)
    assert len(written) == 4  # 10 images, 3 per part
    for part in written:  # each part holds its own run of the list, in order
        paths = list(pd.read_parquet(out / part)[schema.PATH])
        assert paths == uris[uris.index(paths[0]) : uris.index(paths[0]) + len(paths)]
    assert list(read_candidates(out)[schema.PATH]) == uris

    again = label_sources(sources(config.data.unlabeled), checkpoint, config, out)
    assert (again.written_parts, again.skipped_parts, again.images) == (0, 4, 10)
    assert _parts(out) == written  # nothing rewritten

    # a crawl that grew: two more lines; only the last (now fuller) part is new
    listing.write_text("\n".join(uris + uris[:2]))
    grown = label_sources(sources(config.data.unlabeled), checkpoint, config, out)
    assert (grown.written_parts, grown.skipped_parts, grown.images) == (1, 3, 12)
    after = _parts(out)
    assert {k: after[k] for k in written} == written  # old parts kept, untouched
    assert len(after) == 5 and len(read_candidates(out)) == 12  # the index: 4 parts

    # other settings: new parts, and the old ones are still there
    other = parse_config({**raw, "views": [{}]})
    fresh = label_sources(sources(other.data.unlabeled), checkpoint, other, out)
    assert (fresh.written_parts, fresh.skipped_parts) == (4, 0)
    assert set(written) <= set(_parts(out)) and len(_parts(out)) == 9


def _tar(path, files, extra=True):
    """A WebDataset shard: each image with a .json metadata member."""
    with tarfile.open(path, "w") as tar:
        for i, file in enumerate(files):
            tar.add(file, arcname=f"{i:06d}{file.suffix}")
            if extra:
                meta = json.dumps({"source": file.name}).encode()
                info = tarfile.TarInfo(f"{i:06d}.json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))


def test_webdataset_tars_and_sharded_manifests_are_read_on_the_cluster(
    ray_local, checkpoint, demo_dir, weights, tmp_path
):
    files = sorted((demo_dir / "unlabeled").glob("*.png"))
    (tmp_path / "tars").mkdir()
    _tar(tmp_path / "tars" / "shard-0.tar", files[:6])
    _tar(tmp_path / "tars" / "shard-1.tar", files[6:])
    raw = _config(demo_dir, tmp_path / "out", weights)
    raw["data"]["unlabeled"]["images"] = str(tmp_path / "tars" / "*.tar")
    config = parse_config(raw)
    assert [s["kind"] for s in sources(config.data.unlabeled)] == ["tar", "tar"]
    out = tmp_path / "out" / CANDIDATES_DIR
    result = label_sources(sources(config.data.unlabeled), checkpoint, config, out)
    assert (result.images, result.written_parts, len(result.errors)) == (10, 2, 0)
    frame = read_candidates(out)
    assert len(frame) == 10 and (frame[schema.ERROR] == "").all()  # .json skipped
    for path in frame[schema.PATH]:  # a member URI reads the member's bytes
        name = path.rsplit("/", 1)[-1]
        original = files[int(name[:6]) + (6 if "shard-1" in path else 0)]
        assert read_bytes(path) == original.read_bytes()
    # two independent jobs split the tars between them, each with its index
    split = tmp_path / "out-split" / CANDIDATES_DIR
    done = [
        label_sources(sources(config.data.unlabeled), checkpoint, config, split, 2, j)
        for j in (0, 1)
    ]
    assert sum(r.images for r in done) == 10 and len(read_candidates(split)) == 10

    (tmp_path / "manifest").mkdir()
    for i, chunk in enumerate((files[:4], files[4:])):
        pd.DataFrame({"url": [f.name for f in chunk]}).to_parquet(
            tmp_path / "manifest" / f"part-{i}.parquet"
        )
    raw["data"]["unlabeled"].update(
        images=str(tmp_path / "manifest" / "*.parquet"),
        column="url",
        root=str(files[0].parent),
        shard_size=3,
    )
    config = parse_config(raw)
    out = tmp_path / "out2" / CANDIDATES_DIR
    result = label_sources(sources(config.data.unlabeled), checkpoint, config, out)
    assert (result.images, result.written_parts) == (10, 4)  # 4 -> 3+1, 6 -> 3+3
    assert sorted(read_candidates(out)[schema.PATH]) == [str(f) for f in files]


def _odd_images(folder):
    """Real files of every kind a crawl holds, readable or not."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (90, 120, 3), np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(np.tile(rgb, (30, 30, 1))).save(folder / "huge.jpg")  # 2700x3600
    good = (folder / "gray.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return {
        "readable": {
            "gray.png": (90, 120),
            "rgba.png": (90, 120),
            "palette.png": (90, 120),
            "deep16.png": (90, 120),
            "cmyk.jpg": (90, 120),
            "rotated.jpg": (120, 90),
            "huge.jpg": (2700, 3600),
        },
        "unreadable": ["truncated.png", "empty.jpg", "notes.txt"],
    }


def test_bad_input_never_stops_the_run_and_is_never_dropped(
    ray_local, checkpoint, demo_dir, weights, tmp_path
):
    kinds = _odd_images(tmp_path / "odd")
    listing = tmp_path / "list.txt"  # a list with a file that does not exist
    names = sorted([*kinds["readable"], *kinds["unreadable"]]) + ["missing.jpg"]
    listing.write_text("\n".join(str(tmp_path / "odd" / n) for n in names))
    raw = _config(demo_dir, tmp_path / "out", weights, images=str(listing))
    raw["data"].pop("validation")
    config = parse_config(raw)
    shutil.copytree(checkpoint, tmp_path / "out" / TEACHER_DIR)
    result = pseudo_label(config, str(tmp_path / "out" / TEACHER_DIR))
    assert (result.images, result.errors) == (11, 4)
    frame = read_candidates(result.candidates)
    assert sorted(frame[schema.PATH].map(os.path.basename)) == sorted(names)
    errors = pd.read_csv(tmp_path / "out" / ERRORS_FILE)
    assert sorted(errors["uri"].map(os.path.basename)) == sorted(
        [*kinds["unreadable"], "missing.jpg"]
    )
    assert errors["reason"].str.len().gt(0).all()
    assert (
        "FileNotFound"
        in errors.set_index("uri")["reason"][
            str(listing.parent / "odd" / "missing.jpg")
        ]
    )
    for name, (h, w) in kinds["readable"].items():
        row = frame[frame[schema.PATH].str.endswith(name)].iloc[0]
        assert (row[schema.ERROR], row[schema.HEIGHT], row[schema.WIDTH]) == ("", h, w)
        boxes = schema.detections_from_row(row)[schema.BOXES]
        assert len(boxes) > 0 and boxes[:, 2].max() <= w + 1e-2
        assert boxes[:, 3].max() <= h + 1e-2


@pytest.mark.slow
def test_a_killed_run_resumes_with_one_row_per_image(
    checkpoint, demo_dir, weights, tmp_path
):
    images = tmp_path / "many"
    images.mkdir()
    for copy in range(6):  # 60 images, 15 shards of 4
        for p in sorted((demo_dir / "unlabeled").glob("*.png")):
            shutil.copy(p, images / f"{copy}_{p.name}")
    raw = _config(demo_dir, tmp_path / "out", weights, images=str(images), shard_size=4)
    raw["data"].pop("validation")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    shutil.copytree(checkpoint, tmp_path / "out" / TEACHER_DIR)
    out = tmp_path / "out" / CANDIDATES_DIR
    command = [sys.executable, "-m", "raydd.cli", "pseudo-label", str(config)]
    env = {**os.environ, "RAY_ADDRESS": ""}

    first = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        assert first.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
    first.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 0 < len(survivors) < 15

    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"({len(survivors)} parts already done)" in second.stderr
    assert f"{15 - len(survivors)} written now, {len(survivors)} done before" in (
        second.stderr
    )
    assert len(list(out.glob("part-*.parquet"))) == 15
    for name, mtime in survivors.items():  # finished shards were not redone
        assert (out / name).stat().st_mtime_ns == mtime
    frame = read_candidates(out)
    assert len(frame) == 60 and frame[schema.PATH].is_unique
    assert set(frame[schema.PATH]) == {str(p) for p in images.iterdir()}
