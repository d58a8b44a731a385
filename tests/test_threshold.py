import numpy as np
import pandas as pd
import pytest

from raydd import schema
from raydd.config import ThresholdConfig
from raydd.threshold import instances_per_image, search_threshold


def candidates(scores_per_image: list[list[float]], errors: int = 0) -> pd.DataFrame:
    rows = [
        {
            schema.PATH: f"img{i}.png",
            schema.ERROR: "",
            schema.SCORES: np.asarray(s, np.float32),
        }
        for i, s in enumerate(scores_per_image)
    ]
    rows += [
        {
            schema.PATH: f"bad{i}.png",
            schema.ERROR: "OSError: truncated",
            schema.SCORES: np.zeros(0, np.float32),
        }
        for i in range(errors)
    ]
    return pd.DataFrame(rows)


def test_instances_per_image_counts_at_or_above():
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    assert instances_per_image(scores, 2, 0.5) == 1.5
    assert instances_per_image(scores, 2, 0.95) == 0.0
    assert instances_per_image(np.zeros(0), 0, 0.5) == 0.0


def test_grid_search_finds_the_analytic_threshold(ray_local, tmp_path):
    # 4 images; scores spread so that exactly 2 instances per image remain for
    # t in (0.55, 0.70]; the lowest grid point there is 0.6.
    frame = candidates(
        [[0.95, 0.7, 0.3], [0.9, 0.8, 0.55, 0.1], [0.99, 0.75], [0.72, 0.71, 0.2]],
        errors=2,
    )
    cfg = ThresholdConfig(search="grid", num_samples=11)  # 0.0, 0.1, ..., 1.0
    result = search_threshold(frame, target=2.0, cfg=cfg, storage_path=tmp_path)
    assert result.threshold == pytest.approx(0.6)
    assert result.pseudo_instances_per_image == 2.0  # unreadable images are not counted
    assert result.trials == 11
    assert list((tmp_path / "threshold").rglob("events.out.tfevents*"))


def test_optuna_search_gets_close(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    frame = candidates([rng.random(20).tolist() for _ in range(50)])  # uniform scores
    cfg = ThresholdConfig(search="optuna", num_samples=12)
    result = search_threshold(frame, target=5.0, cfg=cfg, storage_path=tmp_path)
    # 20 uniform scores per image: 5 per image above t = 0.75
    assert result.threshold == pytest.approx(0.75, abs=0.08)
    assert abs(result.pseudo_instances_per_image - 5.0) < 1.6


def test_no_candidates_at_all(ray_local, tmp_path):
    frame = candidates([[], []])
    result = search_threshold(
        frame, target=3.0, cfg=ThresholdConfig(num_samples=3), storage_path=tmp_path
    )
    assert result.pseudo_instances_per_image == 0.0 and result.threshold == 0.0
