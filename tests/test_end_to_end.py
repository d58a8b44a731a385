"""The whole method on tiny real data, through the CLI, on local Ray."""

import json

import pytest
import yaml
from conftest import tiny_config

from raydd.checkpoint import read_metadata
from raydd.cli import COMMANDS, build_parser, main
from raydd.layout import STEPS

SUBCOMMANDS = [
    "demo-data",
    "train-teacher",
    "pseudo-label",
    "tune-threshold",
    "train-student",
    "export",
    "evaluate",
    "run",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: raydd " + command in capsys.readouterr().out


@pytest.mark.slow
def test_run_writes_a_complete_summary(ray_local, demo_dir, weights, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(demo_dir, tmp_path / "out", weights)))
    assert (
        main(
            [
                "run",
                str(config),
                "student.labeled_share=0.4",
                "threshold.per_class=true",
                "student.control=true",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for model in ("teacher", "teacher_views", "student"):
        assert set(summary[model]) == {"AP", "AP50", "AP75"}
        assert all(0.0 <= v <= 1.0 for v in summary[model].values())
    assert 0.0 <= summary["threshold"] <= 1.0
    assert set(summary["per_class_thresholds"]) == {
        str(label) for label in range(1, 11)
    }
    assert 0.0 <= summary["validation"]["precision"] <= 1.0
    assert (tmp_path / "out" / "thresholds.png").stat().st_size > 10_000
    assert summary["images"] == {
        "labeled": 8,
        "unlabeled": 10,
        "pseudo_labeled": 10,
        "errors": 0,
    }
    assert summary["instances_per_image"]["labeled"] > 1.0
    assert set(summary["seconds"]) == {
        "teacher",
        "pseudo_label",
        "threshold",
        "student",
        "evaluate",
    }
    student = read_metadata(tmp_path / "out" / "student")
    assert student["init"] == "pretrained" and student["step"] == 4
    assert student["config"]["student"]["labeled_share"] == 0.4
    # the equal-compute control: labeled images only, the student's schedule
    control = read_metadata(tmp_path / "out" / "control")
    assert (control["role"], control["init"], control["step"]) == (
        "control",
        "pretrained",
        4,
    )
    assert "pseudo_instances" not in control and student["pseudo_instances"] >= 0
    assert set(summary["control"]) == {"AP", "AP50", "AP75"}
    assert summary["schedules"]["student"] == {"steps": 4, "batch": 5, "images": 20}
    assert summary["baseline"] == "control"  # the gain the table leads with
    printed = capsys.readouterr().out
    assert printed.index("student - control") < printed.index("student - teacher")
    # and ends with the HTML report: every section, every picture embedded
    report = tmp_path / "out" / "report.html"
    assert f"report: {report}" in printed
    page = report.read_text()
    assert page.count("<h2>") == 6 and "class=note" not in page
    assert page.count('src="data:image/') == 2 + 10 + 6
    # the in-training evaluation (rank 0, in process) scores like the pipeline's
    from raydd.checkpoint import load_detector
    from raydd.config import load_config, single_view
    from raydd.evaluate import evaluate_model

    resolved = load_config(str(tmp_path / "out" / "config.yaml"))
    model, categories = load_detector(tmp_path / "out" / "teacher")
    in_process = evaluate_model(
        model, resolved.data.test, categories, single_view(resolved)[0]
    )
    assert in_process == pytest.approx(summary["teacher"], abs=1e-6)
    # TensorBoard curves of both training runs
    for role in ("teacher", "student", "control"):
        assert list((tmp_path / "out" / "tensorboard" / role).glob("events.out.*"))
    assert "student − control" in page and "Schedules: teacher 4 steps" in page

    # the separate steps reuse what `run` left: re-launching the teacher with a longer
    # schedule resumes from its last checkpoint (step 4) instead of starting over
    assert main(["train-teacher", str(config), "teacher.iterations=6"]) == 0
    teacher = read_metadata(tmp_path / "out" / "teacher")
    assert (teacher["step"], teacher["resumed_from"]) == (6, 4)
    assert main(["export", str(config)]) == 0
    exported = json.loads((tmp_path / "out" / "pseudo_labels.json").read_text())
    assert len(exported["images"]) == 10 and len(exported["categories"]) == 10
    assert main(["tune-threshold", str(config)]) == 0
    assert json.loads((tmp_path / "out" / "thresholds.json").read_text())["trials"] == 6


def test_bad_config_stops_before_any_work(tmp_path, demo_dir, weights, capsys):
    raw = tiny_config(demo_dir, tmp_path / "out", weights)
    raw["data"]["test"]["images"] = str(tmp_path / "missing")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 2
    assert f"data.test.images: no such directory: {tmp_path / 'missing'}" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_step_without_its_input_says_which_step_to_run(
    ray_local, tmp_path, demo_dir, weights, capsys
):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(demo_dir, tmp_path / "out", weights)))
    assert main(["pseudo-label", str(config)]) == 2
    assert "run `raydd train-teacher` first" in capsys.readouterr().err


def test_every_job_step_has_a_subcommand():
    assert set(COMMANDS) == set(STEPS)
    for command in COMMANDS.values():
        assert build_parser().parse_args([command, "run.yaml"]).needs_config


@pytest.mark.slow
def test_zero_detections_flow_through_every_step(
    ray_local, demo_dir, weights, tmp_path
):
    # A score floor above 1 leaves every image without detections: the threshold
    # search, the student (pseudo-labeled images with no boxes) and the evaluation
    # must all still run and report.
    raw = tiny_config(demo_dir, tmp_path / "out", weights)
    raw["inference"] = {"score_floor": 1.01}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["instances_per_image"]["pseudo"] == 0.0
    assert summary["images"]["pseudo_labeled"] == 10
    assert summary["teacher"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert read_metadata(tmp_path / "out" / "student")["pseudo_instances"] == 0
