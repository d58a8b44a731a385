"""The Ray job scripts: their shared module (fast) and a real cluster run (slow).

The slow test starts its own head node with ``ray start --head --block`` on free
ports and a private temp dir, submits ``jobs/distill.py --smoke-test`` with the same
``ray job submit`` line as the README, and stops only that cluster (never ``ray
stop``, which would kill every Ray process on the machine).
"""

import dataclasses
import inspect
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
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
        source = inspect.getsource(jobs.step_main)
    assert "# [1] Parse" in source and "# [3] Connect" in source
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
        == 16
    )
    assert len(os.listdir(config.data.unlabeled.images)) == 24


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


def test_ap_line_and_logging_setup():
    metrics = {
        "teacher": {"AP": 0.25},
        "teacher_views": {"AP": 0.3},
        "student": {"AP": 0.35},
    }
    assert steps.ap_line(metrics) == (
        "AP teacher 0.2500, teacher_views 0.3000, student 0.3500 (+0.1000)"
    )
    jobs.setup_logging()
    jobs.setup_logging()
    log = logging.getLogger("raydd")
    assert log.level == logging.INFO and len(log.handlers) == 1


# --- a real Ray cluster -------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free right now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(size: int) -> int:
    """First port of ``size`` consecutive free ports below the ephemeral range."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - size)
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


def submit_command(address: str, output_dir: Path, *extra: str) -> list[str]:
    """The README's ``ray job submit`` line, plus what this machine needs excluded
    (Ray honours ``.gitignore`` but not ``.git/info/exclude``)."""
    local = ROOT / ".git" / "info" / "exclude"
    excludes = [".git"] + [
        line.strip()
        for line in (local.read_text().splitlines() if local.exists() else [])
        if line.strip() and not line.startswith("#")
    ]
    ray_cli = str(Path(sys.executable).parent / "ray")
    return [
        ray_cli, "job", "submit", "--address", address, "--working-dir", ".",
        "--runtime-env-json", json.dumps({"excludes": excludes}), "--no-wait",
        *extra, "--", "python", "jobs/distill.py", "--smoke-test",
        "--output-dir", str(output_dir),
    ]  # fmt: skip


def stop_cluster(head: subprocess.Popen, temp_dir: str) -> list[str]:
    """SIGTERM then SIGKILL the head's process group, then any process (workers in
    their own groups) still naming our temp dir; returns what was left after that."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.time() + 30
    while time.time() < deadline:
        left = _pids_naming(temp_dir)
        if not left:
            return []
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
    return [str(p) for p in _pids_naming(temp_dir)]


def _pids_naming(text: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split() if int(p) != os.getpid()]


@pytest.fixture
def ray_cluster():
    """A private one-node cluster: yields the dashboard address; stops only it."""
    temp_dir = tempfile.mkdtemp(prefix="raydd-ray-")  # short: unix socket paths
    (gcs, dashboard, client, node_manager, object_manager, agent_http, agent_grpc,
     metrics, runtime_env) = free_ports(9)  # fmt: skip
    workers = free_port_range(200)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),  # the job's `python`
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    head = subprocess.Popen(
        [
            str(Path(bin_dir) / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={workers}",
            f"--max-worker-port={workers + 199}",
            "--object-store-memory=1000000000",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: stopped on its own
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, head)
        yield address, env
    finally:
        left = stop_cluster(head, temp_dir)
        assert not left, f"processes of the test cluster still running: {left}"
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _wait_for_dashboard(address: str, head: subprocess.Popen) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 180
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{head.stdout.read()}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            time.sleep(2)
    raise TimeoutError(f"no Ray dashboard at {address}")


@pytest.mark.slow
def test_distill_job_on_a_real_cluster(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_cluster
    out, store = tmp_path / "out", tmp_path / "store"
    job_id = f"raydd-test-{uuid.uuid4().hex[:8]}"
    command = submit_command(address, out, "--submission-id", job_id)
    command += [f"storage_uri=file://{store}"]
    submitted = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    client = JobSubmissionClient(address)
    deadline = time.time() + 900
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(5)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-6000:]}"

    summary = json.loads((out / "summary.json").read_text())
    for model in ("teacher", "teacher_views", "student"):
        assert all(0.0 <= summary[model][m] <= 1.0 for m in ("AP", "AP50", "AP75"))
    assert summary["images"]["unlabeled"] == 24
    for checkpoint in ("teacher", "student"):
        assert (out / checkpoint / "model.pt").stat().st_size > 1_000_000
        assert (out / checkpoint / "metadata.json").exists()
    assert list((out / "candidates").glob("part-*.parquet"))
    # progress: one line per step, and the job's own one-line summary
    for step in ("teacher", "pseudo_label", "threshold", "student", "evaluate"):
        assert f"[{step}] done in" in logs
    assert "distill done in" in logs and "student - teacher" in logs
    # every step's outputs were copied to storage_uri as the step ended
    assert json.loads((store / "summary.json").read_text()) == summary
    assert (store / "teacher" / "model.pt").stat().st_size > 1_000_000
    assert (store / "student" / "model.pt").exists()
    assert list((store / "candidates").glob("part-*.parquet"))
    assert (store / "thresholds.json").exists() and (store / "config.yaml").exists()
