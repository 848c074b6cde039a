"""Drawing with matplotlib (imported here only): thin functions over the plot data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpsearch.plan import PrecisionPlan
from mpsearch.viz._data import bit_allocation_data, hypervolume_data, pareto_data

_COLORS = {"sampler": "tab:blue", "uniform": "tab:gray", "greedy": "tab:orange", "ilp": "tab:green"}


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))[1]


def plot_pareto(result: Any, *, x: str = "memory_mb", y: str = "quality", ax: Any = None) -> Any:
    """Scatter of evaluated plans by origin, the front drawn as a step line."""
    ax = _axes(ax)
    df = pareto_data(result, x=x, y=y)
    for kind, part in df.groupby("kind"):
        ax.scatter(
            part[x], part[y], s=14, alpha=0.6, label=kind, color=_COLORS.get(kind, "tab:purple")
        )
    front = df[df["on_front"]].sort_values(x)
    ax.step(front[x], front[y].cummax(), where="post", color="black", lw=1.2, label="front")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
    return ax


def plot_bit_allocation(
    plans: Sequence[PrecisionPlan],
    layers: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    ax: Any = None,
) -> Any:
    """Heat map of weight bits per layer for each plan."""
    ax = _axes(ax)
    df = bit_allocation_data(plans, layers, labels=labels)
    image = ax.imshow(df[list(layers)].to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(df)), df["plan"])
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.figure.colorbar(image, ax=ax, label="weight bits")
    return ax


def plot_hypervolume(result: Any, *, ax: Any = None) -> Any:
    """Hypervolume against the number of true evaluations."""
    ax = _axes(ax)
    df = hypervolume_data(result)
    ax.plot(df["true_evaluations"], df["hypervolume"], marker=".")
    ax.set_xlabel("true evaluations")
    ax.set_ylabel("hypervolume")
    return ax
