"""Each benchmark's --smoke variant runs here so the scripts cannot rot."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from raydd.ingest import RowStream, Shuffle, next_batch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
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
    # the teacher is trained on the student's schedule: it is the control
    printed = capsys.readouterr().out
    assert "student - teacher" in printed
    assert "it is the labeled-only control" in printed


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_throughput_smoke(ray_local, tmp_path, monkeypatch, capsys):
    results = tmp_path / "train_throughput.json"
    monkeypatch.setattr(
        sys, "argv", ["train_throughput.py", "--smoke", "--results", str(results)]
    )
    runpy.run_path(str(BENCHMARKS / "train_throughput.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["smoke"] is True and record["batch_size"] == 5
    assert record["dashboard"] is None  # the fixture's Ray, not one it started
    runs = {run["variant"]: run for run in record["runs"]}
    assert list(runs) == ["preloaded", "dataloader", "ray_train"]
    assert {run["timed_steps"] for run in runs.values()} == {4}
    assert [i["step"] for i in runs["ray_train"]["intervals"]] == [4, 6]
    assert all(run["images_per_s"] > 0 for run in runs.values())
    assert 0.0 <= record["data_wait_share"] < 1.0
    assert "Ray Train / plain loop + DataLoader" in capsys.readouterr().out
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    assert module["_train_throughput"](record)[2].startswith("| plain torch loop")


@pytest.mark.slow
def test_ray_overhead_smoke(tmp_path, monkeypatch, capsys):
    """Ray's own CPU while a Train run sleeps, measured in a fresh process (its own
    Ray): the controller is among the processes, and the total is their sum."""
    results = tmp_path / "ray_overhead.json"
    argv = ["ray_overhead.py", "--smoke", "--results", str(results)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "ray_overhead.py"), run_name="__main__")
    (run,) = json.loads(results.read_text())["runs"]
    assert run["variant"] == "default"
    assert "ray::TrainController" in run["processes"]
    assert run["one_core_share"] == pytest.approx(sum(run["processes"].values()), 1e-3)
    assert 0.0 < run["one_core_share"] < 2.0  # 2 CPUs: more would be a bad sum
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    lines = module["_ray_overhead"](json.loads(results.read_text()))
    assert lines[0] == "| process | default |"
    assert lines[len(run["processes"]) + 2].startswith("| **all of Ray** |")


def test_the_plain_loops_get_the_ray_train_workers_minibatches(ray_local, tmp_path):
    """The throughput benchmark's plain loops train on exactly the rows, order and
    augmentation draws that a Ray Train worker's streams give."""
    bench = runpy.run_path(str(BENCHMARKS / "train_throughput.py"))
    sizes = bench["DemoSizes"](labeled=7, validation=5, unlabeled=1, test=1)
    data = bench["write_demo_dataset"](tmp_path / "data", seed=0, sizes=sizes)
    config = bench["_config"](tmp_path, data, 6, 2, True)
    job, datasets, augment = bench["_job"](config, tmp_path)
    undecoded = {name: bench["_undecoded"](ds) for name, ds in datasets.items()}
    per_step = {"labeled": 3, "pseudo": 2}
    plain = list(bench["_Steps"](undecoded, per_step, augment, config.student.seed, 6))
    shuffles = {n: Shuffle(config.student.seed, n) for n in per_step}
    streams = {
        n: RowStream(datasets[n].iterator(), k, shuffle=shuffles[n])
        for n, k in per_step.items()
    }
    for step in plain:  # 6 steps: past the end of both sets' first epoch
        expected = next_batch(streams, per_step)
        assert [r["path"] for r in step] == [r["path"] for r in expected]
        for mine, theirs in zip(step, expected, strict=True):
            np.testing.assert_array_equal(mine["image"], theirs["image"])
            np.testing.assert_allclose(mine["boxes"], theirs["boxes"])
    for stream in streams.values():
        stream.close()


def test_report_renders_the_cluster_record():
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    record = {
        "distill_seconds": {"one_node": 100.0, "cluster": 125.0},
        "cluster_over_one_node": 1.25,
        "node_loss": {
            "killed_after_step": 13,
            "resumed_from_step": 12,
            "steps_redone": 1,
            "seconds_from_kill_to_end": 60.2,
        },
    }
    lines = module["_cluster"](record)
    assert lines[2] == "| one node, 2 CPUs | 100.0 |"
    assert lines[3].endswith("| 125.0 |")
    assert "1.250x" in lines[-1] and "**1 steps redone**" in lines[-1]


@pytest.mark.slow
def test_scale_driver_memory_does_not_grow_with_the_inputs(
    tmp_path, monkeypatch, capsys
):
    """A fresh driver labels 1,000 and then 10,000 WebDataset inputs (FixedBoxes):
    every input gets exactly one row, and the driver's peak RSS at 10x the inputs
    stays under 1.2x."""
    results = tmp_path / "scale.json"
    argv = ["scale.py", "--smoke", "--results", str(results), "--work", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "scale.py"), run_name="__main__")
    record = json.loads(results.read_text())
    small, large = record["runs"]
    assert (small["images"], large["images"]) == (1_000, 10_000)
    for run in record["runs"]:
        assert run["rows"] == run["distinct_paths"] == run["images"]
        assert run["errors"] == 0 and run["parts"] == run["images"] // 1_000
    assert large["driver_peak_mb"] < 1.2 * small["driver_peak_mb"]
    assert "| FixedBoxes | tars | 10,000 |" in capsys.readouterr().out
    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    lines = module["_scale"](record)
    assert lines[2].startswith("| FixedBoxes | tars | 1,000 |")
    assert lines[-1].startswith("**Targets missed:**")
