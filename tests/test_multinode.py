"""raydd on a real multi-node Ray cluster whose nodes share no disk.

A 0-CPU head node (where job drivers run) and a 2-CPU worker node that sees the
head's output directory as an empty tmpfs (:mod:`multinode`), plus an S3 store on
127.0.0.1 for ``storage_uri``. Anything that only works when every process sees the
head's disk fails here, as it would on a user's cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from multinode import (  # noqa: F401 - fixtures
    BIN,
    ROOT,
    _git_excludes,
    head_only_dir,
    multinode_cluster,
    s3_server,
)

from raydd import storage

pytestmark = pytest.mark.slow


def _config(tmp: Path, raw: dict, name: str) -> Path:
    """A config file on the head's disk (the job's driver reads it there)."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stored(s3, run: str) -> set[str]:
    """The names under ``run`` ("s3://bucket/prefix") in the store."""
    prefix = run.removeprefix("s3://").partition("/")[2] + "/"
    return {k.removeprefix(prefix) for k in s3.keys(run) if k.startswith(prefix)}


def _nodes_of(cluster, class_name: str) -> set[str]:
    """The node ids of every actor (alive or dead) whose class name contains
    ``class_name``, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.address, limit=10_000, detail=True)
    return {a.node_id for a in actors if class_name in (a.class_name or "")}


@pytest.fixture(scope="module")
def bucket(s3_server):  # noqa: F811
    """A fresh bucket, which this process (copying data, reading results) reaches
    through the store's environment too."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        yield s3_server.bucket(f"raydd-{uuid.uuid4().hex[:8]}")


def _outputs_in_storage(s3, run: str) -> set[str]:
    names = _stored(s3, run)
    for role in ("teacher", "student"):
        assert any(n.startswith(f"tensorboard/{role}/events.out") for n in names), names
    for name in (
        "summary.json",
        "report.html",
        "student/model.pt",
        "teacher/model.pt",
        "candidates/_index.parquet",
        "steps.json",
    ):
        assert name in names, sorted(names)
    assert any(n.startswith("candidates/part-") for n in names), sorted(names)
    return names


def _distill(cluster, s3, run: str, out: Path, source: str) -> dict:
    """Submits ``jobs/distill.py SOURCE`` (``--config FILE`` or ``--smoke-test``)
    with outputs to ``run`` in the store and ``output_dir`` ``out`` on the head;
    checks the job and the outputs in storage; returns the summary."""
    entrypoint = f"python jobs/distill.py {source} --output-dir {out} storage_uri={run}"
    status, logs = cluster.run(entrypoint, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "distill done in" in logs and "student - teacher" in logs
    _outputs_in_storage(s3, run)
    summary = json.loads(storage.read_bytes(f"{run}/summary.json"))
    assert json.loads((out / "summary.json").read_text()) == summary
    return summary


def test_the_smoke_test_with_data_only_in_the_bucket(
    multinode_cluster,  # noqa: F811
    s3_server,  # noqa: F811
    head_only_dir,  # noqa: F811
    bucket,
):
    """``--smoke-test`` with ``storage_uri`` copies its demo data and weights to the
    bucket, and every split, image and weight file is read from there. Every Train
    worker and Predictor runs on the worker node (the head has 0 CPUs), and the
    head's output_dir mirrors the store."""
    cluster = multinode_cluster
    run, out = f"{bucket}/smoke", head_only_dir / "smoke"
    summary = _distill(cluster, s3_server, run, out, "--smoke-test")
    config = yaml.safe_load((out / "config.yaml").read_text())
    shared = f"{run}/smoke-data"
    assert config["data"]["test"]["images"] == f"{shared}/data/test"
    assert config["data"]["unlabeled"]["images"] == f"{shared}/data/unlabeled"
    assert config["model"]["backbone_weights"].startswith(f"{shared}/mobilenet_v2")
    assert summary["images"] == {
        "labeled": 8,
        "unlabeled": 12,
        "pseudo_labeled": 12,
        "errors": 0,
    }
    assert list((out / "tensorboard" / "student").glob("events.out.*"))
    worker = cluster.workers[-1].node_id
    assert _nodes_of(cluster, "RayTrainWorker") == {worker}
    assert _nodes_of(cluster, "Predictor") == {worker}


def _wait_for(cluster, job_id: str, pattern: str, timeout: float) -> re.Match:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(pattern, client.get_job_logs(job_id))
        if found:
            return found
        if client.get_job_status(job_id).is_terminal():
            break
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} in:\n{client.get_job_logs(job_id)[-4000:]}")


