"""The data behind every figure of :mod:`mpsearch.viz`: tested functions that return plain
DataFrames and arrays and import no plotting library (the ``plot_*`` functions draw them).

>>> from mpsearch.viz import data
>>> data.pareto_data(res, x="memory_mb").query("on_front")  # doctest: +SKIP
"""

from mpsearch.viz._compare import (
    evaluations_to_reach,
    hypervolume_reference,
    method_budget_data,
    method_fronts_data,
    method_hypervolume_data,
)
from mpsearch.viz._data import bit_allocation_data, hypervolume_data, pareto_data
from mpsearch.viz._tradeoff import (
    cascade_arrays,
    controller_tradeoff_data,
    difficulty_examples,
    variant_share_data,
)

__all__ = [
    "bit_allocation_data",
    "cascade_arrays",
    "controller_tradeoff_data",
    "difficulty_examples",
    "evaluations_to_reach",
    "hypervolume_data",
    "hypervolume_reference",
    "method_budget_data",
    "method_fronts_data",
    "method_hypervolume_data",
    "pareto_data",
    "variant_share_data",
]
