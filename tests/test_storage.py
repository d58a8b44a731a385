"""Locations as URIs (raydd.storage) and the run layout (raydd.layout): validation,
Ray Train's storage path, uploads, downloads, and config paths in a store."""

import pyarrow.fs as pafs
import pytest
from conftest import tiny_config

from raydd import storage
from raydd.config import ConfigError, parse_config, to_dict
from raydd.layout import STEP_OUTPUTS, STEPS, TRAIN_DIR, Run


def train_storage(config):
    return Run.of(config).shared(TRAIN_DIR)


def upload(config, path):
    return Run.of(config).upload(path.name)


def download(config, name):
    return Run.of(config).fetch(name)


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


def test_save_step_uploads_what_the_step_wrote_and_mirrors_what_actors_stored(
    raw, tmp_path
):
    store = tmp_path / "store"
    config = parse_config(raw, [f"storage_uri=file://{store}"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "errors.csv").write_text("uri,reason\n")
    (store / "candidates").mkdir(parents=True)  # written there by the actors
    (store / "candidates" / "part-0a.parquet").write_bytes(b"PAR1")
    Run.of(config).save_step("pseudo_label")  # no validation_candidates: skipped
    assert sorted(p.name for p in store.iterdir()) == ["candidates", "errors.csv"]
    assert (out / "candidates" / "part-0a.parquet").read_bytes() == b"PAR1"
    assert tuple(STEP_OUTPUTS) == STEPS


def test_worker_outputs_come_back_from_storage(raw, tmp_path):
    """TensorBoard files a Train worker on another node wrote to storage reach the
    head's output_dir when the step ends (and are not overwritten by stale ones)."""
    store = tmp_path / "store"
    config = parse_config(raw, [f"storage_uri=file://{store}"])
    (store / "tensorboard" / "teacher").mkdir(parents=True)
    (store / "tensorboard" / "teacher" / "events.out").write_text("new")
    (store / "teacher").mkdir()
    (store / "teacher" / "model.pt").write_text("stored")
    out = tmp_path / "out"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "model.pt").write_text("local")
    Run.of(config).save_step("teacher")
    assert (out / "tensorboard" / "teacher" / "events.out").read_text() == "new"
    assert (store / "teacher" / "model.pt").read_text() == "local"


def test_uris_join_read_and_write_across_filesystems(tmp_path):
    assert storage.join("s3://b/run/", "teacher", "/model.pt") == (
        "s3://b/run/teacher/model.pt"
    )
    assert storage.join("/data", "x.png") == "/data/x.png"
    assert storage.is_remote("s3://b/x") and storage.is_remote("memory://x")
    assert not storage.is_remote("file:///x") and not storage.is_remote("/x")
    uri = f"memory://raydd-test-{tmp_path.name}/a/b.bin"
    storage.write_bytes(uri, b"\x00\x01")
    assert storage.read_bytes(uri) == b"\x00\x01"
    assert storage.file_type(uri) == pafs.FileType.File
    assert storage.identity(uri)["size"] == 2
    storage.copy(uri, str(tmp_path / "copy" / "b.bin"))
    assert (tmp_path / "copy" / "b.bin").read_bytes() == b"\x00\x01"
    with storage.local_copy(uri) as path:
        assert open(path, "rb").read() == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.identity(uri + ".missing")


def test_config_splits_and_weights_may_live_in_a_store(raw, demo_dir, weights):
    """Validation opens one object per location (no listing) wherever it lives."""
    bucket = f"memory://raydd-test-{demo_dir.name}-cfg"
    storage.copy(str(demo_dir), f"{bucket}/data")
    storage.copy(weights, f"{bucket}/w.pth")
    from raydd.data.demo import data_overrides

    overrides = [
        *data_overrides(f"{bucket}/data"),
        f"model.backbone_weights={bucket}/w.pth",
    ]
    config = parse_config(raw, overrides)
    assert config.data.labeled.annotations == f"{bucket}/data/labeled.json"
    assert config.model.backbone_weights == f"{bucket}/w.pth"
    for key, value, message in (
        ("data.test.annotations", f"{bucket}/data/nope.json", "no such file"),
        ("data.test.images", f"{bucket}/data/nope", "no such directory"),
        ("data.unlabeled.images", f"{bucket}/none/*.png", "nothing at"),
        ("model.backbone_weights", f"{bucket}/nope.pth", "no such file"),
    ):
        with pytest.raises(ConfigError, match=f"{key}: {message}"):
            parse_config(raw, [*overrides, f"{key}={value}"])
