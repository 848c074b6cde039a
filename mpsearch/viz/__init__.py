"""Plot data (tested) and thin plotting functions. Imported lazily: matplotlib loads only here,
and only when a drawing function is called; plotly only for :func:`pareto_figure`."""

from mpsearch.viz._compare import (
    METHODS,
    baseline_params,
    evaluations_to_reach,
    front_2d,
    hypervolume_reference,
    method_budget_data,
    method_fronts_data,
    method_hypervolume_data,
)
from mpsearch.viz._data import bit_allocation_data, hypervolume_data, pareto_data
from mpsearch.viz._draw import (
    plot_bit_allocation,
    plot_controller_tradeoff,
    plot_hypervolume,
    plot_method_fronts,
    plot_pareto,
    plot_variant_share,
)
from mpsearch.viz._load import load_result
from mpsearch.viz._plotly import have_plotly, pareto_figure
from mpsearch.viz._tradeoff import (
    cascade_arrays,
    controller_tradeoff_data,
    difficulty_examples,
    variant_share_data,
)

__all__ = [
    "METHODS",
    "baseline_params",
    "bit_allocation_data",
    "cascade_arrays",
    "controller_tradeoff_data",
    "difficulty_examples",
    "evaluations_to_reach",
    "front_2d",
    "have_plotly",
    "hypervolume_data",
    "hypervolume_reference",
    "load_result",
    "method_budget_data",
    "method_fronts_data",
    "method_hypervolume_data",
    "pareto_data",
    "pareto_figure",
    "plot_bit_allocation",
    "plot_controller_tradeoff",
    "plot_hypervolume",
    "plot_method_fronts",
    "plot_pareto",
    "plot_variant_share",
    "variant_share_data",
]
