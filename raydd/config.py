"""Configuration: one small frozen dataclass per stage, loaded from YAML.

A run is described by one YAML file (see ``configs/demo.yaml``) whose top-level keys
are the fields of :class:`Config`. Any value can be overridden on the command line
with ``dotted.key=value`` (the value is parsed as YAML, so ``teacher.iterations=50``
is an int and ``views=[{}, {hflip: true}]`` a list). :func:`validate` checks every
path and name before any work starts and raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydd import storage
from raydd.storage import absolute as _absolute
from raydd.storage import split_glob


class ConfigError(ValueError):
    """A configuration value is missing, malformed or points at nothing."""


@dataclass(frozen=True)
class CocoSplit:
    """A COCO instances JSON and the folder its ``file_name`` entries live in."""

    annotations: str
    images: str


@dataclass(frozen=True)
class UnlabeledSplit:
    """Where the unlabeled images come from (see :mod:`raydd.sources`).

    Attributes:
        images: a folder or glob (local, ``file://``, ``s3://``, ``gs://`` or any
            fsspec URI), a ``.txt`` file of URIs (one per line), a ``.parquet`` /
            ``.csv`` manifest with a URI column, or a COCO ``.json`` whose ``images``
            list names the files.
        column: the manifest's URI column.
        root: folder that relative names in a list, manifest or COCO JSON are
            under; default: the folder holding that file.
        limit: use only the first ``limit`` images (after sorting a listing).
        shard_size: images per output part of a list-like source (one Parquet
            file each; the unit of work and resumption); a tar is one part.
        num_shards: split the parts over this many independent jobs ...
        shard_index: ... of which this job is number ``shard_index`` (0-based;
            parts are split by name, :func:`raydd.shards.is_mine`).
    """

    images: str
    column: str = "uri"
    root: str | None = None
    limit: int | None = None
    shard_size: int = 1000
    num_shards: int = 1
    shard_index: int = 0


@dataclass(frozen=True)
class DataConfig:
    """The splits. ``validation`` (optional) is a labeled split that is pseudo-labeled
    like the unlabeled one, so the threshold search can report precision/recall."""

    labeled: CocoSplit
    unlabeled: UnlabeledSplit
    test: CocoSplit
    validation: CocoSplit | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Which detector to build (see :func:`raydd.models.build_model`).

    Attributes:
        name: a torchvision detection builder (``torchvision.models.get_model``) or
            one of raydd's own builders (``fasterrcnn_mobilenet_v2_fpn``).
        backbone_weights: path to a state dict of the backbone *classifier* (e.g.
            torchvision's ``mobilenet_v2-b0353104.pth``); loaded before detection heads
            are attached.
        weights_backbone: alternatively a torchvision weights enum name such as
            ``MobileNet_V2_Weights.IMAGENET1K_V1`` (downloaded by torchvision).
        min_size: training scales; torchvision picks one per step (multi-scale).
        max_size: longest side cap during training.
        kwargs: extra keyword arguments for the builder (e.g. RPN sizes).
    """

    name: str = "fasterrcnn_mobilenet_v2_fpn"
    backbone_weights: str | None = None
    weights_backbone: str | None = None
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    trainable_backbone_layers: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """An iteration-based SGD schedule with linear warm-up and step decay (the paper's).

    Attributes:
        iterations: training steps (the schedule is in steps, as the paper's).
        passes: when above 0, the schedule in passes over the run's own set
            instead: ``iterations`` becomes the steps in which that set's images
            per step (all of the teacher's batch, the student's pseudo-labeled
            share) go over it ``passes`` times -- the labeled set for the teacher,
            the pseudo-labeled set for the student and its control (the labeled
            set when there is no pseudo-labeled image). So 10x more unlabeled
            images give a 10x longer student (:func:`raydd.train.sized`).
        batch_size: images per worker per step.
        lr_milestones: the learning rate drops x0.1 at each of these fractions of
            ``iterations`` (the paper: 70% and 90%).
        checkpoint_every: steps between checkpoints (the resume points).
        log_every: steps between metric reports (Ray Train and TensorBoard get
            per-step scalars on rank 0 anyway).
        eval_every: steps between COCO evaluations on the test split (``0``: none
            during training; the pipeline evaluates the final model anyway).
        hflip_prob: chance of mirroring a training image (keypoints swap left/right).
        num_workers: Ray Train workers; with ``max_workers`` the run is elastic and
            uses between ``num_workers`` and ``max_workers`` as the cluster allows.
        use_gpu: one GPU per worker; mixed precision (AMP) then unless ``amp: false``.
        cpus_per_worker: CPUs Ray reserves per worker (fractions allowed); what is
            left of the cluster decodes and augments the images (Ray Data).
        torch_threads: torch's intra-op threads on CPU workers (``0``: the reserved
            CPUs, at least 1).
        max_failures: worker failures survived by restarting from the last
            checkpoint (Ray Train's ``FailureConfig``).
        prefetch_batches: batches Ray Data prepares ahead of the step.
        seed: the run's randomness: each epoch's order of each training set, every
            image's scale and flip (:class:`raydd.ingest.Shuffle`) and torch's
            generator (``seed + rank``); the same seed repeats the minibatches.
    """

    iterations: int = 1000
    passes: float = 0.0
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    lr_milestones: tuple[float, ...] = (0.7, 0.9)
    checkpoint_every: int = 100
    log_every: int = 20
    eval_every: int = 0
    hflip_prob: float = 0.5
    num_workers: int = 1
    max_workers: int | None = None
    use_gpu: bool = False
    amp: bool = True
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    max_failures: int = 2
    prefetch_batches: int = 2
    seed: int = 0


@dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """Student training: a :class:`TrainConfig` plus the data-distillation knobs.

    Attributes:
        labeled_share: fraction of every minibatch drawn from the labeled set
            (the paper's 6:4 is 0.6); the rest are pseudo-labeled images.
        init: ``pretrained`` retrains from the initial weights (the paper's choice);
            ``teacher`` fine-tunes from the teacher's weights.
        control: also train the equal-compute control: a model on the labeled
            images only with exactly this schedule (steps, batch, learning rate,
            augmentation, init), so ``student - control`` is what the
            pseudo-labels add, not what a longer schedule adds.
        ignore_band: pseudo-boxes scoring less than their threshold by at most
            this much are *ignored*: neither foreground nor background for the
            RPN's anchors and the box head's proposals they match (R-CNN models;
            ``0``: off, every box under the threshold is dropped).
        pseudo_min_size: training scales (shorter side) of the pseudo-labeled
            images; empty: the model's ``min_size``, as for the labeled ones.
        pseudo_color_jitter: brightness and contrast of each pseudo-labeled image
            scaled by factors drawn from ``[1 - j, 1 + j]`` (``0``: off).
    """

    labeled_share: float = 0.6
    init: str = "pretrained"
    control: bool = False
    ignore_band: float = 0.0
    pseudo_min_size: tuple[int, ...] = ()
    pseudo_color_jitter: float = 0.0


@dataclass(frozen=True)
class ViewConfig:
    """One geometric test-time transform.

    Attributes:
        scale: shorter side in pixels after resizing; ``None`` keeps the original size.
        max_size: cap on the longer side after resizing (Detectron's ``MAX_SIZE``);
            ``None``: no cap.
        hflip: mirror left-right.
    """

    scale: int | None = None
    max_size: int | None = None
    hflip: bool = False


