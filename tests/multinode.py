"""A real multi-node Ray cluster and an S3 store on this one machine, for tests.

    from multinode import MultiNodeCluster, S3Server

    with S3Server() as s3, MultiNodeCluster(env=s3.env) as cluster:
        bucket = s3.bucket("runs")                      # "s3://runs"
        worker = cluster.add_worker(num_cpus=2, hide=[head_only])
        job_id = cluster.submit("python jobs/x.py", env_vars={...})
        status, logs = cluster.wait(job_id)
        cluster.kill_worker(worker)                     # a preempted spot node

The head node advertises 0 CPUs, so every task and actor that needs a CPU runs on
a worker node. A worker node runs in a private mount namespace (``unshare -m``)
where each directory in ``hide`` is an empty tmpfs: there, tasks see nothing that
the driver (on the head) wrote to it, as on a real cluster whose nodes share no
disk (everything else, the venv and /tmp included, stays shared). Every node has
its own free ports and its own temp dir under the cluster's private root, and
runs in its own process group; stopping ends exactly those groups and the Ray
workers they started (never Ray's own stop command, which would end every Ray
on the machine).

``S3Server`` runs ``moto_server`` on a free port of 127.0.0.1; its ``env``
(``AWS_ENDPOINT_URL`` and fake credentials) makes ``pyarrow.fs.FileSystem.from_uri``,
Ray Train's ``storage_path`` and boto3 use it. Pass it to the cluster so that the
nodes and jobs have it too.

The fixtures ``s3_server`` (session), ``head_only_dir`` and ``multinode_cluster``
(module) are for test modules: ``from multinode import multinode_cluster, ...``.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent  # the venv's: ray, moto_server, python
NODE_LABEL = "raydd-test-node"  # every node's label: "head", "worker-1", ...
# In the environment of every process of a cluster (Ray's workers inherit it, and
# keep it when they retitle themselves "ray::..."): the cluster's root / node's dir.
CLUSTER_MARKER, NODE_MARKER = "RAYDD_MULTINODE_ROOT", "RAYDD_MULTINODE_NODE"

# The GCS marks a node dead after `threshold` failed health checks, one every
# `period` (Ray's default: 3 s); every 1 s here so that kill_worker is quick. A
# live node still has 10 s to answer each check.
HEAD_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


# --- ports and processes ------------------------------------------------------------


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


def pids_naming(text: str) -> list[int]:
    """Live processes (not this one) whose command line or environment contains
    ``text``: Ray's workers retitle themselves (``ray::IDLE``) but keep their
    environment, so a marker there finds them too."""
    needle, found = text.encode(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry.name}/{part}", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry.name))
                        break
            except OSError:  # gone, or a zombie
                pass
    return found


def pids_in_group(pgid: int) -> list[int]:
    """Processes in process group ``pgid``."""
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def signal_group(process: subprocess.Popen, sig: int) -> bool:
    """Send ``sig`` to the process group that ``process`` leads (started with
    ``start_new_session=True``). Does nothing once the leader is reaped and the
    group is empty: the id may belong to someone else by then. True if sent."""
    process.poll()  # reap the leader if it is done
    if process.returncode is not None and not pids_in_group(process.pid):
        return False
    try:
        os.killpg(process.pid, sig)
        return True
    except ProcessLookupError:
        return False


def wait_group(process: subprocess.Popen, timeout: float) -> bool:
    """Wait until no process of ``process``'s group is left; True if none is."""
    deadline = time.time() + timeout
    while True:
        process.poll()
        if not pids_in_group(process.pid):
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.2)


def kill_group(process: subprocess.Popen, sig: int = signal.SIGTERM, wait=30.0):
    """``sig`` to the process group of ``process``, SIGKILL if anything of it is
    still there after ``wait`` seconds; return once the group is empty."""
    for signum, grace in ((sig, wait), (signal.SIGKILL, 10.0)):
        if not signal_group(process, signum) or wait_group(process, grace):
            return
    raise RuntimeError(f"process group {process.pid} survived SIGKILL")


