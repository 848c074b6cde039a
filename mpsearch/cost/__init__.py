"""Cost of plans on a device: exact memory and measured latency per (layer, scheme), a
latency model for whole plans, its check against real end-to-end runs, and batch-1 decoding
time (prefill, per token) of causal language models, eager or compiled (:class:`KVDecoder`)."""

from mpsearch.cost._cache import CostCacheWarning
from mpsearch.cost._decode import DecodeTiming, KVDecoder, measure_decode
from mpsearch.cost._model import CostModel, held_bytes, measure_cost
from mpsearch.cost._options import CostOptions
from mpsearch.cost._timing import TIMERS, clock, cpu_model, median_ms, threads

__all__ = [
    "TIMERS",
    "CostCacheWarning",
    "CostModel",
    "CostOptions",
    "DecodeTiming",
    "KVDecoder",
    "clock",
    "cpu_model",
    "held_bytes",
    "measure_cost",
    "measure_decode",
    "median_ms",
    "threads",
]
