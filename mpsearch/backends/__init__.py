"""Executing plans: ``simulate`` (fake quantization) and real-kernel backends, chosen by name."""

from mpsearch.backends._quantize import (
    as_plan,
    check_assignment,
    collect_activation_ranges,
    quantize,
)
from mpsearch.backends._registry import BACKENDS, Backend, get_backend, register_backend
from mpsearch.backends._simulate import SimulateBackend, SimulatedLayer

register_backend("simulate", SimulateBackend)

__all__ = [
    "BACKENDS",
    "Backend",
    "SimulateBackend",
    "SimulatedLayer",
    "as_plan",
    "check_assignment",
    "collect_activation_ranges",
    "get_backend",
    "quantize",
    "register_backend",
]
