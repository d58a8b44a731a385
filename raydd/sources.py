"""Where unlabeled images come from: listing URIs, reading bytes, one load stage.

A split (:class:`raydd.config.UnlabeledSplit`) names its images in one of these ways:

============================== ======================================================
``images``                     yields
============================== ======================================================
a folder (path or URI prefix)  every file below it, recursively, sorted
a glob (``*``, ``?``, ``[]``,  the matching files, sorted; ``*`` stays inside one
``**``)                        folder, ``**`` crosses folders
a single file                  that file
``.txt``                       one URI or path per line (blank lines skipped)
``.parquet`` / ``.csv``        the ``split.column`` column of the manifest
``.json``                      a COCO JSON's ``images[*].file_name``
============================== ======================================================

Listings skip *hidden* entries (a name starting with ``.``: ``.DS_Store``,
``._photo.jpg`` resource forks, ``.git/``), which are never images one meant to
use. Every other file is listed whatever its extension: a ``.txt`` or ``.html``
dropped into an image folder becomes an error row in the output, visible, rather
than silently skipped. Relative names in a list, manifest or COCO JSON resolve
against ``split.root``, or else the folder holding that file; list order is kept.

URIs may be local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://`` (pyarrow's
own filesystems) or any other fsspec protocol (``memory://``, ``https://``, ...).
Nothing here decodes images except :func:`load_batch`, the Ray Data stage.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydd import schema
from raydd.config import ConfigError, UnlabeledSplit
from raydd.data.images import decode_rows
from raydd.storage import filesystem, key_part, read_bytes, split_glob

logger = logging.getLogger(__name__)


def list_images(split: UnlabeledSplit) -> list[str]:
    """The URIs (or absolute local paths) of the split's images, ``limit`` applied.

    See the module docstring for what ``split.images`` may name. Folder and glob
    listings are sorted; lists, manifests and COCO JSONs keep their own order.
    No image is opened.

    Raises:
        ConfigError: a list/manifest/COCO file is missing or malformed, or a
            manifest has no column ``split.column``.
    """
    spec = split.images
    kind = _suffix(spec)
    if kind in (".txt", ".parquet", ".csv", ".json"):
        names = _read_list(spec, kind, split.column)
        root = split.root or _parent(spec)
        uris = [_resolve(name, root) for name in names]
    elif (glob := _split_glob(spec)) is not None:
        uris = _glob(*glob)
    else:
        uris = _folder_or_file(spec)
    return uris if split.limit is None else uris[: split.limit]


def _split_glob(spec: str) -> tuple[str, list[str]] | None:
    try:
        return split_glob(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _suffix(spec: str) -> str:
    return os.path.splitext(key_part(spec))[1].lower()


def _parent(spec: str) -> str:
    if "://" in spec:
        return spec.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(os.path.expanduser(spec)))


def _resolve(name: str, root: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return os.path.abspath(os.path.join(os.path.expanduser(root), name))


def _read_list(spec: str, kind: str, column: str) -> list[str]:
    try:
        if kind == ".txt":
            lines = read_bytes(spec).decode("utf-8-sig").splitlines()
            return [line.strip() for line in lines if line.strip()]
        if kind == ".json":
            return _coco_file_names(spec)
        return _manifest_column(spec, kind, column)
    except FileNotFoundError as e:
        raise ConfigError(f"unlabeled images list not found: {spec}") from e


def _coco_file_names(spec: str) -> list[str]:
    data = json.loads(read_bytes(spec))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConfigError(f"{spec} is not a COCO JSON: it has no 'images' list")
    try:
        return [str(image["file_name"]) for image in data["images"]]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{spec}: an entry of 'images' has no file_name") from e


def _manifest_column(spec: str, kind: str, column: str) -> list[str]:
    """Reads only ``column`` of a Parquet/CSV manifest; nulls and "" are skipped."""
    fs, path = filesystem(spec)
    if kind == ".parquet":
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            _check_column(spec, column, parquet.schema_arrow.names)
            values = parquet.read(columns=[column]).column(0)
    else:
        with fs.open_input_stream(path) as f:
            _check_column(spec, column, pacsv.open_csv(f).schema.names)
        options = pacsv.ConvertOptions(
            include_columns=[column], column_types={column: pa.string()}
        )
        with fs.open_input_stream(path) as f:
            values = pacsv.read_csv(f, convert_options=options).column(0)
    return [str(v) for v in values.to_pylist() if v is not None and str(v).strip()]


def _check_column(spec: str, column: str, names: list[str]) -> None:
    if column not in names:
        raise ConfigError(
            f"manifest {spec} has no column {column!r} (set data.unlabeled.column); "
            f"its columns: {names}"
        )


def _folder_or_file(spec: str) -> list[str]:
    fs, path = filesystem(spec)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        return [spec if "://" in spec else path]
    if kind != pafs.FileType.Directory:
        return []
    base = spec.rstrip("/") if "://" in spec else path
    return _walk(fs, path, base, recursive=True, pattern=None)


def _glob(base_uri: str, pattern: list[str]) -> list[str]:
    """Files matching ``base_uri/pattern``; listing starts at ``base_uri``, the last
    folder without a wildcard, and only recurses when the pattern has several
    levels or ``**``."""
    fs, path = filesystem(base_uri)
    recursive = len(pattern) > 1 or "**" in pattern
    return _walk(fs, path, base_uri.rstrip("/"), recursive, pattern)


def _walk(
    fs: pafs.FileSystem,
    path: str,
    base: str,
    recursive: bool,
    pattern: list[str] | None,
) -> list[str]:
    """Sorted ``base + "/" + relative path`` of the non-hidden files under ``path``.

    Building URIs from ``base`` keeps the spelling the user gave (scheme, bucket).
    """
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    root = path.rstrip("/")
    uris = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root) :].lstrip("/").split("/")
        if any(part.startswith(".") for part in relative):
            continue
        if pattern is None or _matches(relative, pattern):
            uris.append(base + "/" + "/".join(relative))
    return sorted(uris)


def _matches(parts: list[str], pattern: list[str]) -> bool:
    """Glob semantics per path level: ``*`` within a level, ``**`` any levels."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _matches(parts[1:], pattern[1:])
    )


def load_batch(batch: dict[str, Any], max_size: int | None = None) -> dict[str, Any]:
    """Ray Data stage (numpy batches): URIs -> decoded RGB pixels.

    Reads column ``path`` (URIs or local paths), fetches each file with
    :func:`read_bytes` and decodes it with :func:`raydd.data.images.decode`.
    Writes ``image`` (object array of ``uint8 [h, w, 3]``, longer side at most
    ``max_size``), ``height``/``width`` (int64, the original size after EXIF
    rotation, before downscaling; 0 on error) and ``error`` (``""`` or
    ``"<ExceptionType>: message"``). Every input column, ``path`` included, passes
    through unchanged. A missing file, unreadable URI or undecodable image never
    raises: its row keeps its place with a 1x1 black placeholder.

    Example:
        >>> ds = ray.data.from_items([{"path": u} for u in uris])  # doctest: +SKIP
        >>> ds = ds.map_batches(load_batch, fn_kwargs={"max_size": 1333})
    """
    paths = batch[schema.PATH]
    decoded = decode_rows(paths, lambda i: read_bytes(str(paths[i])), max_size)
    return {**batch, **decoded}