def _wait_until(what: str, check, timeout: float, every: float = 0.5):
    """Poll ``check()`` until it returns something truthy; return that."""
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.time() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        time.sleep(every)


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# --- S3 -----------------------------------------------------------------------------


class S3Server:
    """``moto_server`` on a free port of 127.0.0.1, in its own process group."""

    def __init__(self):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        # what boto3, pyarrow.fs.FileSystem.from_uri("s3://...") and Ray Train read
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.process: subprocess.Popen | None = None
        self._log = Path(tempfile.mkdtemp(prefix="raydd-s3-")) / "moto.log"

    def start(self) -> S3Server:
        """Start the server and wait until it answers."""
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_until("moto_server", self._answers, timeout=60, every=0.2)
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"moto_server exited:\n{_log_tail(self._log)}")
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh name by default); returns ``"s3://NAME"``."""
        name = name or f"raydd-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket_uri: str) -> list[str]:
        """Every key in the bucket of ``bucket_uri`` ("s3://name[/...]")."""
        name = bucket_uri.removeprefix("s3://").split("/")[0]
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=name)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        """End the server's process group and remove its log."""
        if self.process is not None:
            kill_group(self.process, wait=10)
            self.process = None
        subprocess.run(["rm", "-rf", str(self._log.parent)], check=False)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- Ray ----------------------------------------------------------------------------


class Node:
    """One ``ray start --block`` process (and its process group) of a cluster."""

    def __init__(self, name: str, process: subprocess.Popen, temp_dir: Path, log):
        self.name = name  # "head", "worker-1", ...: also its NODE_LABEL value
        self.process = process
        self.temp_dir = temp_dir
        self.log = log  # ray start's own output
        self.node_id: str | None = None  # Ray's, once the node is alive

    def __repr__(self) -> str:
        return f"Node({self.name}, pid={self.process.pid}, id={self.node_id})"