@dataclass(frozen=True)
class EnsembleConfig:
    """How the views' detections of one image are fused (see :mod:`raydd.ensemble`).

    Attributes:
        method: ``nms``, ``soft_nms``, ``box_voting`` (Detectron's BBOX_VOTE) or
            ``wbf`` (weighted box fusion).
        nms_iou: IoU above which NMS suppresses (``nms``, ``box_voting``).
        vote_iou: IoU at which boxes vote for a kept box (``box_voting``).
        soft_nms_sigma: Gaussian decay ``exp(-iou^2 / sigma)`` (``soft_nms``).
        soft_nms_min_score: ``soft_nms`` drops boxes whose decayed score is below.
        wbf_iou: IoU above which a box joins a cluster (``wbf``).
        max_detections: cap per image after fusion.
    """

    method: str = "box_voting"
    nms_iou: float = 0.5
    vote_iou: float = 0.8
    soft_nms_sigma: float = 0.5
    soft_nms_min_score: float = 0.001
    wbf_iou: float = 0.55
    max_detections: int = 100


@dataclass(frozen=True)
class InferenceConfig:
    """Ray Data settings of the inference stage.

    ``num_actors``/``num_gpus_per_actor`` of ``None`` are derived from the cluster.
    ``max_image_size`` caps the longer side of a decoded image (larger images are
    downscaled right after decoding; boxes still come out in original pixels);
    ``None`` uses the model's ``max_size`` or the largest view scale, whichever is
    larger.
    """

    batch_size: int = 8
    num_actors: int | None = None
    num_gpus_per_actor: float | None = None
    score_floor: float = 0.0
    max_image_size: int | None = None


@dataclass(frozen=True)
class ThresholdConfig:
    """The Ray Tune search for the pseudo-label score threshold.

    ``search`` is ``grid`` (``num_samples`` evenly spaced points in ``[low, high]``)
    or ``optuna`` (``num_samples`` TPE trials on the global objective). With
    ``per_class`` the student keeps each class above its own threshold (matching that
    class's labeled rate) instead of the global one.
    """

    per_class: bool = False
    search: str = "grid"
    num_samples: int = 41
    low: float = 0.0
    high: float = 1.0
    max_concurrent_trials: int = 2


