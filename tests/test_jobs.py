"""The Ray job scripts and their shared module (``tests/test_multinode.py``
submits them to a real multi-node cluster)."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from raydd import jobs, steps
from raydd.config import parse_config
from raydd.layout import STEP_OUTPUTS, STEPS, Run

ROOT = Path(__file__).parents[1]
JOB_SCRIPTS = ["distill", "teacher", "pseudo_label", "threshold", "student", "evaluate"]


@pytest.fixture
def config_file(demo_dir, weights, tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(demo_dir, tmp_path / "out", weights)))
    return path


@pytest.mark.parametrize("script", JOB_SCRIPTS)
def test_every_job_script_is_thin_and_has_help(script):
    source = (ROOT / "jobs" / f"{script}.py").read_text()
    assert len(source.splitlines()) < 150
    if script != "distill":  # one step: the shared parse -> ... -> report
        assert f'step_main(__doc__, "{script}", argv)' in source
    done = subprocess.run(
        [sys.executable, f"jobs/{script}.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--smoke-test" in done.stdout and "KEY=VALUE" in done.stdout
    assert "ray job submit --working-dir . -- \\\n" in done.stdout


def test_parse_args_needs_exactly_one_source(capsys):
    args = jobs.parse_args("d", ["--config", "a.yaml", "x.y=1", "z=[1, 2]"])
    assert args.config == "a.yaml" and not args.smoke_test
    assert args.overrides == ["x.y=1", "z=[1, 2]"]
    assert jobs.parse_args("d", ["--smoke-test", "--output-dir", "o"]).smoke_test
    for argv in ([], ["--config", "a.yaml", "--smoke-test"]):
        with pytest.raises(SystemExit) as exit_info:
            jobs.parse_args("d", argv)
        assert exit_info.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_build_config_applies_overrides_and_output_dir(config_file, tmp_path):
    args = jobs.parse_args(
        None,
        [
            "--config",
            str(config_file),
            "--output-dir",
            str(tmp_path / "o2"),
            "teacher.lr=0.5",
        ],
    )
    config = jobs.build_config(args, ["teacher"])
    assert config.output_dir == str(tmp_path / "o2")
    assert config.teacher.lr == 0.5


def test_a_bad_config_exits_2_with_one_message(config_file, capsys):
    args = jobs.parse_args(None, ["--config", str(config_file), "views=[]"])
    with pytest.raises(SystemExit) as exit_info:
        jobs.build_config(args, ["teacher"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: views must list at least one view" in err
    assert err.count("\n") == 1


def test_smoke_config_writes_tiny_demo_data(tmp_path):
    config = jobs.smoke_config(str(tmp_path / "o"), ["teacher.iterations=2"])
    assert config.output_dir == str(tmp_path / "o")
    assert config.teacher.iterations == 2
    assert (
        len(json.loads(Path(config.data.labeled.annotations).read_text())["images"])
        == 8
    )
    assert len(os.listdir(config.data.unlabeled.images)) == 12


@pytest.fixture
def fake_steps(monkeypatch):
    """Every step replaced by one that writes its outputs and records itself."""
    ran = []

    def fake(step):
        def run(config):
            ran.append(step)
            for name in STEP_OUTPUTS[step]:
                (Path(config.output_dir) / name).mkdir(parents=True, exist_ok=True)
                (Path(config.output_dir) / name / "x").write_text(step)
            return f"{step} detail"

        return run

    for step in STEPS:
        faked = dataclasses.replace(steps.REGISTRY[step], run=fake(step))
        monkeypatch.setitem(steps.REGISTRY, step, faked)
    return ran


def test_run_step_times_logs_and_uploads(config_file, tmp_path, fake_steps, caplog):
    store = tmp_path / "store"
    config = jobs.build_config(
        jobs.parse_args(
            None, ["--config", str(config_file), f"storage_uri=file://{store}"]
        ),
        ["teacher"],
    )
    with caplog.at_level(logging.INFO, logger="raydd"):
        line = steps.run_step(config, "teacher")
    assert line.startswith("teacher done in ") and line.endswith(" s: teacher detail")
    assert "[teacher] done in" in caplog.text
    assert (store / "teacher" / "x").read_text() == "teacher"
    # the config and the step's time travel with the outputs
    assert json.loads((store / "steps.json").read_text()).keys() == {"teacher"}
    assert yaml.safe_load((store / "config.yaml").read_text())["storage_uri"]


def test_a_smoke_test_runs_only_the_missing_earlier_steps(config_file, fake_steps):
    args = jobs.parse_args(None, ["--config", str(config_file)])
    config = jobs.build_config(args, ["teacher"])
    (Path(config.output_dir) / "teacher").mkdir(parents=True)
    args = jobs.parse_args(None, ["--smoke-test"])
    lines = jobs.run_job(args, config, "student")
    assert fake_steps == ["pseudo_label", "threshold", "student"]
    assert [line.split()[0] for line in lines] == fake_steps
    fake_steps.clear()
    jobs.run_job(args, config, "evaluate")  # everything before is there now
    assert fake_steps == ["evaluate"]


def test_a_step_without_its_inputs_exits_2_naming_the_job(config_file, capsys):
    args = jobs.parse_args(None, ["--config", str(config_file)])
    config = jobs.build_config(args, ["teacher"])
    for run in (lambda: jobs.run_job(args, config, "pseudo_label"),
                lambda: jobs.build_config(args, ["pseudo_label"])):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2
        assert "teacher does not exist: run jobs/teacher.py first" in (
            capsys.readouterr().err
        )


def test_inputs_come_back_from_storage(config_file, tmp_path):
    store = tmp_path / "store"
    (store / "teacher").mkdir(parents=True)
    (store / "teacher" / "model.pt").write_bytes(b"w")
    raw = yaml.safe_load(config_file.read_text())
    config = parse_config(raw, [f"storage_uri=file://{store}"])
    steps.check(config, ["pseudo_label"])  # fetches the teacher
    assert (Path(config.output_dir) / "teacher" / "model.pt").read_bytes() == b"w"
    assert Run.of(config).shared("teacher") == f"file://{store}/teacher"
    with pytest.raises(steps.MissingInput, match="run jobs/pseudo_label.py first"):
        steps.check(config, ["student"])


@pytest.mark.parametrize(
    "call",
    [
        "from raydd.cli import main; rc = main(['train-student', CONFIG])",
        "from raydd.jobs import step_main\n"
        "try:\n    step_main(None, 'student', ['--config', CONFIG])\n"
        "except SystemExit as e:\n    rc = e.code",
    ],
)
def test_a_missing_input_stops_before_torch_or_ray_start(config_file, call):
    """The command says what to run first without importing torch (about 4 s and
    1 GB here) or starting Ray."""
    code = (
        f"import sys\nCONFIG = {str(config_file)!r}\n{call}\n"
        "import ray\nprint(rc, 'torch' in sys.modules, ray.is_initialized())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "candidates does not exist: run " in done.stderr
