"""Plot data (tested) and thin plotting functions. Imported lazily: matplotlib loads only here."""

from mpsearch.viz._data import bit_allocation_data, hypervolume_data, pareto_data
from mpsearch.viz._draw import plot_bit_allocation, plot_hypervolume, plot_pareto

__all__ = [
    "bit_allocation_data",
    "hypervolume_data",
    "pareto_data",
    "plot_bit_allocation",
    "plot_hypervolume",
    "plot_pareto",
]
