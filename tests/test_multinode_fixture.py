"""The multi-node test cluster of :mod:`multinode` is real: two Ray nodes whose
disks differ, a working S3 store, a worker that can be killed and replaced, and a
stop that leaves nothing behind. Nothing here calls ``ray.init`` in this process
(other tests use an in-process local Ray): drivers are jobs or subprocesses.
"""

import json
import os
import textwrap

import pytest
from multinode import (  # noqa: F401 (fixtures)
    NODE_LABEL,
    MultiNodeCluster,
    head_only_dir,
    multinode_cluster,
    pids_naming,
    s3_server,
)

pytestmark = pytest.mark.slow

PROBE = """
import json, os, sys

import pyarrow.fs
import ray

head_only, uri, label = sys.argv[1:]


@ray.remote(num_cpus=1)
def probe(head_only, uri):
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(b"written on a worker")
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "listing": os.listdir(head_only)}


ray.init()
pin = {"raydd-test-node": label}  # multinode.NODE_LABEL
seen = ray.get(probe.options(label_selector=pin).remote(head_only, uri))
fs, path = pyarrow.fs.FileSystem.from_uri(uri)
with fs.open_input_stream(path) as f:
    seen["read_back"] = f.read().decode()
seen["driver_node"] = ray.get_runtime_context().get_node_id()
seen["driver_listing"] = os.listdir(head_only)
print("PROBE " + json.dumps(seen))
"""


def test_the_head_has_no_cpus_and_one_worker_does(multinode_cluster):  # noqa: F811
    cluster = multinode_cluster
    alive = {n["node_id"]: n for n in cluster.alive_nodes()}
    assert len(alive) == 2
    head = alive[cluster.head.node_id]
    assert head["is_head_node"] and head["resources_total"].get("CPU", 0) == 0
    assert head["labels"][NODE_LABEL] == "head"
    worker = alive[cluster.workers[-1].node_id]
    assert not worker["is_head_node"] and worker["resources_total"]["CPU"] == 2
    assert worker["labels"][NODE_LABEL] == cluster.workers[-1].name


def test_a_killed_worker_is_dead_and_a_new_one_joins(
    multinode_cluster,  # noqa: F811
    head_only_dir,  # noqa: F811
):
    cluster = multinode_cluster
    killed = cluster.workers[-1]
    assert cluster.pids(killed)
    cluster.kill_worker(killed)
    assert cluster.node(killed)["state"] == "DEAD"
    assert [n["node_id"] for n in cluster.alive_nodes()] == [cluster.head.node_id]
    assert not cluster.pids(killed)  # its Ray workers went with it
    new = cluster.add_worker(num_cpus=2, hide=[head_only_dir])
    assert new.node_id != killed.node_id
    assert {n["node_id"] for n in cluster.alive_nodes()} == {
        cluster.head.node_id,
        new.node_id,
    }


def test_a_task_runs_on_the_worker_without_the_head_disk_and_uses_s3(
    multinode_cluster,  # noqa: F811
    head_only_dir,  # noqa: F811
    s3_server,  # noqa: F811
    tmp_path,
):
    (head_only_dir / "on-the-head.txt").write_text("only the head has this")
    (tmp_path / "probe.py").write_text(PROBE)
    uri = s3_server.bucket() + "/probe/from-worker.txt"
    worker = multinode_cluster.workers[-1]
    status, logs = multinode_cluster.run(
        f"python probe.py {head_only_dir} {uri} {worker.name}",
        working_dir=tmp_path,
        timeout=180,
    )
    assert status == "SUCCEEDED", logs[-4000:]
    seen = json.loads(logs.split("PROBE ", 1)[1].splitlines()[0])
    assert seen["driver_node"] == multinode_cluster.head.node_id
    assert seen["node"] == worker.node_id
    assert seen["driver_listing"] == ["on-the-head.txt"]
    assert seen["listing"] == []  # the worker node sees an empty tmpfs there
    assert seen["read_back"] == "written on a worker"
    bucket = uri.removeprefix("s3://").split("/")[0]
    assert s3_server.keys(uri) == ["probe/from-worker.txt"]
    body = s3_server.client().get_object(Bucket=bucket, Key="probe/from-worker.txt")
    assert body["Body"].read() == b"written on a worker"


def test_stop_leaves_no_process_and_no_temp_dir(tmp_path):
    """A detached actor outlives its driver, in a process group of its own and
    retitled ``ray::Keeper``: stop() still finds and ends it."""
    keeper = textwrap.dedent(
        """
        import os, ray

        @ray.remote(num_cpus=0)
        class Keeper:
            def pid(self):
                return os.getpid()

        ray.init(namespace="t")
        keeper = Keeper.options(name="k", lifetime="detached").remote()
        print("PID", ray.get(keeper.pid.remote()))
        """
    )
    with MultiNodeCluster() as cluster:
        cluster.add_worker(num_cpus=1, hide=[tmp_path / "hidden"])
        done = cluster.driver(keeper, timeout=120)
        assert done.returncode == 0, done.stderr[-4000:]
        pid = int(done.stdout.split("PID ")[1].split()[0])
        assert os.getpgid(pid) not in (cluster.head.process.pid, *[
            w.process.pid for w in cluster.workers
        ])  # fmt: skip
        root = str(cluster.root)
        assert pid in cluster.pids() and pid in pids_naming(root)
    assert not pids_naming(root)
    assert not os.path.exists(root)
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
