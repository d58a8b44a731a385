"""Step 3: the pseudo-label score threshold, searched with Ray Tune.

The paper keeps instances scoring above a threshold chosen so that the mean number of
instances per unlabeled image matches the labeled set's. Each Tune trial evaluates one
threshold over the cached candidate scores (no re-inference): it only filters and
counts. Tune's results (JSON, CSV and TensorBoard event files) stay under
``OUTPUT_DIR/tune`` for ``tensorboard --logdir OUTPUT_DIR/tune``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from raydd import schema
from raydd.config import ThresholdConfig

logger = logging.getLogger(__name__)

THRESHOLD_FILE = "threshold.json"


def instances_per_image(scores: np.ndarray, num_images: int, threshold: float) -> float:
    """Mean instances per image scoring ``>= threshold`` (``scores``: all images')."""
    return float(np.count_nonzero(scores >= threshold)) / max(num_images, 1)


def _trial(
    params: dict[str, Any], scores: np.ndarray, num_images: int, target: float
) -> None:
    threshold = float(params["threshold"])
    mean = instances_per_image(scores, num_images, threshold)
    tune.report(
        {"threshold": threshold, "instances_per_image": mean, "gap": abs(mean - target)}
    )


def _search_space(cfg: ThresholdConfig) -> tuple[dict[str, Any], tune.TuneConfig]:
    if cfg.search == "grid":
        grid = np.round(np.linspace(cfg.low, cfg.high, cfg.num_samples), 6).tolist()
        space = {"threshold": tune.grid_search(grid)}
        return space, tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials)
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric="gap", mode="min", seed=0)
    space = {"threshold": tune.uniform(cfg.low, cfg.high)}
    return space, tune.TuneConfig(
        search_alg=searcher,
        num_samples=cfg.num_samples,
        max_concurrent_trials=cfg.max_concurrent_trials,
    )


@dataclass(frozen=True)
class ThresholdResult:
    """The chosen threshold and what it gives: instances per image on both sets."""

    threshold: float
    labeled_instances_per_image: float
    pseudo_instances_per_image: float
    trials: int


def search_threshold(
    candidates: pd.DataFrame,
    target: float,
    cfg: ThresholdConfig,
    storage_path: str | Path,
) -> ThresholdResult:
    """Finds ``t`` minimising ``|instances_per_image(t) - target|`` with Ray Tune.

    Args:
        candidates: the Parquet candidates (column ``scores``: one array per image).
        target: mean instances per labeled image.
        cfg: search settings.
        storage_path: Tune's storage (the experiment is named ``threshold``).

    Ties (counts are step functions of ``t``) go to the lowest threshold.
    """
    ok = candidates[candidates[schema.ERROR] == ""]
    scores = np.concatenate(
        [np.zeros(0, np.float32), *map(np.asarray, ok[schema.SCORES])]
    )
    space, tune_config = _search_space(cfg)
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(
                _trial, scores=scores, num_images=len(ok), target=target
            ),
            {"CPU": 0.5},
        ),
        param_space=space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name="threshold", storage_path=str(Path(storage_path).resolve()), verbose=0
        ),
    )
    frame = tuner.fit().get_dataframe()
    best = frame.sort_values(["gap", "threshold"]).iloc[0]
    return ThresholdResult(
        float(best["threshold"]), target, float(best["instances_per_image"]), len(frame)
    )


def save_threshold(result: ThresholdResult, output_dir: str | Path) -> Path:
    path = Path(output_dir) / THRESHOLD_FILE
    path.write_text(json.dumps(asdict(result), indent=2))
    return path


def load_threshold(output_dir: str | Path) -> ThresholdResult:
    return ThresholdResult(
        **json.loads((Path(output_dir) / THRESHOLD_FILE).read_text())
    )
