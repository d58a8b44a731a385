"""Connecting to Ray: join the cluster in ``RAY_ADDRESS`` or start a local one."""

from __future__ import annotations

import logging
import os

import ray

from raydd.config import Config, ConfigError

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    """Shows raydd's INFO lines (a step done, a training step, a resume) in this
    process's output: the job's log, or a Ray worker's log streamed to the driver."""
    log = logging.getLogger("raydd")
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:  # Ray's workers have one
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)


def init_ray(num_cpus: int | None = None) -> None:
    """Joins ``RAY_ADDRESS`` if set (``ray job submit`` sets it), else starts Ray here.

    Does nothing if Ray is already initialised in this process.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def require_storage_on_cluster(config: Config) -> None:
    """Stops a run that would depend on this node's disk where other nodes work.

    On a cluster (another node is up, or this one offers no CPU, so the work runs
    elsewhere) the teacher, checkpoints and outputs must travel through
    ``storage_uri``: ``output_dir`` is only this node's disk.

    Raises:
        ConfigError: naming ``storage_uri``.
    """
    if config.storage_uri is not None:
        return
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    others = [n for n in alive if n["NodeID"] != here]
    mine = [n for n in alive if n["NodeID"] == here]
    if others or (mine and not mine[0]["Resources"].get("CPU", 0)):
        raise ConfigError(
            f"this Ray cluster has {len(alive)} nodes and output_dir "
            f"({config.output_dir}) is on this one's disk only: set storage_uri to "
            "a location every node reaches (s3://bucket/run, gs://bucket/run, or a "
            "shared mount), e.g. storage_uri=s3://my-bucket/runs/exp1"
        )
