"""raydd: data distillation (Radosavovic et al., CVPR 2018) for torchvision detectors.

The flow, one module per step: :mod:`raydd.teacher` -> :mod:`raydd.views` ->
:mod:`raydd.ensemble` (run by :mod:`raydd.pseudo_label`) -> :mod:`raydd.threshold` ->
:mod:`raydd.student` -> :mod:`raydd.evaluate`; :mod:`raydd.pipeline` runs them all.
"""

__version__ = "0.1.0"