def test_a_lost_worker_node_costs_only_the_steps_since_the_checkpoint(
    multinode_cluster,  # noqa: F811
    head_only_dir,  # noqa: F811
    bucket,
):
    """A preempted spot node during student training: a new node joins, the run
    resumes from the last checkpoint in storage and finishes. The student job runs
    on a head whose output_dir is empty: its inputs come from the store (the smoke
    run's data, teacher, pseudo-labels and threshold)."""
    cluster = multinode_cluster
    smoke, run = f"{bucket}/smoke", f"{bucket}/resume"
    if storage.file_type(f"{smoke}/thresholds.json").name != "File":
        pytest.skip("needs the outputs of the smoke run")
    for name in ("teacher", "candidates", "thresholds.json"):  # steps 1-3 done
        storage.copy(f"{smoke}/{name}", f"{run}/{name}")
    config = head_only_dir / "smoke" / "config.yaml"  # its data: in the bucket
    job_id = cluster.submit(
        f"python jobs/student.py --config {config} "
        f"--output-dir {head_only_dir / 'resume-out'} storage_uri={run} "
        "student.iterations=16 student.checkpoint_every=4 student.log_every=1"
    )
    killed_at = int(_wait_for(cluster, job_id, r"step (9|1[0-2])/16", timeout=600)[1])
    cluster.kill_worker(cluster.workers[-1])
    cluster.add_worker(num_cpus=2, hide=[head_only_dir])
    status, logs = cluster.wait(job_id, timeout=600)
    assert status == "SUCCEEDED", logs[-6000:]
    (resumed,) = {int(s) for s in re.findall(r"resumed from step (\d+)", logs)}
    # from a checkpoint in storage (every 4 steps), at most one interval back
    assert resumed % 4 == 0 and killed_at - 4 <= resumed <= killed_at, logs[-6000:]
    # after the resume the step count went on from the checkpoint, not from zero
    after = logs[logs.index("resumed from step") :]
    steps = [int(s) for s in re.findall(r"step (\d+)/16", after)]
    assert min(steps) > resumed and max(steps) == 16, after
    metadata = json.loads(storage.read_bytes(f"{run}/student/metadata.json"))
    assert (metadata["step"], metadata["resumed_from"]) == (16, resumed)
    print(f"killed after step {killed_at}, resumed from step {resumed}")


def test_a_cluster_run_without_storage_stops_before_any_work(
    multinode_cluster,  # noqa: F811
    head_only_dir,  # noqa: F811
    demo_dir,
    weights,
):
    """Submitted with the README's ``ray job submit`` line: exit code 2 and one
    message naming storage_uri, before any work."""
    from ray.job_submission import JobSubmissionClient

    cluster = multinode_cluster
    out = head_only_dir / "no-storage-out"
    config = _config(head_only_dir, tiny_config(demo_dir, out, weights), "none")
    job_id = f"raydd-{uuid.uuid4().hex[:8]}"
    excludes = json.dumps({"excludes": _git_excludes(ROOT)})
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", cluster.address,
        "--working-dir", ".", "--runtime-env-json", excludes,
        "--submission-id", job_id, "--no-wait",
        "--", "python", "jobs/distill.py", "--config", str(config),
    ]  # fmt: skip
    done = subprocess.run(
        submit, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status, logs = cluster.wait(job_id, timeout=300)
    assert status == "FAILED"
    assert "error: this Ray cluster has 2 nodes" in logs and "storage_uri" in logs
    info = JobSubmissionClient(cluster.address).get_job_info(job_id)
    assert info.driver_exit_code == 2
    assert not out.exists()  # nothing ran
