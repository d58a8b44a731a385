"""raydd.sources: listing a split's images (folders, globs, lists, manifests, COCO)
on local disk, ``file://`` and an fsspec filesystem, and the load stage."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from PIL import Image

from raydd.config import ConfigError, UnlabeledSplit
from raydd.sources import list_images, load_batch
from raydd.storage import filesystem, read_bytes


def png(width: int, height: int, color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """imgs/{b.png, a.jpg, notes.txt, sub/c.png, sub/deeper/d.png} + hidden junk."""
    root = tmp_path / "imgs"
    files = {
        "b.png": png(8, 6),
        "a.jpg": png(4, 4),  # a PNG named .jpg: decoding goes by content
        "notes.txt": b"not an image",
        "sub/c.png": png(5, 3),
        "sub/deeper/d.png": png(2, 2),
        ".DS_Store": b"\0",
        "sub/._c.png": b"\0",
        ".cache/e.png": png(2, 2),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


VISIBLE = ["a.jpg", "b.png", "notes.txt", "sub/c.png", "sub/deeper/d.png"]


@pytest.fixture()
def memory_bucket():
    """``memory://<unique bucket>`` with two images and a nested one; removed after."""
    fs = fsspec.filesystem("memory")
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"/{bucket}/imgs/x.png", png(6, 4))
    fs.pipe(f"/{bucket}/imgs/w.png", png(3, 9))
    fs.pipe(f"/{bucket}/imgs/nested/y.png", png(2, 2))
    fs.pipe(f"/{bucket}/imgs/bad.png", b"<html>")
    yield f"memory://{bucket}"
    fs.rm(f"/{bucket}", recursive=True)


def test_folder_is_listed_recursively_sorted_without_hidden_files(folder):
    assert list_images(UnlabeledSplit(str(folder))) == [
        str(folder / n) for n in VISIBLE
    ]
    assert list_images(UnlabeledSplit(str(folder) + "/", limit=2)) == [
        str(folder / n) for n in VISIBLE[:2]
    ]


def test_single_file_and_missing_folder(folder):
    assert list_images(UnlabeledSplit(str(folder / "b.png"))) == [str(folder / "b.png")]
    assert list_images(UnlabeledSplit(str(folder / "nowhere"))) == []


def test_globs_follow_glob_semantics(folder):
    top = list_images(UnlabeledSplit(str(folder / "*.png")))
    assert top == [str(folder / "b.png")]  # * stays in one folder
    deep = list_images(UnlabeledSplit(str(folder / "**" / "*.png")))
    assert deep == [str(folder / n) for n in ("b.png", "sub/c.png", "sub/deeper/d.png")]
    assert list_images(UnlabeledSplit(str(folder / "sub" / "?.png"))) == [
        str(folder / "sub/c.png")
    ]


def test_file_uris_list_and_load(folder):
    uri = f"file://{folder}"
    uris = list_images(UnlabeledSplit(uri))
    assert uris == [f"{uri}/{n}" for n in VISIBLE]
    assert list_images(UnlabeledSplit(f"{uri}/sub/*.png")) == [f"{uri}/sub/c.png"]
    assert read_bytes(uris[1]) == (folder / "b.png").read_bytes()
    out = load_batch({"path": np.asarray(uris)})
    assert list(out["error"] == "") == [True, True, False, True, True]


def test_filesystem_is_cached_per_process(memory_bucket):
    local, path = filesystem("some/relative.jpg")
    assert isinstance(local, pafs.LocalFileSystem) and Path(path).is_absolute()
    assert filesystem("file:///tmp/a b.jpg") == (local, "/tmp/a b.jpg")
    first, path = filesystem(f"{memory_bucket}/imgs/x.png")
    assert path == f"/{memory_bucket.removeprefix('memory://')}/imgs/x.png"
    assert filesystem(f"{memory_bucket}/other.png")[0] is first


def test_fsspec_memory_filesystem(memory_bucket):
    uris = list_images(UnlabeledSplit(f"{memory_bucket}/imgs"))
    names = ["bad.png", "nested/y.png", "w.png", "x.png"]
    assert uris == [f"{memory_bucket}/imgs/{n}" for n in names]
    assert list_images(UnlabeledSplit(f"{memory_bucket}/imgs/[wx].png")) == [
        f"{memory_bucket}/imgs/w.png",
        f"{memory_bucket}/imgs/x.png",
    ]
    assert read_bytes(uris[3]) == png(6, 4)
    out = load_batch({"path": np.asarray(uris + [f"{memory_bucket}/gone.png"])})
    assert out["error"][0].startswith("UnidentifiedImageError")
    assert out["error"][4].startswith("FileNotFoundError")
    assert list(out["error"][1:4]) == ["", "", ""]
    assert [(h, w) for h, w in zip(out["height"], out["width"], strict=True)] == [
        (0, 0),
        (2, 2),
        (9, 3),
        (4, 6),
        (0, 0),
    ]


