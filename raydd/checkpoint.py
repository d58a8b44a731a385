"""Detector checkpoints: a plain torchvision ``state_dict`` plus the config behind it.

A checkpoint is a directory (local, or a URI such as ``s3://bucket/run/teacher``)::

    model.pt        torch.save(model.state_dict())  -- loads with weights_only=True
    metadata.json   {"model": ModelConfig, "categories": {...}, "config": {...}, ...}

so any torchvision user can rebuild the detector from ``metadata.json["model"]``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raydd import storage
from raydd.config import ModelConfig, from_plain, to_dict
from raydd.data.coco import Categories
from raydd.models import build_model

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"


def save_detector(
    directory: str | Path,
    model: nn.Module,
    model_config: ModelConfig,
    categories: Categories,
    **metadata: Any,
) -> None:
    """Writes ``model.pt`` and ``metadata.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    meta = {
        "model": to_dict(model_config),
        "categories": {"ids": list(categories.ids), "names": list(categories.names)},
        **metadata,
    }
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2))


def read_metadata(location: str | Path) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(str(location), METADATA_FILE)))


def load_state_dict(location: str | Path, device: str | torch.device = "cpu") -> dict:
    """The ``model.pt`` of a checkpoint at ``location`` (a folder or URI)."""
    data = storage.read_bytes(storage.join(str(location), MODEL_FILE))
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def load_detector(
    location: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Categories]:
    """Rebuilds the detector saved by :func:`save_detector` (in eval mode) from a
    local folder or a URI that every node reaches."""
    meta = read_metadata(location)
    model_config = from_plain(ModelConfig, meta["model"], "model.")
    categories = Categories(
        tuple(meta["categories"]["ids"]), tuple(meta["categories"]["names"])
    )
    model = build_model(model_config, categories.num_classes, pretrained=False)
    model.load_state_dict(load_state_dict(location, device))
    return model.to(device).eval(), categories
