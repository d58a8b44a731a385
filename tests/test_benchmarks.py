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


def test_threshold_search_smoke(ray_local, tmp_path, monkeypatch, capsys):
    results = tmp_path / "threshold_search.json"
    monkeypatch.setattr(
        sys, "argv", ["threshold_search.py", "--smoke", "--results", str(results)]
    )
    runpy.run_path(str(BENCHMARKS / "threshold_search.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["candidates"] == 10_000 and record["trials"] == 41
    assert 0.0 < record["threshold"] < 1.0
    assert 0.0 <= record["precision"] <= 1.0


def test_report_renders_the_results(tmp_path, monkeypatch):
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    record = {
        "benchmark": "threshold_search",
        "machine": "m",
        "date": "d",
        "command": "c",
        "candidates": 1_000_000,
        "trials": 41,
        "seconds": 12.5,
        "threshold": 0.5,
        "precision": 0.9,
        "recall": 0.8,
    }
    lines = module["_threshold_search"](record)
    assert lines[-1] == "| 1,000,000 | 41 | 12.5 | 0.500 | 0.900 | 0.800 |"


def test_fusion_smoke(tmp_path, monkeypatch, capsys):
    results = tmp_path / "fusion.json"
    monkeypatch.setattr(
        sys, "argv", ["fusion.py", "--smoke", "--results", str(results)]
    )
    runpy.run_path(str(BENCHMARKS / "fusion.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["smoke"] is True and record["detections"] == 80
    assert record["wbf_equal_output"] is True
    assert set(record["images_per_s"]) == {
        "nms",
        "soft_nms",
        "box_voting",
        "wbf",
        "ensemble_boxes_wbf",
    }
    assert "speed-up over ensemble-boxes" in capsys.readouterr().out
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    assert module["_fusion"](record)[0] == "| method | images/s |"


def test_pseudo_label_throughput_smoke(ray_local, tmp_path, monkeypatch, capsys):
    results = tmp_path / "throughput.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pseudo_label_throughput.py",
            "--smoke",
            "--canvas",
            "128",
            "--results",
            str(results),
        ],
    )
    runpy.run_path(str(BENCHMARKS / "pseudo_label_throughput.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["smoke"] is True and record["bare_images_per_s"] > 0
    assert record["pipeline"]["N"]["images"] == 6
    assert record["pipeline"]["10N"]["images"] == 60
    assert record["pipeline"]["10N"]["peak_pss_mb"] > 100  # Ray's processes counted
    assert "pipeline(10N) / bare loop" in capsys.readouterr().out
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    assert module["_pseudo_label_throughput"](record)[2].startswith("| bare torch")


def test_train_throughput_smoke(ray_local, tmp_path, monkeypatch, capsys):
    results = tmp_path / "train_throughput.json"
    monkeypatch.setattr(
        sys, "argv", ["train_throughput.py", "--smoke", "--results", str(results)]
    )
    runpy.run_path(str(BENCHMARKS / "train_throughput.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["smoke"] is True and record["batch_size"] == 5
    assert record["plain"]["before"]["timed_steps"] == 4
    assert [i["step"] for i in record["ray_train"]["intervals"]] == [4, 6]
    assert record["ray_train"]["images_per_s"] > 0
    assert 0.0 <= record["data_wait_share"] < 1.0
    assert "Ray Train / plain" in capsys.readouterr().out
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    assert module["_train_throughput"](record)[2].startswith("| plain torch loop")
