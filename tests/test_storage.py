"""storage_uri: validation, Ray Train's storage path, uploads and downloads."""

import pyarrow.fs as pafs
import pytest
from conftest import tiny_config

from raydd.config import ConfigError, parse_config, to_dict
from raydd.pipeline import STEP_OUTPUTS, save_step
from raydd.storage import download, train_storage, upload


@pytest.fixture
def raw(demo_dir, weights, tmp_path):
    return tiny_config(demo_dir, tmp_path / "out", weights)


def test_without_storage_everything_stays_local(raw, tmp_path):
    config = parse_config(raw)
    assert config.storage_uri is None
    assert train_storage(config) == str(tmp_path / "out" / "ray_train")
    (tmp_path / "out" / "teacher").mkdir(parents=True)
    assert upload(config, tmp_path / "out" / "teacher") is None


@pytest.mark.parametrize(
    "uri", ["s3://bucket/runs/a", "gs://bucket/runs/a", "file:///tmp/x", "abfs://c/x"]
)
def test_remote_schemes_are_accepted_without_touching_the_network(raw, uri):
    config = parse_config(raw, [f"storage_uri={uri}"])
    assert config.storage_uri == uri
    assert train_storage(config) == uri + "/ray_train"
    assert to_dict(config)["storage_uri"] == uri


@pytest.mark.parametrize("uri", ["ftp://host/x", "http://host/x", "mock://x"])
def test_unknown_schemes_are_rejected_at_validation(raw, uri):
    with pytest.raises(ConfigError, match=r"storage_uri: unknown scheme .*s3://"):
        parse_config(raw, [f"storage_uri={uri}"])


def test_a_relative_local_path_is_made_absolute(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(raw, ["storage_uri=store"])
    assert config.storage_uri == str(tmp_path / "store")
    assert pafs.FileSystem.from_uri(train_storage(config))[1] == str(
        tmp_path / "store" / "ray_train"
    )


def test_upload_and_download_through_a_file_uri(raw, tmp_path):
    store = tmp_path / "store"
    config = parse_config(raw, [f"storage_uri=file://{store}"])
    # pyarrow (and so Ray Train) opens the train storage URI as a local folder
    fs, path = pafs.FileSystem.from_uri(train_storage(config))
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{store}/ray_train"
    out = tmp_path / "out"
    (out / "teacher" / "sub").mkdir(parents=True)
    (out / "teacher" / "model.pt").write_bytes(b"\x00weights")
    (out / "teacher" / "sub" / "empty.txt").write_text("")
    (out / "thresholds.json").write_text('{"threshold": 0.5}')

    assert upload(config, out / "teacher") == f"file://{store}/teacher"
    assert upload(config, out / "thresholds.json") == f"file://{store}/thresholds.json"
    assert upload(config, out / "missing") is None
    assert (store / "teacher" / "model.pt").read_bytes() == b"\x00weights"
    assert (store / "teacher" / "sub" / "empty.txt").exists()
    assert (store / "thresholds.json").read_text() == '{"threshold": 0.5}'

    # a fresh head node: the local copy is gone, storage brings it back
    (out / "teacher" / "model.pt").unlink()
    assert download(config, "teacher")  # present locally (folder): left alone
    assert not (out / "teacher" / "model.pt").exists()
    (out / "thresholds.json").unlink()
    assert download(config, "thresholds.json")
    assert (out / "thresholds.json").read_text() == '{"threshold": 0.5}'
    assert not download(config, "student")


def test_save_step_uploads_what_the_step_wrote(raw, tmp_path):
    store = tmp_path / "store"
    config = parse_config(raw, [f"storage_uri=file://{store}"])
    out = tmp_path / "out"
    (out / "candidates").mkdir(parents=True)
    (out / "candidates" / "part-00000.parquet").write_bytes(b"PAR1")
    (out / "errors.csv").write_text("uri,reason\n")
    save_step(config, "pseudo_label")  # no validation_candidates: skipped
    assert sorted(p.name for p in store.iterdir()) == ["candidates", "errors.csv"]
    assert (store / "candidates" / "part-00000.parquet").read_bytes() == b"PAR1"
    assert set(STEP_OUTPUTS) == {
        "teacher",
        "pseudo_label",
        "threshold",
        "student",
        "evaluate",
    }
