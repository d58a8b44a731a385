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

**Crawls.** The driver never lists a crawl: :func:`sources` names the split's
*source files* (one row each), and the Ray Data stage :func:`plan_source` reads each
one on the cluster and emits the image rows of its unfinished parts
(:mod:`raydd.shards`). A source is one of

============================== ======================================================
``images``                     sources
============================== ======================================================
``shards/*.tar`` (a glob of    each tar archive (WebDataset): its image members
``.tar``), or one ``.tar``     (``.jpg``, ``.png``, ... ; a sample's ``.json`` /
                               ``.txt`` / ``.cls`` members are metadata, skipped),
                               read in one streaming pass; one part per tar
``parts/*.parquet`` (a glob of each manifest file: its ``split.column``; cut into
``.parquet``/``.csv``/``.txt``  parts of ``shard_size`` images
/``.json`` files), or one
any other folder or glob        the listing, made by one Ray task
============================== ======================================================

A tar member's URI is ``<tar URI>#<offset>+<size>/<name>``
(:func:`raydd.storage.member_uri`): read with one ranged request, by the student too.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydd import schema, storage
from raydd.config import ConfigError, UnlabeledSplit
from raydd.data.images import decode_rows
from raydd.shards import (
    INDEX,
    PART,
    PART_ROWS,
    SOURCES_DIR,
    is_mine,
    part_name,
    part_stats,
)
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
    :func:`read_bytes` (or takes its bytes from column ``data`` when the planner
    read them already, e.g. from a tar) and decodes it with
    :func:`raydd.data.images.decode`; ``data`` is dropped.
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
    data = batch.get(DATA)

    def fetch(i: int) -> bytes:
        if data is not None and len(data[i]):
            return bytes(data[i])
        return read_bytes(str(paths[i]))

    decoded = decode_rows(paths, fetch, max_size)
    return {**{k: v for k, v in batch.items() if k != DATA}, **decoded}


# ---- crawls: source files, planned into parts on the cluster -------------------

SOURCE, KIND, PATHS, DATA = "source", "kind", "paths", "data"
TAR, LIST, LISTING, INLINE = "tar", "list", "listing", "inline"
LIST_SUFFIXES = (".txt", ".parquet", ".csv", ".json")
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .png .webp .bmp .gif .tif .tiff .ppm .pgm .jfif".split()
)
ROWS_PER_BATCH = 64  # image rows per batch the planner emits


def sources(split: UnlabeledSplit) -> list[dict[str, Any]]:
    """The split's sources, one row (``source``, ``kind``, ``paths``) per source
    file: what the driver holds of a crawl (see the module docstring). Lists only
    the files a glob of tars or manifests names; never an image folder.

    With ``split.limit`` the images are listed here (a small run) and become one
    ``inline`` source.

    Raises:
        ConfigError: a glob of tars/manifests matches nothing; ``limit`` on tars.
    """
    spec, suffix = split.images, _suffix(split.images)
    glob = _split_glob(spec)
    last = _suffix(glob[1][-1]) if glob is not None else suffix
    if split.limit is not None:
        if last == ".tar":
            raise ConfigError("data.unlabeled.limit does not apply to .tar sources")
        return [{SOURCE: spec, KIND: INLINE, PATHS: list_images(split)}]
    if last != ".tar" and last not in LIST_SUFFIXES:
        return [{SOURCE: spec, KIND: LISTING, PATHS: None}]
    files = _glob(*glob) if glob is not None else [spec]
    if not files:
        raise ConfigError(f"data.unlabeled.images matches no files: {spec}")
    return [
        {SOURCE: f, KIND: TAR if _suffix(f) == ".tar" else LIST, PATHS: None}
        for f in files
    ]


def inline_source(name: str, uris: Sequence[str]) -> dict[str, Any]:
    """A source of URIs already listed (a validation split, a test)."""
    return {SOURCE: name, KIND: INLINE, PATHS: list(uris)}


def plan_source(
    batch: dict[str, np.ndarray],
    settings: str,
    directory: str,
    shard_size: int,
    column: str = "uri",
    root: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage (numpy batches of source rows): the image rows of each
    source's parts that ``directory`` lacks.

    Emits ``path``, ``part``, ``index`` (position in the part), ``part_rows`` (the
    part's size on its last batch, else 0) and ``data`` (a tar member's bytes,
    else empty). Records each source's parts in ``directory/_sources/`` (see
    :func:`source_parts`); a source whose recorded parts all exist is not read.
    """
    for source, kind, paths in zip(
        batch[SOURCE], batch[KIND], batch[PATHS], strict=True
    ):
        key = _source_key(settings, str(source), str(kind), paths, shard_size)
        record = _read_record(directory, key)
        if record is not None and kind in (TAR, LIST, INLINE):
            names = [name for name, _ in record["parts"]]
            if len(_existing(directory, names)) == len(names):
                continue
        if kind == TAR:
            yield from _plan_tar(
                str(source), settings, directory, key, num_shards, shard_index
            )
            continue
        uris = _source_images(str(source), str(kind), paths, column, root)
        chunks = [uris[i : i + shard_size] for i in range(0, len(uris), shard_size)]
        names = [part_name(settings, chunk) for chunk in chunks]
        _write_record(
            directory, key, source, list(zip(names, map(len, chunks), strict=True))
        )
        done = _existing(directory, names)
        for name, chunk in zip(names, chunks, strict=True):
            if name not in done and is_mine(name, num_shards, shard_index):
                yield _image_rows(name, chunk, [b""] * len(chunk), 0, len(chunk))


def source_parts(
    batch: dict[str, np.ndarray],
    settings: str,
    directory: str,
    shard_size: int,
    num_shards: int = 1,
    shard_index: int = 0,
    **_: Any,
) -> dict[str, np.ndarray]:
    """Ray Data stage (source rows -> part rows): ``part``, ``source``, ``images``,
    ``done`` of this job's parts of each source; a source not planned yet (or a tar
    not read to its end) gives one row with ``part`` ``""``, not done."""
    rows: list[tuple[str, str, int, bool]] = []
    for source, kind, paths in zip(
        batch[SOURCE], batch[KIND], batch[PATHS], strict=True
    ):
        record = _read_record(
            directory, _source_key(settings, str(source), str(kind), paths, shard_size)
        )
        if record is None:
            if kind != TAR or is_mine(
                _tar_part(str(source), settings), num_shards, shard_index
            ):
                rows.append(("", str(source), 0, False))  # still to be read
            continue
        mine = [
            (n, c) for n, c in record["parts"] if is_mine(n, num_shards, shard_index)
        ]
        done = _existing(directory, [n for n, _ in mine])
        rows += [(n, str(source), int(c), n in done) for n, c in mine]
    part, source, images, done = zip(*rows, strict=True) if rows else ([],) * 4
    return {
        PART: np.array(part, dtype=object),
        SOURCE: np.array(source, dtype=object),
        "images": np.array(images, dtype=np.int64),
        "done": np.array(done, dtype=bool),
    }


def _image_rows(
    part: str, paths: Sequence[str], data: Sequence[bytes], start: int, total: int
) -> dict[str, np.ndarray]:
    n = len(paths)
    return {
        schema.PATH: np.array(paths, dtype=object),
        PART: np.full(n, part, dtype=object),
        INDEX: np.arange(start, start + n, dtype=np.int64),
        PART_ROWS: np.full(n, total, dtype=np.int64),
        DATA: np.array(list(data), dtype=object),
    }


def _source_key(
    settings: str, source: str, kind: str, paths: Any, shard_size: int
) -> str:
    """Names a source's record: its settings, size of parts, and version (a file's
    size and mtime; an inline list's URIs; a listing is re-listed every run)."""
    digest = hashlib.sha256(f"{settings}\n{shard_size}\n{kind}\n{source}".encode())
    if kind == INLINE:
        digest.update("\n".join(paths).encode())
    elif kind in (TAR, LIST):
        version = storage.identity(source)
        digest.update(f"\n{version['size']}\n{version['mtime_ns']}".encode())
    return digest.hexdigest()[:32]


def _record_uri(directory: str, key: str) -> str:
    return storage.join(directory, SOURCES_DIR, f"{key}.json")


def _read_record(directory: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(_record_uri(directory, key)))
    except FileNotFoundError:
        return None


def _write_record(
    directory: str, key: str, source: str, parts: list[tuple[str, int]]
) -> None:
    record = {SOURCE: str(source), "parts": [[n, int(c)] for n, c in parts]}
    storage.write_atomic(_record_uri(directory, key), json.dumps(record).encode())


def _existing(directory: str, names: Sequence[str]) -> set[str]:
    """Which of the parts ``names`` exist (HEAD requests, 16 at a time)."""
    if not names:
        return set()
    with ThreadPoolExecutor(16) as pool:
        found = pool.map(lambda n: storage.exists(storage.join(directory, n)), names)
        return {n for n, ok in zip(names, found, strict=True) if ok}


def _source_images(
    source: str, kind: str, paths: Any, column: str, root: str | None
) -> list[str]:
    if kind == INLINE:
        return [str(p) for p in paths]
    split = UnlabeledSplit(source, column=column, root=root)
    return list_images(split)


def _tar_part(uri: str, settings: str) -> str:
    """The one part of a tar archive: named by its URI, size and mtime."""
    version = storage.identity(uri)
    return part_name(settings, [uri, str(version["size"]), str(version["mtime_ns"])])


def _plan_tar(
    uri: str, settings: str, directory: str, key: str, num_shards: int, shard_index: int
) -> Iterator[dict[str, np.ndarray]]:
    """The image members of one tar archive, as one part, in one streaming read."""
    name = _tar_part(uri, settings)
    if not is_mine(name, num_shards, shard_index):
        return
    if storage.exists(storage.join(directory, name)):  # done; its record was lost
        images = part_stats(storage.join(directory, name))["images"]
        _write_record(directory, key, uri, [(name, images)])
        return
    paths: list[str] = []
    data: list[bytes] = []
    count = 0
    fs, path = filesystem(uri)
    with (
        fs.open_input_stream(path) as stream,
        tarfile.open(fileobj=stream, mode="r|*") as tar,
    ):
        for member in tar:
            base = os.path.basename(member.name)
            if not member.isfile() or base.startswith("."):
                continue
            if os.path.splitext(base)[1].lower() not in IMAGE_SUFFIXES:
                continue  # a WebDataset sample's metadata (.json, .txt, .cls)
            if len(paths) == ROWS_PER_BATCH:  # the last batch carries the size
                yield _image_rows(name, paths, data, count - len(paths), 0)
                paths, data = [], []
            extracted = tar.extractfile(member)
            data.append(extracted.read() if extracted is not None else b"")
            paths.append(
                storage.member_uri(uri, member.name, member.offset_data, member.size)
            )
            count += 1
    _write_record(directory, key, uri, [(name, count)] if count else [])
    if paths:
        yield _image_rows(name, paths, data, count - len(paths), count)
