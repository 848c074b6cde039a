from __future__ import annotations

import matplotlib
import pytest

from mpsearch.plan import PrecisionPlan
from mpsearch.viz import plot_bit_allocation, plot_hypervolume, plot_pareto
from mpsearch.viz.data import bit_allocation_data, pareto_data

matplotlib.use("Agg")


@pytest.fixture
def result(stored_front):
    return stored_front[1]


def test_pareto_data_marks_exactly_the_front(result) -> None:
    df = pareto_data(result)
    assert set(df[df["on_front"]]["trial"]) == set(result.pareto["trial"])
    assert {"uniform", "greedy", "ilp"} <= set(df["kind"])
    assert df["memory_mb"].is_monotonic_increasing
    with pytest.raises(ValueError, match="'x' argument must be one of"):
        pareto_data(result, x="bits")


def test_bit_allocation_data_is_exact() -> None:
    plans = [PrecisionPlan({"0": "w4a16"}, default="bf16"), PrecisionPlan(default="w8a8")]
    df = bit_allocation_data(plans, ["0", "1"], labels=["a", "b"])
    assert df.to_dict("records") == [{"plan": "a", "0": 4, "1": 16}, {"plan": "b", "0": 8, "1": 8}]
    with pytest.raises(ValueError, match="one label per plan"):
        bit_allocation_data(plans, ["0"], labels=["a"])


def test_drawing_functions_draw(result) -> None:
    ax = plot_pareto(result)
    assert len(ax.collections) >= 3
    ax = plot_hypervolume(result)
    assert len(ax.lines[0].get_xdata()) == result.n_true_evaluations
    ax = plot_bit_allocation(result.plans, [str(i) for i in range(5)])
    assert ax.images[0].get_array().shape == (len(result.plans), 5)