class MultiNodeCluster:
    """A head node with 0 CPUs (dashboard on 127.0.0.1) plus worker nodes.

    ``env``: extra environment for every node and job (e.g. ``S3Server.env``).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        object_store_memory: int = 300_000_000,
    ):
        self.object_store_memory = object_store_memory
        # short: Ray's unix socket paths must stay under 108 characters
        self.root = Path(tempfile.mkdtemp(prefix="raydd-mn-"))
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",  # the job's `python`
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            **{CLUSTER_MARKER: str(self.root)},
            **(env or {}),
        )
        self.head: Node | None = None
        self.workers: list[Node] = []  # every worker started, killed ones too
        self._started = 0
        self.gcs_address = ""  # "127.0.0.1:PORT", for ray.init(address=...)
        self.address = ""  # "http://127.0.0.1:PORT": the dashboard, for jobs

    # -- nodes ---------------------------------------------------------------------

    def _start_node(
        self, name: str, args: list[str], hide=(), extra_env: dict | None = None
    ) -> Node:
        temp_dir = self.root / name
        (client, node_manager, object_manager, agent_http, agent_grpc, metrics,
         runtime_env) = free_ports(7)  # fmt: skip
        workers = free_port_range(100)
        command = [
            str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--labels={NODE_LABEL}={name}",
            f"--object-store-memory={self.object_store_memory}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={workers}",
            f"--max-worker-port={workers + 99}",
            *args,
        ]  # fmt: skip
        hide = [Path(d).resolve() for d in hide]
        if hide:
            for d in hide:
                if d == self.root or d in self.root.parents:
                    raise ValueError(f"cannot hide {d}: it holds the nodes' temp dirs")
                d.mkdir(parents=True, exist_ok=True)
            mounts = " && ".join(
                f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in hide
            )
            script = f'{mounts} && exec "$@"'
            # unshare execs (no --fork): the process stays the group leader
            command = [
                "unshare", "-m", "--propagation", "private",
                "bash", "-c", script, "bash", *command,
            ]  # fmt: skip
        temp_dir.mkdir(parents=True)
        log_path = self.root / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env={**self.env, NODE_MARKER: str(temp_dir), **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: ended on its own
            )
        return Node(name, process, temp_dir, log_path)

    def start(self, timeout: float = 120) -> MultiNodeCluster:
        """Start the head node; return once Ray (via the dashboard) reports it
        alive."""
        gcs, dashboard = free_ports(2)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.address = f"http://127.0.0.1:{dashboard}"
        self.head = self._start_node(
            "head",
            [
                "--head",
                f"--port={gcs}",
                "--num-cpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
            ],
            extra_env=HEAD_ENV,
        )
        self._wait_alive(self.head, timeout)
        return self

    def add_worker(
        self,
        num_cpus: int = 2,
        hide=(),
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> Node:
        """Start a worker node with ``num_cpus`` CPUs (and custom ``resources``,
        extra ``env`` for its processes) where each directory in ``hide`` is empty
        (a private tmpfs); return once Ray reports it alive. Its label
        ``raydd-test-node=worker-N`` lets a task pick it:
        ``.options(label_selector={NODE_LABEL: worker.name})``."""
        self._started += 1
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        worker = self._start_node(f"worker-{self._started}", args, hide, env)
        self.workers.append(worker)
        self._wait_alive(worker, timeout)
        return worker

    def kill_worker(
        self, worker: Node, graceful: bool = False, timeout: float = 90
    ) -> None:
        """End a worker node, then wait until Ray reports it dead. By default
        SIGKILL its whole process group: a preempted spot node, no shutdown at
        all. ``graceful``: SIGTERM to ``ray start`` alone (as Kubernetes does to a
        pod), which drains the node (up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S,
        30 s by default) and then ends its processes."""
        if graceful:
            worker.process.send_signal(signal.SIGTERM)
            if not wait_group(worker.process, timeout):
                kill_group(worker.process, signal.SIGKILL)
        else:
            kill_group(worker.process, signal.SIGKILL)
        _wait_until(
            f"{worker.name} dead",
            lambda: self.node(worker).get("state") == "DEAD",
            timeout,
        )

    def _wait_alive(self, node: Node, timeout: float) -> None:
        def alive():
            if node.process.poll() is not None:
                raise RuntimeError(
                    f"ray start of {node.name} exited {node.process.returncode}:\n"
                    f"{_log_tail(node.log)}"
                )
            try:
                state = self.node(node)
            except Exception:  # the dashboard is not up yet
                return False
            if state.get("state") == "ALIVE":
                node.node_id = state["node_id"]
                return True
            return False

        try:
            _wait_until(f"Ray node {node.name}", alive, timeout)
        except TimeoutError as error:
            log = _log_tail(node.log)
            raise TimeoutError(f"{error}; ray start said:\n{log}") from None

    def nodes(self) -> list[dict]:
        """Every node Ray knows, dead ones too: dicts with node_id, state
        ("ALIVE"/"DEAD"), is_head_node, resources_total, labels."""
        from ray.util.state import list_nodes

        return [asdict(n) for n in list_nodes(address=self.address, timeout=10)]

    def alive_nodes(self) -> list[dict]:
        """The nodes Ray reports alive."""
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def node(self, node: Node) -> dict:
        """Ray's latest record of ``node`` ({} before it registers)."""
        mine = [n for n in self.nodes() if n["labels"].get(NODE_LABEL) == node.name]
        alive = [n for n in mine if n["state"] == "ALIVE"]
        return (alive or mine or [{}])[-1]

    def pids(self, node: Node | None = None) -> list[int]:
        """The live processes of the cluster, or of one of its nodes."""
        if node is None:
            return pids_naming(f"{CLUSTER_MARKER}={self.root}\0")
        return pids_naming(f"{NODE_MARKER}={node.temp_dir}\0")

    # -- jobs ----------------------------------------------------------------------

    def submit(
        self,
        entrypoint: str,
        working_dir: str | Path = ROOT,
        env_vars: dict[str, str] | None = None,
        excludes: list[str] | None = None,
    ) -> str:
        """Submit a Ray job (its driver runs on the head node) with
        ``working_dir`` uploaded and the cluster's extra env plus ``env_vars``;
        returns its id. ``excludes`` adds to .git and .git/info/exclude's."""
        from ray.job_submission import JobSubmissionClient

        env = {k: v for k, v in self.env.items() if k.startswith(("AWS_", "RAY_"))}
        runtime_env = {
            "working_dir": str(working_dir),
            "excludes": _git_excludes(Path(working_dir)) + list(excludes or []),
            "env_vars": {**env, **(env_vars or {})},
        }
        return JobSubmissionClient(self.address).submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env
        )

    def wait(self, job_id: str, timeout: float = 600) -> tuple:
        """Wait for the job to end (stop it at ``timeout``); returns
        ``(JobStatus, driver logs)``."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline = time.time() + timeout
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.time() < deadline:
            time.sleep(1)
            status = client.get_job_status(job_id)
        if not status.is_terminal():
            client.stop_job(job_id)
        return status, client.get_job_logs(job_id)

    def run(self, entrypoint: str, timeout: float = 600, **submit_args) -> tuple:
        """``submit`` then ``wait``: returns ``(JobStatus, driver logs)``."""
        return self.wait(self.submit(entrypoint, **submit_args), timeout)

    def driver(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``python -c code`` here (it sees the head's disk) with RAY_ADDRESS set
        to this cluster, so ``ray.init()`` in it joins the cluster as a driver."""
        return subprocess.run(
            [sys.executable, "-c", code],
            env={**self.env, "RAY_ADDRESS": self.gcs_address},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        """SIGKILL every node's process group (a test cluster needs no clean
        shutdown, and ``ray start`` hangs on in its drain when its group gets a
        SIGTERM), then any process still naming the cluster's root in its command
        line or environment (Ray's workers run in process groups of their own);
        remove the root. Raises if any process is left."""
        for node in [*self.workers, self.head]:
            if node is not None:
                signal_group(node.process, signal.SIGKILL)
        for node in [*self.workers, self.head]:
            if node is not None:
                wait_group(node.process, 10)
        deadline = time.time() + 30
        while (left := pids_naming(str(self.root))) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
        if left:
            raise RuntimeError(f"processes of the test cluster still running: {left}")

    def __enter__(self) -> MultiNodeCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _git_excludes(working_dir: Path) -> list[str]:
    """.git and the lines of .git/info/exclude (Ray reads .gitignore, not those)."""
    local = working_dir / ".git" / "info" / "exclude"
    lines = local.read_text().splitlines() if local.exists() else []
    return [".git"] + [s.strip() for s in lines if s.strip() and s[0] != "#"]


# --- pytest fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the whole session; make a fresh bucket per test
    with ``s3_server.bucket()``."""
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def head_only_dir(tmp_path_factory) -> Path:
    """A directory that only the head node (and so the job drivers and this
    process) sees; worker nodes see it empty. A module may override this fixture."""
    return tmp_path_factory.mktemp("head-only")


@pytest.fixture(scope="module")
def multinode_cluster(s3_server, head_only_dir):
    """Per test module: a 0-CPU head plus one 2-CPU worker that hides
    ``head_only_dir``, with ``s3_server``'s env on every node and job. A test that
    kills a worker should add one back (``add_worker(hide=[head_only_dir])``)."""
    with MultiNodeCluster(env=s3_server.env) as cluster:
        cluster.add_worker(num_cpus=2, hide=[head_only_dir])
        yield cluster
