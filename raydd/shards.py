"""Deterministic, resumable output shards of a labeling run.

The input list (in :func:`raydd.sources.list_images` order) is cut into shards of
``shard_size`` consecutive images; shard ``s`` is written as ``part-{s:05d}.parquet``
holding exactly its images' rows in input order, whatever order the cluster finished
them in. A shard file appears atomically (written under a hidden name, then renamed),
so after a kill every ``part-*.parquet`` is complete and a re-run with the same
inputs, teacher and settings skips those shards (:func:`finished_shards`). A run with
different inputs or settings clears the old shards instead of mixing them in.

Readers (pandas, pyarrow, Ray Data) skip the hidden and ``_``-prefixed files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydd import storage

logger = logging.getLogger(__name__)

SHARD = "shard"
INDEX = "index"
RUN_FILE = "_run.json"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def make_plan(
    uris: Sequence[str], shard_size: int, num_shards: int = 1, shard_index: int = 0
) -> pa.Table:
    """``path``, ``shard``, ``index`` (position in ``uris``) of this job's images.

    A job with ``num_shards`` > 1 takes the shards ``s`` with
    ``s % num_shards == shard_index``, so independent jobs split the work.
    """
    index = np.arange(len(uris), dtype=np.int64)
    shard = index // shard_size
    mine = shard % num_shards == shard_index
    return pa.table(
        {
            "path": pa.array(uris, pa.string()).filter(pa.array(mine)),
            SHARD: shard[mine],
            INDEX: index[mine],
        }
    )


def fingerprint(uris: Sequence[str], settings: dict[str, Any]) -> str:
    """Identity of a run: its inputs (in order) and every setting its rows depend on."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for uri in uris:
        digest.update(uri.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def finished_shards(directory: str | Path, run_id: str) -> set[int]:
    """Shards already written in ``directory`` by a run with the same ``run_id``.

    A directory written by a different run is emptied (its rows would not match).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / RUN_FILE
    if state.exists() and json.loads(state.read_text()).get("run_id") == run_id:
        return {int(m[1]) for p in directory.iterdir() if (m := _PART.match(p.name))}
    stale = [p for p in directory.iterdir() if p.is_file()]
    if stale:
        logger.warning(
            "%s holds a different run's output (other inputs or settings): "
            "removing its %d files",
            directory,
            len(stale),
        )
    for path in stale:
        path.unlink()
    state.write_text(json.dumps({"run_id": run_id}))
    return set()


def publish_run(directory: str | Path, copy_to: str) -> None:
    """Makes ``copy_to`` (storage) hold the run of ``directory`` only: the stored
    parts of a different run are removed, then the run file is copied, so a new
    head node that fetches ``copy_to`` resumes from the finished shards."""
    local = Path(directory) / RUN_FILE
    stored = storage.join(copy_to, RUN_FILE)
    if storage.file_type(stored).name == "File":
        if storage.read_bytes(stored) == local.read_bytes():
            return
        logger.warning("%s holds a different run's output: removing it", copy_to)
    storage.delete_contents(copy_to)
    storage.copy(str(local), stored)


class ShardWriter:
    """Collects rows (any order) and writes each shard once all its rows arrived.

    Args:
        directory: where ``part-*.parquet`` go.
        sizes: number of rows expected per shard.
        copy_to: a second location (storage) each finished part is copied to.
    """

    def __init__(
        self,
        directory: str | Path,
        sizes: dict[int, int],
        copy_to: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.copy_to = copy_to
        self.sizes = dict(sizes)
        self.pending: dict[int, list[pa.Table]] = defaultdict(list)
        self.counts: dict[int, int] = defaultdict(int)
        self.written = 0
        self.rows = 0
        self.start = time.perf_counter()

    def add(self, table: pa.Table) -> None:
        shards = table.column(SHARD).to_numpy()
        for shard in np.unique(shards):
            part = table.filter(pa.array(shards == shard))
            self.pending[int(shard)].append(part)
            self.counts[int(shard)] += len(part)
            if self.counts[int(shard)] == self.sizes[int(shard)]:
                self._write(int(shard))

    def _write(self, shard: int) -> None:
        table = pa.concat_tables(self.pending.pop(shard))
        table = table.sort_by(INDEX).drop_columns([SHARD, INDEX])
        final = self.directory / part_name(shard)
        tmp = self.directory / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # atomic: a part file is complete or absent
        if self.copy_to is not None:
            storage.copy(str(final), storage.join(self.copy_to, final.name))
        self.written += 1
        self.rows += len(table)
        elapsed = time.perf_counter() - self.start
        logger.info(
            "wrote %s (%d images); %d/%d shards, %d images, %.1f images/s",
            final.name,
            len(table),
            self.written,
            len(self.sizes),
            self.rows,
            self.rows / max(elapsed, 1e-9),
        )

    def close(self) -> None:
        """Checks that every shard was written (no row lost on the way)."""
        missing = {s: self.counts[s] for s in self.sizes if s in self.pending}
        missing |= {s: 0 for s in self.sizes if s not in self.counts}
        if missing:
            raise RuntimeError(
                f"shards incomplete after the run (shard: rows received): {missing}"
            )
