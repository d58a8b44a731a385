"""Durable copies of a run's outputs under ``storage_uri`` (local path or URI).

``output_dir`` stays the local working directory every step reads and writes; when
the config sets ``storage_uri``, Ray Train checkpoints go straight to
``STORAGE_URI/ray_train`` (:func:`train_storage`) and each finished step's outputs
are copied to the same relative path under ``STORAGE_URI`` (:func:`upload`), with
``pyarrow.fs`` (S3, GCS, Azure, HDFS or local). A later job on a fresh head node gets
them back with :func:`download`.

Example:
    >>> config = parse_config(raw, ["storage_uri=s3://bucket/runs/exp1"])
    >>> train_storage(config)
    's3://bucket/runs/exp1/ray_train'
    >>> upload(config, Path(config.output_dir) / "teacher")
    's3://bucket/runs/exp1/teacher'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.fs as pafs

from raydd.config import Config

logger = logging.getLogger(__name__)

TRAIN_DIR = "ray_train"


def train_storage(config: Config) -> str:
    """Ray Train's ``storage_path``: ``STORAGE_URI/ray_train`` if set, else local."""
    if config.storage_uri is None:
        return str(Path(config.output_dir) / TRAIN_DIR)
    return _join(config.storage_uri, TRAIN_DIR)


def upload(config: Config, local_path: str | os.PathLike[str]) -> str | None:
    """Copies a file or folder under ``output_dir`` to the same place under storage.

    Returns:
        The destination URI, or None when ``storage_uri`` is unset or the path does
        not exist (a step that wrote nothing optional, e.g. no validation split).
    """
    if config.storage_uri is None or not Path(local_path).exists():
        return None
    relative = Path(local_path).resolve().relative_to(Path(config.output_dir).resolve())
    fs, base = pafs.FileSystem.from_uri(config.storage_uri)
    dest = _join(base, relative.as_posix())
    if fs.type_name == "local":  # copy_files makes sub-folders, not the top one
        fs.create_dir(dest if Path(local_path).is_dir() else _parent(dest))
    pafs.copy_files(
        str(Path(local_path).resolve()),
        dest,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    uri = _join(config.storage_uri, relative.as_posix())
    logger.info("copied %s -> %s", local_path, uri)
    return uri


def download(config: Config, relative: str) -> bool:
    """Fetches ``STORAGE_URI/relative`` into ``output_dir`` if it is missing there.

    Returns:
        True when ``OUTPUT_DIR/relative`` exists afterwards.
    """
    local = Path(config.output_dir) / relative
    if local.exists() or config.storage_uri is None:
        return local.exists()
    fs, base = pafs.FileSystem.from_uri(config.storage_uri)
    src = _join(base, relative)
    kind = fs.get_file_info(src).type
    if kind == pafs.FileType.NotFound:
        return False
    folder = local if kind == pafs.FileType.Directory else local.parent
    folder.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        src,
        str(local),
        source_filesystem=fs,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    logger.info("copied %s -> %s", _join(config.storage_uri, relative), local)
    return True


def _join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if base else relative


def _parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0]
