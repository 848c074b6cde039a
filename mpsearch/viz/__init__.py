"""Plotting (thin ``plot_*`` functions) over plot data computed by tested functions in
:mod:`mpsearch.viz.data`. Imported lazily: matplotlib loads only when a drawing function is
called; plotly only for :func:`pareto_figure`.

>>> from mpsearch import viz
>>> res = viz.load_result("sqlite:///studies/digits.db", "digits")  # doctest: +SKIP
>>> viz.plot_pareto(res, x="memory_mb")  # doctest: +SKIP
>>> viz.data.pareto_data(res, x="memory_mb").query("on_front")  # doctest: +SKIP
"""

from mpsearch.viz import data
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

__all__ = [
    "data",
    "have_plotly",
    "load_result",
    "pareto_figure",
    "plot_bit_allocation",
    "plot_controller_tradeoff",
    "plot_hypervolume",
    "plot_method_fronts",
    "plot_pareto",
    "plot_variant_share",
]
