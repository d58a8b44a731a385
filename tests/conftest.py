"""Shared fixtures: one local Ray per session, a tiny real demo dataset, weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY_MODEL = {
    "min_size": [128],
    "max_size": 128,
    "kwargs": {
        "anchor_sizes": [[16], [32], [64], [128]],
        "rpn_post_nms_top_n_test": 100,
    },
}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from raydd.data.demo import DemoSizes, write_demo_dataset

    sizes = DemoSizes(labeled=8, unlabeled=10, test=6)
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), seed=1, sizes=sizes)


@pytest.fixture(scope="session")
def weights() -> str:
    from raydd.models import offline_mobilenet_v2_weights

    return offline_mobilenet_v2_weights()


def tiny_config(demo: Path, out: Path, weights: str, **sections) -> dict:
    """A raw config dict for a run that takes seconds on the tiny demo data."""
    raw = {
        "data": {
            "labeled": {
                "annotations": str(demo / "labeled.json"),
                "images": str(demo / "labeled"),
            },
            "unlabeled": {"images": str(demo / "unlabeled")},
            "test": {
                "annotations": str(demo / "test.json"),
                "images": str(demo / "test"),
            },
        },
        "output_dir": str(out),
        "model": {**TINY_MODEL, "backbone_weights": weights},
        "teacher": {
            "iterations": 4,
            "batch_size": 2,
            "checkpoint_every": 2,
            "warmup_iterations": 2,
            "cpus_per_worker": 2,
            "hflip_prob": 0.0,
        },
        "views": [{}, {"scale": 160}, {"hflip": True}],
        "threshold": {"num_samples": 6},
        "student": {
            "iterations": 4,
            "batch_size": 5,
            "checkpoint_every": 2,
            "warmup_iterations": 2,
            "cpus_per_worker": 2,
        },
    }
    raw.update(sections)
    return raw
