"""The same distillation job on one node and on a cluster whose nodes share no disk.

[1] one node: ``python jobs/distill.py`` starts Ray here (2 CPUs);
[2] a cluster on this machine (``tests/multinode.py``): a 0-CPU head, where the job's
    driver runs, and a 2-CPU worker node that sees the head's output directory as an
    empty tmpfs, the job sent with ``ray job submit``;
[3] node loss: the student step alone on that cluster, the worker node SIGKILLed
    after a logged step and a new one started; steps redone = that step - the
    checkpoint it resumed from.

Both jobs run the smoke-sized config on demo data with outputs in an S3 store
(moto on 127.0.0.1) and report their own time (``distill done in X s``). Writes
``benchmarks/results/cluster.json`` and prints a table.

    python benchmarks/cluster.py [--iterations 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the cluster recipe the tests use

from conftest import tiny_config  # noqa: E402
from multinode import MultiNodeCluster, S3Server  # noqa: E402

from raydd import storage  # noqa: E402
from raydd.data.demo import DemoSizes, write_demo_dataset  # noqa: E402
from raydd.models import offline_mobilenet_v2_weights  # noqa: E402

DONE = re.compile(r"distill done in ([\d.]+) s")


def one_node(config: Path, env: dict[str, str], store: str) -> float:
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "jobs/distill.py", "--config", str(config),
         f"storage_uri={store}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-4000:])
    return float(DONE.search(done.stdout)[1])


def on_cluster(cluster: MultiNodeCluster, config: Path, store: str) -> float:
    entry = f"python jobs/distill.py --config {config} storage_uri={store}"
    status, logs = cluster.run(entry, timeout=3600)
    if status != "SUCCEEDED":
        raise RuntimeError(logs[-4000:])
    return float(DONE.search(logs)[1])


def node_loss(cluster, config: Path, done: str, hide: Path, steps: int) -> dict:
    store = f"{done}-node-loss"  # a fresh student run on the finished steps 1-3
    for name in ("teacher", "candidates", "thresholds.json"):
        storage.copy(f"{done}/{name}", f"{store}/{name}")
    entry = (
        f"python jobs/student.py --config {config} storage_uri={store} "
        f"student.iterations={steps} student.checkpoint_every=4 student.log_every=1"
    )
    job = cluster.submit(entry)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address)
    killed_at = 0
    while killed_at < steps // 2:
        found = re.findall(rf"step (\d+)/{steps}", client.get_job_logs(job))
        killed_at = max(map(int, found), default=0)
        time.sleep(0.5)
    tic = time.perf_counter()
    cluster.kill_worker(cluster.workers[-1])
    cluster.add_worker(num_cpus=2, hide=[hide])
    status, logs = cluster.wait(job, timeout=3600)
    if status != "SUCCEEDED":
        raise RuntimeError(logs[-4000:])
    resumed = int(re.search(r"resumed from step (\d+)", logs)[1])
    return {
        "killed_after_step": killed_at,
        "resumed_from_step": resumed,
        "steps_redone": killed_at - resumed,
        "seconds_from_kill_to_end": round(time.perf_counter() - tic, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student-steps", type=int, default=24)
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks/results/cluster.json")
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raydd-cluster-"))
    sizes = DemoSizes(labeled=8, unlabeled=10, test=6, validation=6)
    data = write_demo_dataset(work / "data", seed=1, sizes=sizes)
    hide = work / "head-only"  # output_dir: only the head (the driver) sees it
    hide.mkdir()
    weights = offline_mobilenet_v2_weights()
    with S3Server() as s3:
        os.environ.update(s3.env)  # this process copies between runs in the store
        bucket = s3.bucket()
        configs = {}
        for name in ("one", "cluster"):
            configs[name] = hide / f"{name}.yaml"
            raw = tiny_config(data, hide / name, weights)
            configs[name].write_text(yaml.safe_dump(raw))
        seconds = {"one_node": one_node(configs["one"], dict(os.environ),
                                        f"{bucket}/one")}  # fmt: skip
        with MultiNodeCluster(env=s3.env) as cluster:
            cluster.add_worker(num_cpus=2, hide=[hide])
            seconds["cluster"] = on_cluster(cluster, configs["cluster"],
                                            f"{bucket}/cluster")  # fmt: skip
            loss = node_loss(cluster, configs["cluster"], f"{bucket}/cluster", hide,
                             args.student_steps)  # fmt: skip
    record = {
        "benchmark": "cluster",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "command": "python benchmarks/cluster.py",
        "distill_seconds": seconds,
        "cluster_over_one_node": round(seconds["cluster"] / seconds["one_node"], 3),
        "node_loss": loss,
    }
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'job':<28}{'seconds':>10}")
    for name, value in seconds.items():
        print(f"{'distill, ' + name.replace('_', ' '):<28}{value:>10.1f}")
    print(f"cluster / one node: {record['cluster_over_one_node']:.3f}")
    print(
        f"node loss: killed after step {loss['killed_after_step']}, resumed from "
        f"{loss['resumed_from_step']}: {loss['steps_redone']} steps redone"
    )


if __name__ == "__main__":
    main()
