"""Fusing the views' detections: raydd's batched fusion vs ``ensemble-boxes``.

Synthetic detections: 64 images, 8 views x 100 boxes each, 10-20 objects per image
and 5 labels; a view's boxes are jittered around the objects (confident, mostly the
object's label) or lie anywhere (diffident background). Times every raydd method on
the whole batch in one call (target: ``wbf`` >= 10x the images/s of
``ensemble_boxes.weighted_boxes_fusion`` called per image, as a user would, with
boxes normalised to [0, 1]), checks that both WBFs give the same boxes, scores and
labels (to 1e-4 in normalised coordinates) and writes
``benchmarks/results/fusion.json``.

    python benchmarks/fusion.py [--smoke] [--threads 1] [--device cpu] [--images 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ensemble_boxes import weighted_boxes_fusion

from raydd.config import EnsembleConfig
from raydd.ensemble import FUSION_METHODS, fuse

ROOT = Path(__file__).resolve().parents[1]
SIZES = np.array([[640, 480], [800, 600], [1024, 768]], dtype=np.float32)


def synthetic_views(
    images: int, views: int, per_view: int, labels: int, rng: np.random.Generator
) -> list[dict]:
    """Per image: its ``[W, H, W, H]`` size and per view (boxes, scores, labels)."""
    data = []
    for _ in range(images):
        size = np.tile(SIZES[rng.integers(len(SIZES))], 2)
        k = int(rng.integers(10, 21))
        centre = rng.uniform(0.1, 0.9, (k, 2)) * size[:2]
        half = rng.uniform(0.02, 0.15, (k, 2)) * size[:2]
        label = rng.integers(0, labels, k)
        detections = [
            _view(centre, half, label, size, per_view, labels, rng)
            for _ in range(views)
        ]
        data.append({"size": size, "views": detections})
    return data


def _view(centre, half, label, size, n, labels, rng):
    obj = rng.integers(0, len(centre), n)
    jitter = 1 + rng.normal(0, 0.08, (n, 4))
    around = np.concatenate(
        [
            centre[obj] - half[obj] * jitter[:, :2],
            centre[obj] + half[obj] * jitter[:, 2:],
        ],
        1,
    )
    corners = rng.uniform(0, 1, (n, 2, 2)) * size[:2]
    anywhere = np.concatenate([corners.min(1), corners.max(1) + 1], 1)
    on_object = rng.random(n) < 0.6
    boxes = np.where(on_object[:, None], around, anywhere).clip(0, size)
    scores = np.where(on_object, rng.beta(8, 2, n), rng.beta(1.5, 6, n))
    right = on_object & (rng.random(n) < 0.9)
    out_labels = np.where(right, label[obj], rng.integers(0, labels, n))
    return boxes.astype(np.float32), scores.astype(np.float32), out_labels


def as_batch(data: list[dict], device: str) -> tuple[torch.Tensor, ...]:
    """The union of every view of every image, as :func:`raydd.ensemble.fuse` takes
    it."""
    parts = [
        (b, s, lab, np.full(len(s), i))
        for i, image in enumerate(data)
        for b, s, lab in image["views"]
    ]
    return tuple(
        torch.from_numpy(np.concatenate(column)).to(device)
        for column in zip(*parts, strict=True)
    )


def ensemble_boxes_wbf(data: list[dict], config: EnsembleConfig) -> list[tuple]:
    """``weighted_boxes_fusion`` per image, in pixels like raydd's output."""
    out = []
    for image in data:
        size, views = image["size"], image["views"]
        boxes, scores, labels = weighted_boxes_fusion(
            [b / size for b, _, _ in views],
            [s for _, s, _ in views],
            [lab for _, _, lab in views],
            iou_thr=config.wbf_iou,
            skip_box_thr=0.0,
            conf_type="avg",
        )
        out.append((boxes * size, scores, labels))
    return out


def _rows(boxes, scores, labels, size) -> np.ndarray:
    """``[n, 6]`` (label, score, normalised box), sorted by label then score."""
    table = np.concatenate(
        [
            np.asarray(labels, np.float64)[:, None],
            np.asarray(scores, np.float64)[:, None],
            np.asarray(boxes, np.float64) / size,
        ],
        1,
    )
    return table[np.lexsort((-table[:, 1], table[:, 0]))]


def max_difference(ours: tuple[torch.Tensor, ...], theirs: list[tuple], data) -> float:
    """Largest difference between the two WBFs' rows (inf if any count differs)."""
    boxes, scores, labels, images = (t.cpu().numpy() for t in ours)
    worst = 0.0
    for i, (image, reference) in enumerate(zip(data, theirs, strict=True)):
        mine = images == i
        a = _rows(boxes[mine], scores[mine], labels[mine], image["size"])
        b = _rows(*reference, image["size"])
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
    return worst


def images_per_s(run, images: int, repeats: int, device: str) -> float:
    run()  # warm-up (numba compiles, caches fill)
    seconds = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tic)
    return images / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="4 images, 2x10 boxes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where raydd fuses")
    parser.add_argument("--images", type=int, default=64, help="images in the batch")
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks/results/fusion.json")
    )
    args = parser.parse_args()
    # ensemble-boxes runs on one core; so, by default, does raydd.
    torch.set_num_threads(args.threads)
    images, views, per_view = (4, 2, 10) if args.smoke else (args.images, 8, 100)
    repeats = 1 if args.smoke else 5
    data = synthetic_views(images, views, per_view, 5, np.random.default_rng(0))
    batch = as_batch(data, args.device)

    # [1] raydd, every method, the whole batch in one call (default config).
    speed = {}
    for method in FUSION_METHODS:
        config = EnsembleConfig(method=method)
        speed[method] = images_per_s(
            lambda c=config: fuse(*batch, c, views), images, repeats, args.device
        )
    # [2] ensemble-boxes' WBF per image; WBF compared uncapped, as it does not cap.
    config = EnsembleConfig(method="wbf", max_detections=views * per_view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boxes on the image border
        reference = ensemble_boxes_wbf(data, config)
        speed["ensemble_boxes_wbf"] = images_per_s(
            lambda: ensemble_boxes_wbf(data, config), images, 1, "cpu"
        )
    difference = max_difference(fuse(*batch, config, views), reference, data)

    record = {
        "benchmark": "fusion",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""),
        "command": "python benchmarks/fusion.py"
        + (" --smoke" if args.smoke else "")
        + f" --threads {args.threads} --device {args.device} --images {images}",
        "images": images,
        "views": views,
        "boxes_per_view": per_view,
        "detections": int(len(batch[0])),
        "images_per_s": {k: round(v, 1) for k, v in speed.items()},
        "wbf_speedup": round(speed["wbf"] / speed["ensemble_boxes_wbf"], 1),
        "wbf_max_abs_diff": difference if np.isfinite(difference) else None,
        "wbf_equal_output": difference <= 1e-4,
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    print(f"{'method':<20}{'images/s':>10}")
    for name, value in speed.items():
        print(f"{name:<20}{value:>10.1f}")
    print(
        f"wbf speed-up over ensemble-boxes: {record['wbf_speedup']}x; equal output "
        f"(max |diff| {difference:.1e} <= 1e-4): {record['wbf_equal_output']}"
    )
    print(f"results: {results}")


if __name__ == "__main__":
    main()
