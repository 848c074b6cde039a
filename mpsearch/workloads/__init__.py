"""Bundled reference workloads: small trained models with their data splits and quality measure.

They need no network: the digits (classified, and segmented and tagged in scenes) come with scikit-learn, the text with Python's
``pydoc_data``, and the ResNet-18 is seeded random. Trained weights are cached on disk.

>>> from mpsearch.workloads import load_workload
>>> wl = load_workload("digits_cnn", seed=0)  # doctest: +SKIP
>>> wl.evaluate(wl.model)  # doctest: +SKIP
0.994...
"""

from __future__ import annotations

# Importing the builder modules registers them in WORKLOADS.
from mpsearch.workloads import (  # noqa: F401
    _char_mlp,
    _digits,
    _digits_seg,
    _digits_tags,
    _resnet,
    _stdlib_lm,
    _text,
    _zoo,
)
from mpsearch.workloads._base import (
    WORKLOADS,
    Workload,
    load_workload,
    negative_mse,
    register_workload,
    top1_accuracy,
)
from mpsearch.workloads._cache import CacheWarning
from mpsearch.workloads._char_mlp import CharMLP
from mpsearch.workloads._digits import DigitsCNN, DigitsMLP
from mpsearch.workloads._resnet import ResNet18
from mpsearch.workloads._text import CharTransformer
from mpsearch.workloads._zoo import ZOO

__all__ = [
    "WORKLOADS",
    "ZOO",
    "CacheWarning",
    "CharMLP",
    "CharTransformer",
    "DigitsCNN",
    "DigitsMLP",
    "ResNet18",
    "Workload",
    "load_workload",
    "negative_mse",
    "register_workload",
    "top1_accuracy",
]
