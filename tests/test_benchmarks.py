"""Each benchmark's --smoke variant runs here so the scripts cannot rot."""

import json
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_distill_demo_smoke(ray_local, tmp_path, monkeypatch, capsys):
    results = tmp_path / "distill_demo.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "distill_demo.py",
            "--smoke",
            "--output-dir",
            str(tmp_path / "work"),
            "--results",
            str(results),
        ],
    )
    runpy.run_path(str(BENCHMARKS / "distill_demo.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["smoke"] is True and record["images"]["unlabeled"] == 10
    assert set(record["student"]) == {"AP", "AP50", "AP75"}
    assert "student - teacher" in capsys.readouterr().out
