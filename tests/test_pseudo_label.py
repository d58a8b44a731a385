import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from raydd import schema
from raydd.checkpoint import save_detector
from raydd.config import EnsembleConfig, InferenceConfig, ModelConfig, ViewConfig
from raydd.data.coco import Categories
from raydd.data.images import load_rgb
from raydd.models import build_model
from raydd.pseudo_label import Predictor, predict_dataset

VIEWS = [ViewConfig(), ViewConfig(scale=160), ViewConfig(hflip=True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights):
    """An untrained detector (pretrained backbone, random heads): plenty of boxes."""
    torch.manual_seed(0)
    config = ModelConfig(backbone_weights=weights, **TINY_MODEL)
    model = build_model(config, num_classes=11)
    path = tmp_path_factory.mktemp("ckpt")
    save_detector(
        path, model, config, Categories(tuple(range(1, 11)), tuple(map(str, range(10))))
    )
    return str(path)


def test_views_are_mapped_back_into_the_original_image(checkpoint, demo_dir):
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


def test_single_identity_view_is_the_model_output(checkpoint, demo_dir):
    image = load_rgb(str(next((demo_dir / "test").glob("*.png"))))
    predictor = Predictor(checkpoint, [ViewConfig()], EnsembleConfig())
    ours = predictor.predict([image])[0]
    with torch.inference_mode():
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        direct = predictor.model([tensor])[0]
    np.testing.assert_allclose(ours[schema.BOXES], direct["boxes"].numpy(), atol=1e-4)


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