def test_txt_list_resolves_relative_names(folder, tmp_path):
    listing = tmp_path / "lists" / "unlabeled.txt"
    listing.parent.mkdir()
    (tmp_path / "lists" / "local.png").write_bytes(png(2, 2))
    absolute = str(folder / "b.png")
    listing.write_text(f"\ufefflocal.png\n\n  {absolute}  \nfile:///x/y.png\n\n")
    assert list_images(UnlabeledSplit(str(listing))) == [
        str(tmp_path / "lists" / "local.png"),
        absolute,
        "file:///x/y.png",
    ]
    rooted = list_images(UnlabeledSplit(str(listing), root="s3://bucket/pics/"))
    assert rooted[0] == "s3://bucket/pics/local.png"


def test_parquet_manifest_reads_its_uri_column(folder, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    table = pd.DataFrame(
        {"caption": ["x", "y", "z"], "uri": ["sub/c.png", "b.png", "a.jpg"]}
    )
    table.to_parquet(manifest)
    split = UnlabeledSplit(str(manifest), root=str(folder), limit=2)
    assert list_images(split) == [str(folder / "sub/c.png"), str(folder / "b.png")]


def test_csv_manifest_with_a_named_column(folder):
    manifest = folder / "manifest.csv"
    manifest.write_text("id,url\n7,b.png\n8,\n9,sub/c.png\n")
    split = UnlabeledSplit(str(manifest), column="url")
    assert list_images(split) == [str(folder / "b.png"), str(folder / "sub/c.png")]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_manifest_without_the_column_names_it(tmp_path, kind):
    manifest = tmp_path / f"m.{kind}"
    frame = pd.DataFrame({"file": ["a.png"], "width": [3]})
    if kind == "csv":
        frame.to_csv(manifest, index=False)
    else:
        frame.to_parquet(manifest)
    with pytest.raises(ConfigError) as info:
        list_images(UnlabeledSplit(str(manifest), column="uri"))
    assert "'uri'" in str(info.value) and "['file', 'width']" in str(info.value)


def test_coco_json_keeps_its_order_with_root_and_limit(folder, tmp_path):
    coco = tmp_path / "instances.json"
    images = [
        {"id": 3, "file_name": "sub/c.png"},
        {"id": 1, "file_name": "b.png"},
        {"id": 2, "file_name": "a.jpg"},
    ]
    coco.write_text(json.dumps({"images": images, "annotations": []}))
    split = UnlabeledSplit(str(coco), root=str(folder), limit=2)
    assert list_images(split) == [str(folder / "sub/c.png"), str(folder / "b.png")]
    assert list_images(UnlabeledSplit(str(coco)))[2] == str(tmp_path / "a.jpg")


def test_bad_list_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        list_images(UnlabeledSplit(str(tmp_path / "missing.txt")))
    (tmp_path / "other.json").write_text('{"annotations": []}')
    with pytest.raises(ConfigError, match="'images' list"):
        list_images(UnlabeledSplit(str(tmp_path / "other.json")))


def test_load_batch_passes_other_columns_through(folder):
    paths = [str(folder / "b.png"), str(folder / "missing.png"), str(folder / "a.jpg")]
    batch = {
        "path": np.asarray(paths),
        "shard": np.asarray([4, 4, 4], np.int64),
        "index": np.asarray([0, 1, 2], np.int64),
    }
    out = load_batch(batch, max_size=4)
    assert out["shard"] is batch["shard"] and out["index"] is batch["index"]
    assert list(out["path"]) == paths
    assert out["error"][1].startswith("FileNotFoundError: ")
    assert [im.shape for im in out["image"]] == [(3, 4, 3), (1, 1, 3), (4, 4, 3)]
    assert list(out["height"]) == [6, 0, 4] and list(out["width"]) == [8, 0, 4]


def test_load_batch_in_ray_data(ray_local, folder):
    uris = [str(folder / n) for n in VISIBLE] + [str(folder / "gone.png")]
    items = [{"path": uri, "index": i} for i, uri in enumerate(uris)]
    ds = ray_local.data.from_items(items).map_batches(
        load_batch, fn_kwargs={"max_size": 4}, batch_size=2
    )
    rows = sorted(ds.take_all(), key=lambda row: row["index"])
    assert [row["path"] for row in rows] == uris
    assert [bool(row["error"]) for row in rows] == [0, 0, 1, 0, 0, 1]
    assert rows[2]["error"].startswith("UnidentifiedImageError")
    assert rows[5]["error"].startswith("FileNotFoundError")
    assert [(row["height"], row["width"]) for row in rows] == [
        (4, 4),
        (6, 8),
        (0, 0),
        (3, 5),
        (2, 2),
        (0, 0),
    ]
    assert rows[1]["image"].shape == (3, 4, 3) and rows[1]["image"].dtype == np.uint8
