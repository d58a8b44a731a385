"""The step registry's shared output: AP lines and tables, gains, logging."""

import subprocess
import sys

import pytest

from raydd import steps

METRICS = {
    "teacher": {"AP": 0.25, "AP50": 0.5, "AP75": 0.2},
    "teacher_views": {"AP": 0.3, "AP50": 0.55, "AP75": 0.25},
    "student": {"AP": 0.35, "AP50": 0.6, "AP75": 0.3},
}


def test_without_a_control_the_gain_is_over_the_teacher():
    assert steps.ap_line(METRICS) == (
        "AP teacher 0.2500, teacher_views 0.3000, student 0.3500 (+0.1000)"
    )
    table = steps.format_table(METRICS).splitlines()
    assert table[0].split() == ["model", "AP", "AP50", "AP75"]
    assert table[-1].split() == ["student", "-", "teacher", "+0.1000", "+0.1000",
                                 "+0.1000"]  # fmt: skip
    assert len(table) == 5


def test_the_gain_over_the_equal_compute_control_comes_first():
    metrics = {**METRICS, "control": {"AP": 0.32, "AP50": 0.58, "AP75": 0.31}}
    gains = steps.gains(metrics)
    assert list(gains) == ["student - control", "student - teacher"]
    assert gains["student - control"]["AP75"] == pytest.approx(-0.01)
    assert steps.ap_line(metrics).endswith("control 0.3200 (+0.0300)")
    table = steps.format_table(metrics).splitlines()
    assert [row.split()[0] for row in table[1:5]] == [
        "teacher", "teacher_views", "student", "control",
    ]  # fmt: skip
    assert table[5].split()[:4] == ["student", "-", "control", "+0.0300"]
    assert table[6].split()[:4] == ["student", "-", "teacher", "+0.1000"]


def test_the_schedules_say_what_the_gain_means():
    schedules = {
        "teacher": {"steps": 600, "batch": 5, "images": 3000},
        "student": {"steps": 600, "batch": 5, "images": 3000},
    }
    note = steps.schedules_note({"schedules": schedules, "baseline": "teacher"})
    assert note.startswith(
        "Schedules: teacher 600 steps x 5 images; student 600 steps x 5 images. "
    )
    assert "it is the labeled-only control" in note
    control = steps.schedules_note({"schedules": schedules, "baseline": "control"})
    assert "student - control is what the pseudo-labels add" in control
    mixed = steps.schedules_note({"schedules": schedules, "baseline": None})
    assert "mixes what the pseudo-labels add" in mixed
    assert steps.schedules_note({}) == ""


def test_logging_shows_raydd_lines_once():
    code = (
        "import logging; from raydd.runtime import setup_logging\n"
        "setup_logging(); setup_logging()\n"
        "logging.getLogger('raydd.x').info('step 3/4')\n"
        "logging.getLogger('raydd.x').debug('hidden')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.stderr.count("raydd.x: step 3/4") == 1, done.stderr
    assert "hidden" not in done.stderr


def test_the_python_api_is_what_the_command_runs():
    import raydd
    from raydd import config, layout, runtime

    assert raydd.run_step is steps.run_step and raydd.run_all is steps.run_all
    assert raydd.load_config is config.load_config and raydd.STEPS == layout.STEPS
    assert raydd.init_ray is runtime.init_ray
    assert issubclass(raydd.MissingInput, raydd.ConfigError)
