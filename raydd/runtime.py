"""Connecting to Ray: join the cluster in ``RAY_ADDRESS`` or start a local one."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


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
