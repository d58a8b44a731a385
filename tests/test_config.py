from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from raydd.config import ConfigError, StudentConfig, ViewConfig, load_config


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_loads_and_overrides(tmp_path, demo_dir, weights):
    path = write(tmp_path, tiny_config(demo_dir, tmp_path / "out", weights))
    config = load_config(
        path, ["student.labeled_share=0.8", "views=[{scale: 64}]", "teacher.lr=1"]
    )
    assert config.student.labeled_share == 0.8
    assert isinstance(config.student, StudentConfig)
    assert config.views == (ViewConfig(scale=64),)
    assert config.teacher.lr == 1.0 and isinstance(config.teacher.lr, float)
    assert config.model.min_size == (128,)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r["data"].pop("test"), "missing required key data.test"),
        (
            lambda r: r["data"]["labeled"].update(annotations="/nope.json"),
            "data.labeled.annotations: no such file: /nope.json",
        ),
        (
            lambda r: r["data"]["unlabeled"].update(images="/nope/*.png"),
            "data.unlabeled.images: nothing at /nope",
        ),
        (lambda r: r["model"].update(name="yolo"), "model.name: unknown model 'yolo'"),
        (
            lambda r: r["model"].update(backbone_weights="/w.pth"),
            "model.backbone_weights: no such file",
        ),
        (
            lambda r: r.update(views=[{"scale": 64, "rotate": 90}]),
            "unknown key views\\[0\\].rotate",
        ),
        (
            lambda r: r.update(views=[{"scale": -1}]),
            "views\\[0\\].scale must be a positive",
        ),
        (
            lambda r: r["teacher"].update(iterations="many"),
            "teacher.iterations must be int",
        ),
        (
            lambda r: r.update(ensemble={"method": "vote"}),
            "unknown fusion method 'vote'",
        ),
        (lambda r: r["student"].update(init="imagenet"), "student.init must be"),
        (lambda r: r.update(colour="red"), "unknown key colour"),
        (
            lambda r: r.update(output_dir=__file__ + "/out"),
            "output_dir: cannot write under",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, demo_dir, weights, change, message):
    raw = tiny_config(demo_dir, tmp_path / "out", weights)
    change(raw)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, raw))


def test_malformed_override_is_rejected(tmp_path, demo_dir, weights):
    path = write(tmp_path, tiny_config(demo_dir, tmp_path / "out", weights))
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(path, ["teacher.iterations"])


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
