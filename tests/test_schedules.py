"""Schedules in passes over a set: ``passes`` sizes the teacher to the labeled set,
the student (and its control) to the pseudo-labeled set."""

import dataclasses

import pytest
from conftest import tiny_config
from test_student import THRESHOLDS, _candidates

from raydd.config import ConfigError, TrainConfig, parse_config
from raydd.student import (
    student_schedule,
    teacher_is_control,
    train_control,
    train_student,
)
from raydd.teacher import train_teacher
from raydd.train import sized


def test_passes_give_the_steps_that_go_over_the_set():
    cfg = TrainConfig(iterations=7, passes=3.0)
    assert sized(cfg, images=100, per_step=2).iterations == 150
    assert sized(cfg, images=101, per_step=2).iterations == 152  # rounded up
    assert sized(TrainConfig(iterations=7), 100, 2).iterations == 7  # passes off
    assert sized(TrainConfig(passes=0.1), 3, 4).iterations == 1  # at least one


def _config(demo_dir, tmp_path, weights, *overrides):
    return parse_config(tiny_config(demo_dir, tmp_path, weights), list(overrides))


def test_the_student_goes_over_its_pseudo_labeled_images(demo_dir, tmp_path, weights):
    config = _config(
        demo_dir,
        tmp_path,
        weights,
        "student.passes=3",
        "student.batch_size=5",
        "student.labeled_share=0.6",
    )
    student = student_schedule(config, pseudo_images=40).student
    assert student.iterations == 60  # 3 x 40 images at 2 pseudo-labeled per step
    assert student.passes == 0  # resolved: the control trains these very steps
    # no readable pseudo-labeled image: passes over the 8 labeled ones, 5 a step
    assert student_schedule(config, pseudo_images=0).student.iterations == 5
    unchanged = _config(demo_dir, tmp_path, weights, "student.iterations=9")
    assert student_schedule(unchanged, 40) == unchanged
    with pytest.raises(ValueError, match="student_schedule"):
        train_control(config)


def test_teacher_and_student_train_the_resolved_steps(
    ray_local, demo_dir, tmp_path, weights, monkeypatch
):
    trained = {}

    def fit(job, datasets, role, *_):  # what the Train workers would be given
        trained[role] = (job.train, job.metadata["config"])
        return tmp_path / role

    monkeypatch.setattr("raydd.teacher.fit", fit)
    monkeypatch.setattr("raydd.student.fit", fit)
    config = _config(
        demo_dir,
        tmp_path,
        weights,
        "teacher.passes=2",
        "teacher.batch_size=4",
        "student.passes=1",
        "student.batch_size=5",
        "student.labeled_share=0.6",
    )
    train_teacher(config)
    train_student(config, _candidates(), THRESHOLDS)
    teacher, teacher_config = trained["teacher"]
    assert teacher.iterations == 4  # 2 passes over 8 labeled images, 4 a step
    assert teacher_config["teacher"]["iterations"] == 4  # saved with the model
    student, _ = trained["student"]
    assert student.iterations == 4  # 8 readable pseudo-labeled images, 2 a step
    assert dataclasses.replace(student, iterations=1, passes=1.0) == (
        dataclasses.replace(config.student, iterations=1)
    )  # nothing else changed


def test_the_teacher_is_the_control_only_on_the_students_schedule(
    demo_dir, tmp_path, weights
):
    same = [
        "teacher.iterations=30", "teacher.batch_size=5", "teacher.lr=0.01",
        "student.iterations=30", "student.batch_size=5", "student.lr=0.01",
        "teacher.eval_every=10", "student.checkpoint_every=7",  # not the schedule
    ]  # fmt: skip
    assert teacher_is_control(_config(demo_dir, tmp_path, weights, *same), 8, 40)
    for other in [
        "student.iterations=31",
        "student.batch_size=4",
        "student.lr=0.02",
        "student.warmup_iterations=3",
        "student.hflip_prob=0.3",
        "student.init=teacher",  # fine-tuned: not the labeled-only baseline
    ]:
        config = _config(demo_dir, tmp_path, weights, *same, other)
        assert not teacher_is_control(config, 8, 40), other
    # passes resolved first: 15 passes over 8 labeled images at 4 a step is 30
    # steps; 3 passes over 40 pseudo-labeled images at 2 a step is 60 steps
    passes = [*same, "teacher.passes=15", "teacher.batch_size=4",
              "student.batch_size=4", "student.labeled_share=0.5"]  # fmt: skip
    assert teacher_is_control(_config(demo_dir, tmp_path, weights, *passes), 8, 40)
    longer = _config(demo_dir, tmp_path, weights, *passes, "student.passes=3")
    assert not teacher_is_control(longer, 8, 40)


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf"])
def test_bad_passes_are_rejected(demo_dir, tmp_path, weights, value):
    with pytest.raises(ConfigError, match="student.passes must be 0"):
        _config(demo_dir, tmp_path, weights, f"student.passes={value}")


@pytest.mark.parametrize("student_iterations", [30, 40])
def test_the_student_step_trains_a_control_only_when_the_teacher_is_not_one(
    demo_dir, tmp_path, weights, monkeypatch, student_iterations
):
    """The student step (training replaced by recorders): on the teacher's
    schedule no second labeled-only model; on another, the control trains the
    student's steps."""
    import raydd.student
    import raydd.threshold
    from raydd.steps import _student

    trained = []
    found = raydd.threshold.ThresholdResult(0.5, 3.0, 3.0, 1, {"1": 0.5, "2": 0.5})
    monkeypatch.setattr(raydd.threshold, "load_threshold", lambda out: found)
    monkeypatch.setattr(
        raydd.student,
        "pseudo_counts",
        lambda parts, used: {"images": 40, "errors": 0, "pseudo_labeled": 40},
    )
    monkeypatch.setattr(
        raydd.student,
        "train_student",
        lambda config, *a, **k: trained.append(("student", config)) or "s",
    )
    monkeypatch.setattr(
        raydd.student,
        "train_control",
        lambda config: trained.append(("control", config)) or "c",
    )
    schedule = ["teacher.iterations=30", "teacher.batch_size=5",
                f"student.iterations={student_iterations}", "student.batch_size=5",
                "student.control=true"]  # fmt: skip
    message = _student(_config(demo_dir, tmp_path, weights, *schedule))
    roles = [role for role, _ in trained]
    if student_iterations == 30:
        assert roles == ["student"]
        assert message.endswith("control: the teacher (trained on the same schedule)")
    else:
        assert roles == ["student", "control"]
        assert trained[1][1].student.iterations == 40
        assert message.endswith("control c")
