"""Cost of plans on a device: exact memory and measured latency per (layer, scheme), a
latency model for whole plans, and its check against real end-to-end runs."""

from mpsearch.cost._cache import CostCacheWarning, read_cache, write_cache
from mpsearch.cost._model import CostModel, ideal_layer_bytes, measure_cost
from mpsearch.cost._timing import TIMERS, cpu_model, median_ms

__all__ = [
    "TIMERS",
    "CostCacheWarning",
    "CostModel",
    "cpu_model",
    "ideal_layer_bytes",
    "measure_cost",
    "median_ms",
    "read_cache",
    "write_cache",
]
