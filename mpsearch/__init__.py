"""mpsearch: adaptive mixed-precision search for PyTorch models.

>>> import mpsearch as mps
>>> sorted(mps.SCHEMES)[:3]
['bf16', 'fp16', 'fp32']
"""

from mpsearch.backends import BACKENDS, get_backend, quantize, register_backend
from mpsearch.cost import CostModel, CostOptions, measure_cost
from mpsearch.layers import fold_batchnorm, quantizable_layers, split_attention
from mpsearch.plan import PrecisionPlan
from mpsearch.profile import ProfileOptions, SensitivityProfile, select_output
from mpsearch.profile import profile as profile
from mpsearch.recover import RecoverOptions, RecoveryResult
from mpsearch.recover import recover as recover
from mpsearch.rounding import Rounder, RoundingOptions, smooth_activations
from mpsearch.runtime import CalibrationReport, Controller, SpeculativeController
from mpsearch.schemes import SCHEMES, QuantSpec, Scheme, get_scheme, register_scheme
from mpsearch.search import (
    Budget,
    SearchOptions,
    SearchResult,
    SearchSpace,
    run_workers,
    search,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``mps.export_plan`` is imported on first use (its ONNX custom ops register then)."""
    if name == "export_plan":
        from mpsearch.export import export_plan

        return export_plan
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "SCHEMES",
    "Budget",
    "CalibrationReport",
    "Controller",
    "CostModel",
    "CostOptions",
    "PrecisionPlan",
    "ProfileOptions",
    "QuantSpec",
    "RecoverOptions",
    "RecoveryResult",
    "Rounder",
    "RoundingOptions",
    "Scheme",
    "SearchOptions",
    "SearchResult",
    "SearchSpace",
    "SensitivityProfile",
    "SpeculativeController",
    "__version__",
    "export_plan",
    "fold_batchnorm",
    "get_backend",
    "get_scheme",
    "measure_cost",
    "profile",
    "quantizable_layers",
    "quantize",
    "recover",
    "register_backend",
    "register_scheme",
    "run_workers",
    "search",
    "select_output",
    "smooth_activations",
    "split_attention",
]
