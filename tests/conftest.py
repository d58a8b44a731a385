"""Shared fixtures: one local Ray per session, a tiny real demo dataset, weights."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from raydd.data.demo import smoke_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# the model section of the smoke config, without weights (tests add their own)
TINY_MODEL = {
    k: v
    for k, v in smoke_config(".", ".", "")["model"].items()
    if k != "backbone_weights"
}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    # Ray Data's threads of a pipeline a test closed early can still be fetching
    # blocks: Ray shut down under them ends the process ("The core worker has
    # already been shutdown"). Let them finish first.
    for thread in threading.enumerate():
        if thread.name == "iter_threaded" or thread.name.startswith("StreamingExec"):
            thread.join(timeout=10)
    gc.collect()  # Ray objects the tests left behind go while Ray is still up
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from raydd.data.demo import DemoSizes, write_demo_dataset

    sizes = DemoSizes(labeled=8, unlabeled=10, test=6, validation=6)
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), seed=1, sizes=sizes)


@pytest.fixture(scope="session")
def weights() -> str:
    from raydd.models import offline_mobilenet_v2_weights

    return offline_mobilenet_v2_weights()


def tiny_config(demo: Path, out: Path, weights: str) -> dict:
    """A raw config dict for a run that takes about a minute on the tiny demo data."""
    return smoke_config(demo, out, weights)


# `make test` runs on 2 xdist processes, a file per process at a time (--dist loadfile:
# a file's module fixtures, e.g. the multi-node cluster, are set up once). The longest
# files go first, so that none of them is left to run alone at the end.
LONGEST_FIRST = (
    "test_multinode.py",
    "test_paper_bench.py",
    "test_benchmarks.py",
    "test_end_to_end.py",
    "test_pseudo_label.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else 99

    items.sort(key=rank)  # stable: each file keeps its own order
