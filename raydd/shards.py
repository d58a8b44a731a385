"""Output shards ("parts") of a labeling run: named by what they hold, written once.

A labeling run cuts its inputs into parts (:mod:`raydd.sources`): every list-like
source (manifest file, ``.txt``, COCO JSON, listed folder) into runs of
``shard_size`` consecutive images, every tar archive into one part. A part is the
unit of work, of identity and of resume:

- its file name, ``part-<digest>.parquet``, is a digest of its own inputs (the URIs in
  order; a tar's URI, size and mtime) and of every setting its rows depend on
  (:func:`settings_digest`: teacher content, views, fusion, ...). Appending inputs
  (more manifest files, more lines in a list) adds parts and keeps every finished
  one; a new teacher or new views give new names, and the old parts stay where they
  are (nothing is deleted behind the user's back);
- it is written by a Ray actor (:class:`PartWriter`) straight to the run's
  candidates location, atomically (:func:`raydd.storage.write_atomic`): after a
  kill every part there is complete, and a re-run skips it;
- it holds exactly one row per input image, bad images included, in input order,
  and a small stats record (images, errors, seconds) in its Parquet metadata
  (:func:`part_stats`).

``_index.parquet`` (written by the driver at the end of a run: ``part``, ``source``,
``images``) names the parts of the run's inputs; readers read those parts and no
others (:func:`index_parts`). ``_sources/<key>.json`` remembers which parts a source
was cut into, so a finished source is not read again. Readers (pandas, pyarrow, Ray
Data) skip the hidden and ``_``-prefixed files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydd import storage

logger = logging.getLogger(__name__)

PART = "part"  # the part a row belongs to (its file name)
INDEX = "index"  # the row's position in its part
PART_ROWS = "part_rows"  # rows of the part, on at least one of its rows (0: unknown)
INDEX_FILE = "_index.parquet"
SOURCES_DIR = "_sources"
STATS_KEY = b"raydd.stats"
PLAN_COLUMNS = (PART, INDEX, PART_ROWS)


def settings_digest(settings: dict[str, Any]) -> str:
    """A digest of every setting a part's rows depend on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def part_name(settings: str, inputs: Iterable[str]) -> str:
    """``part-<digest>.parquet`` of the part holding ``inputs`` under ``settings``."""
    digest = hashlib.sha256(settings.encode())
    for item in inputs:
        digest.update(b"\n")
        digest.update(item.encode())
    return f"part-{digest.hexdigest()[:32]}.parquet"


def is_mine(part: str, num_shards: int, shard_index: int) -> bool:
    """Whether job ``shard_index`` of ``num_shards`` independent jobs labels
    ``part`` (a stable split by the part's name)."""
    return int(part[5:13], 16) % num_shards == shard_index


def index_name(num_shards: int = 1, shard_index: int = 0) -> str:
    """The index file of one job (``_index.parquet`` when one job does it all)."""
    if num_shards == 1:
        return INDEX_FILE
    return f"_index-{shard_index:05d}-of-{num_shards:05d}.parquet"


def write_part(directory: str, name: str, table: pa.Table, stats: dict) -> None:
    """Writes ``directory/name`` atomically, ``stats`` in its Parquet metadata."""
    metadata = {**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats)}
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buffer)
    storage.write_atomic(storage.join(directory, name), buffer.getvalue())


def part_stats(uri: str) -> dict[str, Any]:
    """The stats record of a part: ``images``, ``errors``, ``seconds``."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        metadata = pq.read_schema(f).metadata or {}
    return json.loads(metadata.get(STATS_KEY, b"{}"))


class PartWriter:
    """Ray Data stage (one actor, pyarrow batches): collects candidate rows of any
    part in any order and writes each part once all its rows arrived.

    Rows carry ``part``, ``index`` and ``part_rows`` (:data:`PLAN_COLUMNS`). Emits
    one stats row per part written: ``part``, ``images``, ``errors``, ``seconds``
    (from the part's first row's arrival to its write). A row that arrives twice
    (a retried task) is written once.

    Args:
        directory: the candidates location (a local folder or a URI).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pending: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.expected: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        written = []
        parts = batch.column(PART).to_numpy(zero_copy_only=False)
        for part in np.unique(parts):
            rows = batch.filter(pa.array(parts == part))
            self.started.setdefault(part, time.perf_counter())
            self.pending[part].append(rows)
            self.seen[part].update(rows.column(INDEX).to_pylist())
            total = max(rows.column(PART_ROWS).to_pylist())
            self.expected[part] = max(self.expected.get(part, 0), total)
            if len(self.seen[part]) == self.expected[part]:
                written.append(self._write(part))
        return pa.Table.from_pylist(written, schema=STATS_SCHEMA)

    def _write(self, part: str) -> dict[str, Any]:
        table = pa.concat_tables(self.pending.pop(part)).sort_by(INDEX)
        index = table.column(INDEX).to_numpy()
        first = np.concatenate([[True], index[1:] != index[:-1]])
        table = table.filter(pa.array(first)).drop_columns(list(PLAN_COLUMNS))
        errors = sum(1 for e in table.column("error").to_pylist() if e)
        stats = {
            PART: part,
            "images": len(table),
            "errors": errors,
            "seconds": round(time.perf_counter() - self.started.pop(part), 3),
        }
        write_part(self.directory, part, table, stats)
        del self.seen[part], self.expected[part]
        return stats


STATS_SCHEMA = pa.schema(
    [
        (PART, pa.string()),
        ("images", pa.int64()),
        ("errors", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


def index_parts(directory: str) -> list[str]:
    """The URIs of the parts named by the index(es) of ``directory``; every part
    there when it has no index (a folder of parts made by hand)."""
    fs, path = storage.filesystem(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    indexes = [n for n in names if n.startswith("_index") and n.endswith(".parquet")]
    if not indexes:
        return [storage.join(directory, n) for n in names if n.startswith("part-")]
    parts: list[str] = []
    for name in indexes:
        parts += read_index(storage.join(directory, name))[PART].tolist()
    return [storage.join(directory, p) for p in parts]


def read_index(uri: str) -> pd.DataFrame:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs).to_pandas()


def write_index(directory: str, frame: pd.DataFrame, name: str = INDEX_FILE) -> None:
    """Writes the index (``part``, ``source``, ``images``) of a finished run."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    storage.write_atomic(storage.join(directory, name), buffer.getvalue())


def read_parts(uris: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of the parts ``uris`` (in that order), as one table."""
    tables = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")