@dataclass(frozen=True)
class Config:
    """A whole run: the top-level keys of the YAML file.

    Attributes:
        data: the splits (:class:`DataConfig`).
        output_dir: the local working directory every step writes to and the next
            step reads from (on a cluster: the head node's disk).
        storage_uri: optional durable copy of the outputs, a local path or a
            ``file://``, ``s3://``, ``gs://`` (``gcs://``), ``abfs://`` or ``hdfs://``
            URI (anything ``pyarrow.fs.FileSystem.from_uri`` opens). Ray Train then
            keeps its checkpoints under ``STORAGE_URI/ray_train`` (needed on a
            multi-node cluster: workers cannot see the head node's disk) and each
            step's outputs are copied to ``STORAGE_URI/<same relative path>`` when it
            ends, so nothing is lost when the head node goes away
            (:mod:`raydd.storage`).
    """

    data: DataConfig
    output_dir: str
    storage_uri: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TrainConfig = field(default_factory=TrainConfig)
    views: tuple[ViewConfig, ...] = (ViewConfig(), ViewConfig(hflip=True))
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    student: StudentConfig = field(default_factory=StudentConfig)


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), names: bool = True
) -> Config:
    """Reads a YAML config, applies ``dotted.key=value`` overrides and validates it
    (``names``: see :func:`parse_config`).

    Raises:
        ConfigError: naming the key or path that is wrong.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return parse_config(raw, overrides, names)


def parse_config(
    raw: dict[str, Any], overrides: Sequence[str] = (), names: bool = True
) -> Config:
    """Applies overrides to plain config data, builds, resolves paths and validates
    (with ``names=False`` all but :func:`validate_names`, which imports torch)."""
    for item in overrides:
        _apply_override(raw, item)
    config = resolve_paths(from_dict(raw))
    validate(config)
    if names:
        validate_names(config)
    return config


def resolve_paths(config: Config) -> Config:
    """Makes every local path absolute (relative to the working directory).

    Ray workers run in other directories, so a relative path would point elsewhere.
    """
    data = config.data
    coco = {
        s: dataclasses.replace(
            getattr(data, s),
            annotations=_absolute(getattr(data, s).annotations),
            images=_absolute(getattr(data, s).images),
        )
        for s in ("labeled", "test", "validation")
        if getattr(data, s) is not None
    }
    root = data.unlabeled.root
    unlabeled = dataclasses.replace(
        data.unlabeled,
        images=_absolute(data.unlabeled.images),
        root=root and _absolute(root),
    )
    weights = config.model.backbone_weights
    return dataclasses.replace(
        config,
        data=DataConfig(unlabeled=unlabeled, **coco),
        output_dir=_absolute(config.output_dir),
        storage_uri=config.storage_uri and _absolute(config.storage_uri),
        model=dataclasses.replace(
            config.model, backbone_weights=weights and _absolute(weights)
        ),
    )


def from_dict(raw: dict[str, Any]) -> Config:
    """Builds a :class:`Config` from plain data, rejecting unknown or missing keys."""
    return from_plain(Config, raw, "")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (YAML/JSON next to outputs and in checkpoints)."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | os.PathLike[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a mapping")
    node[leaf] = yaml.safe_load(text)


def from_plain(cls: type, raw: Any, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from plain data; ``prefix`` names it in errors."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; known keys of {where}: {sorted(names)}"
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name], prefix + f.name)
        elif (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"missing required key {prefix}{f.name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(hint, value, key)
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, {} if value is None else value, key + ".")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def unlabeled_files(split: UnlabeledSplit) -> list[str]:
    """The unlabeled URIs in a fixed order (:func:`raydd.sources.list_images`)."""
    from raydd.sources import list_images  # late: keeps `import raydd.config` light

    return list_images(split)


def single_view(config: Config) -> tuple[ViewConfig]:
    """The plain (single-view) test of a model: the first configured view, no flip."""
    first = config.views[0]
    return (ViewConfig(scale=first.scale, max_size=first.max_size),)


def _check_train(name: str, cfg: TrainConfig) -> None:
    for key in ("iterations", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{name}.{key} must be at least 1")
    if cfg.num_workers < 1:
        raise ConfigError(f"{name}.num_workers must be at least 1")
    if cfg.max_workers is not None and cfg.max_workers < cfg.num_workers:
        raise ConfigError(
            f"{name}.max_workers ({cfg.max_workers}) must be at least num_workers "
            f"({cfg.num_workers})"
        )
    if cfg.cpus_per_worker <= 0:
        raise ConfigError(f"{name}.cpus_per_worker must be positive")
    if not 0 <= cfg.passes < math.inf:
        raise ConfigError(f"{name}.passes must be 0 (off) or a positive number")
    if any(not 0.0 < m <= 1.0 for m in cfg.lr_milestones):
        raise ConfigError(f"{name}.lr_milestones are fractions of training in (0, 1]")


def validate(config: Config) -> None:
    """Checks paths, names and ranges before any work starts.

    Raises:
        ConfigError: with the offending key and value.
    """
    data = config.data
    for split in ("labeled", "test", "validation"):
        coco: CocoSplit | None = getattr(data, split)
        if coco is None:
            continue
        _require_file(f"data.{split}.annotations", coco.annotations)
        _require_dir(f"data.{split}.images", coco.images)
    split = data.unlabeled
    if split.shard_size < 1:
        raise ConfigError("data.unlabeled.shard_size must be at least 1")
    if split.num_shards < 1 or not 0 <= split.shard_index < split.num_shards:
        raise ConfigError(
            "data.unlabeled: need num_shards >= 1 and 0 <= shard_index < num_shards, "
            f"got {split.shard_index} of {split.num_shards}"
        )
    _require_source("data.unlabeled.images", split.images)
    _require_writable("output_dir", config.output_dir)
    _check_storage_uri(config.storage_uri)
    if config.model.backbone_weights is not None:
        _require_file("model.backbone_weights", config.model.backbone_weights)
    if not config.views:
        raise ConfigError("views must list at least one view")
    for i, view in enumerate(config.views):
        for key in ("scale", "max_size"):
            value = getattr(view, key)
            if value is not None and value <= 0:
                raise ConfigError(
                    f"views[{i}].{key} must be a positive number of pixels"
                )
    size = config.inference.max_image_size
    if size is not None and size <= 0:
        raise ConfigError(
            "inference.max_image_size must be a positive number of pixels"
        )
    _check_train("teacher", config.teacher)
    _check_train("student", config.student)
    if not 0.0 < config.student.labeled_share <= 1.0:
        raise ConfigError("student.labeled_share must be in (0, 1]")
    if config.student.init not in ("pretrained", "teacher"):
        raise ConfigError(
            f"student.init must be 'pretrained' or 'teacher', got "
            f"{config.student.init!r}"
        )
    _check_pseudo_options(config)
    if config.threshold.search not in ("grid", "optuna"):
        raise ConfigError(
            f"threshold.search must be 'grid' or 'optuna', got "
            f"{config.threshold.search!r}"
        )


def _check_pseudo_options(config: Config) -> None:
    student = config.student
    if not 0.0 <= student.ignore_band <= 1.0:
        raise ConfigError("student.ignore_band is a score difference in [0, 1]")
    if student.ignore_band and "rcnn" not in config.model.name:
        raise ConfigError(
            "student.ignore_band needs a two-stage R-CNN model (RPN + box head), "
            f"got model.name {config.model.name!r}"
        )
    if any(size <= 0 for size in student.pseudo_min_size):
        raise ConfigError("student.pseudo_min_size: positive numbers of pixels")
    if not 0.0 <= student.pseudo_color_jitter < 1.0:
        raise ConfigError("student.pseudo_color_jitter must be in [0, 1)")


def validate_names(config: Config) -> None:
    """Checks the model and fusion method names (imports torch: about 4 s).

    Raises:
        ConfigError: an unknown name, listing the known ones.
    """
    from raydd import ensemble, models  # late: keeps `import raydd.config` light

    models.check_model_name(config.model.name)
    ensemble.check_method(config.ensemble.method)


STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs")


def _check_storage_uri(uri: str | None) -> None:
    if uri is None:
        return
    scheme, sep, _ = uri.partition("://")
    if not sep:
        _require_writable("storage_uri", uri)
    elif scheme.lower() not in STORAGE_SCHEMES:
        raise ConfigError(
            f"storage_uri: unknown scheme {scheme!r} in {uri!r}; use a local path or "
            f"one of {[s + '://' for s in STORAGE_SCHEMES]}"
        )


def _file_type(key: str, location: str) -> Any:
    """The kind of ``location`` (one request, no listing); errors name ``key``."""
    try:
        return storage.file_type(location)
    except (OSError, ValueError) as e:  # no credentials, unknown bucket, bad URI
        raise ConfigError(f"{key}: cannot open {location}: {e}") from e


def _require_file(key: str, path: str) -> None:
    if _file_type(key, path).name != "File":
        raise ConfigError(f"{key}: no such file: {path}")
    if "://" not in path and not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: file is not readable: {path}")


def _require_source(key: str, spec: str) -> None:
    """A folder, file, or the folder a glob starts in, exists (nothing is listed:
    a crawl may hold 10^9 objects; an empty match fails when step 2 lists it)."""
    try:
        base = (split_glob(spec) or (spec, []))[0]
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e
    if _file_type(key, base).name == "NotFound":
        raise ConfigError(f"{key}: nothing at {base}")


def _require_writable(key: str, path: str) -> None:
    if "://" in path:
        return  # remote storage: checked by the writer
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"{key}: cannot write under {existing}")


def _require_dir(key: str, path: str) -> None:
    # an object-store prefix with objects under it reads as a directory
    if _file_type(key, path).name != "Directory":
        raise ConfigError(f"{key}: no such directory: {path}")
