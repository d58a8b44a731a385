"""Every location is a URI: local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://``
(pyarrow's own filesystems) or any other fsspec protocol (``memory://``, ...).

On a cluster no two nodes share a disk, so whatever one process writes for another
(checkpoints, shards, TensorBoard files) goes through a location every node reaches.
This module is the one place that opens them; it imports nothing from raydd.

Example:
    >>> write_bytes("memory://run/a.txt", b"hi")  # doctest: +SKIP
    >>> read_bytes(join("memory://run", "a.txt"))  # doctest: +SKIP
    b'hi'
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

ARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs")  # pyarrow's native filesystems
_WILDCARD = re.compile(r"[*?\[]")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path of ``uri`` inside it.

    Local paths and ``file://`` use pyarrow's ``LocalFileSystem`` (the path comes
    back absolute); ``s3``/``gs``/``gcs``/``hdfs``/``viewfs`` pyarrow's own
    filesystems (``FileSystem.from_uri``, configured by the usual environment
    variables such as ``AWS_REGION``/``AWS_ENDPOINT_URL``); every other scheme the
    fsspec implementation of that protocol, wrapped for pyarrow. A filesystem is
    built once per process and scheme/bucket (S3 looks up a bucket's region on
    creation), so a Ray worker does not rebuild it per image.

    URIs are taken literally, like local paths: no percent-decoding, and ``?`` or
    ``#`` are part of the name (listings build URIs by appending file names).

    Example:
        >>> fs, path = filesystem("file:///tmp/a.jpg")
        >>> path
        '/tmp/a.jpg'
    """
    if "://" not in uri:
        return _local(), os.path.abspath(os.path.expanduser(uri))
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    host, _, key = rest.partition("/")
    if scheme == "file":
        return _local(), "/" + key
    if scheme in ARROW_SCHEMES:
        if scheme in ("hdfs", "viewfs"):
            return _arrow(scheme, host), "/" + key
        return _arrow(scheme, host), f"{host}/{key}".rstrip("/")
    fs, strip = _fsspec(scheme)
    return fs, strip(uri)


@functools.lru_cache(maxsize=1)
def _local() -> pafs.FileSystem:
    return pafs.LocalFileSystem()


@functools.lru_cache(maxsize=64)
def _arrow(scheme: str, host: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{host}")[0]


@functools.lru_cache(maxsize=64)
def _fsspec(protocol: str) -> tuple[pafs.FileSystem, Any]:
    import fsspec  # late: only for protocols pyarrow has no filesystem of its own

    spec = fsspec.filesystem(protocol)
    return pafs.PyFileSystem(pafs.FSSpecHandler(spec)), spec._strip_protocol


def is_remote(location: str) -> bool:
    """True for a URI other than ``file://`` (a place other nodes may reach)."""
    return "://" in location and not location.lower().startswith("file://")


def absolute(location: str | os.PathLike[str]) -> str:
    """A URI as it is; a local path made absolute (Ray workers run elsewhere)."""
    text = str(location)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def key_part(uri: str) -> str:
    """``uri`` without scheme and bucket/host (a local path as it is)."""
    if "://" not in uri:
        return uri
    return uri.partition("://")[2].partition("/")[2]


def split_glob(spec: str) -> tuple[str, list[str]] | None:
    """``(base, pattern)`` of a glob: the last folder without a wildcard and the
    levels below it; ``None`` when ``spec`` has no wildcard (``*``, ``?``, ``[``).

    Raises:
        ValueError: the bucket or host name itself is a glob.

    Example:
        >>> split_glob("s3://b/crawl/*/img-*.jpg")
        ('s3://b/crawl', ['*', 'img-*.jpg'])
    """
    if not _WILDCARD.search(key_part(spec)):
        return None
    head, sep, rest = spec.partition("://")
    if not sep:
        head, rest = "", os.path.abspath(os.path.expanduser(spec))
    parts = rest.split("/")
    first = next(i for i, p in enumerate(parts) if _WILDCARD.search(p))
    if sep and first == 0:
        raise ValueError(f"a bucket or host name cannot be a glob: {spec}")
    return f"{head}{sep}" + ("/".join(parts[:first]) or "/"), parts[first:]


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike (``os.path.join`` would
    drop ``base`` at a part starting with ``/``)."""
    out = str(base)
    for part in parts:
        out = f"{out.rstrip('/')}/{str(part).lstrip('/')}" if out else str(part)
    return out


def file_type(uri: str) -> pafs.FileType:
    """``File``, ``Directory`` or ``NotFound`` (one HEAD-like request, no listing)."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type


# a file inside a tar archive: "<tar URI>#<offset>+<size>/<member name>", read with
# one ranged request (no listing, no reading the tar up to it)
_MEMBER = re.compile(r"^(?P<tar>.+\.tar)#(?P<offset>\d+)\+(?P<size>\d+)/(?P<name>.+)$")


def member_uri(tar: str, name: str, offset: int, size: int) -> str:
    """The URI of the member ``name`` of the tar archive ``tar`` whose data starts at
    byte ``offset`` and is ``size`` bytes long (:func:`read_bytes` reads it)."""
    return f"{tar}#{offset}+{size}/{name}"


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri`` (or of a tar member, see
    :func:`member_uri`).

    Raises:
        FileNotFoundError: no file there; other ``OSError`` s from the filesystem.
    """
    if (member := _MEMBER.match(uri)) is not None:
        fs, path = filesystem(member["tar"])
        with fs.open_input_file(path) as f:
            data = f.read_at(int(member["size"]), int(member["offset"]))
        if len(data) != int(member["size"]):
            raise OSError(f"{member['tar']} ends before {uri}")
        return data
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Writes ``data`` to ``uri`` (folders are made as needed)."""
    fs, path = filesystem(uri)
    if fs.type_name == "local":  # object stores have no folders to make
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_atomic(uri: str, data: bytes) -> None:
    """Writes ``data`` so that ``uri`` is either absent or complete, whatever kills
    the writer: an object store's PUT is atomic; a local file is written under a
    hidden name and renamed."""
    fs, path = filesystem(uri)
    if fs.type_name != "local":
        write_bytes(uri, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def exists(uri: str) -> bool:
    """Whether a file is at ``uri`` (one HEAD-like request)."""
    return file_type(uri) == pafs.FileType.File


def copy(source: str, destination: str) -> None:
    """Copies a file or a folder (recursively) between any two locations."""
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(destination)
    is_dir = src_fs.get_file_info(src).type == pafs.FileType.Directory
    if dst_fs.type_name == "local":  # copy_files makes sub-folders, not the top one
        dst_fs.create_dir(dst if is_dir else os.path.dirname(dst), recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def identity(uri: str) -> dict[str, Any]:
    """What tells one version of a file from another: location, size, mtime."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return {"uri": uri, "size": info.size, "mtime_ns": info.mtime_ns}


def digest(uri: str) -> str:
    """SHA-256 of the file's content (its identity whatever its mtime)."""
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def delete_contents(uri: str) -> None:
    """Removes everything under the folder or prefix ``uri`` (none: nothing)."""
    fs, path = filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding the file or folder at ``uri`` for the ``with`` block:
    the path itself when local, else a temporary copy removed afterwards."""
    if not is_remote(uri):
        yield filesystem(uri)[1]
        return
    folder = tempfile.mkdtemp(prefix="raydd-")
    try:
        path = os.path.join(folder, uri.rstrip("/").rsplit("/", 1)[-1])
        copy(uri, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
