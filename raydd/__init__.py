"""raydd: data distillation (Radosavovic et al., CVPR 2018) for torchvision detectors.

The flow, one module per step: :mod:`raydd.teacher` -> :mod:`raydd.views` ->
:mod:`raydd.ensemble` (run by :mod:`raydd.pseudo_label`) -> :mod:`raydd.threshold` ->
:mod:`raydd.student` -> :mod:`raydd.evaluate`; :mod:`raydd.steps` runs them, and
:mod:`raydd.layout` says where each output lives.

The Python API is what the ``raydd`` command runs::

    import raydd

    config = raydd.load_config("my.yaml", ["storage_uri=s3://bucket/runs/exp1"])
    raydd.init_ray()                    # or join RAY_ADDRESS
    raydd.run_step(config, "teacher")   # one step ("pseudo_label", "threshold", ...)
    summary = raydd.run_all(config)     # or every step; returns summary.json
"""

from typing import Any

from raydd.config import ConfigError, load_config, parse_config
from raydd.layout import STEPS, Run
from raydd.steps import MissingInput, run_all, run_step

__all__ = [
    "STEPS",
    "ConfigError",
    "MissingInput",
    "Run",
    "init_ray",
    "load_config",
    "parse_config",
    "run_all",
    "run_step",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "init_ray":  # late: `raydd --help` and config errors need no Ray
        from raydd.runtime import init_ray

        return init_ray
    raise AttributeError(f"module 'raydd' has no attribute {name!r}")
