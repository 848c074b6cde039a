"""Drawing with matplotlib (imported here only): thin functions over the plot data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpsearch.plan import PrecisionPlan
from mpsearch.viz._compare import method_fronts_data
from mpsearch.viz._data import bit_allocation_data, hypervolume_data, pareto_data
from mpsearch.viz._tradeoff import variant_share_data

_COLORS = {"sampler": "tab:blue", "uniform": "tab:gray", "greedy": "tab:orange", "ilp": "tab:green"}


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))[1]


def plot_pareto(result: Any, *, x: str = "memory_mb", y: str = "quality", ax: Any = None) -> Any:
    """Scatter of evaluated plans by origin, the front drawn as a step line.

    >>> plot_pareto(res, x="latency_ms")  # doctest: +SKIP
    """
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
    """Heat map of weight bits per layer for each plan.

    >>> plot_bit_allocation(res.plans, res.space.layers)  # doctest: +SKIP
    """
    ax = _axes(ax)
    df = bit_allocation_data(plans, layers, labels=labels)
    image = ax.imshow(df[list(layers)].to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(df)), df["plan"])
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.figure.colorbar(image, ax=ax, label="weight bits")
    return ax


def plot_hypervolume(result: Any, *, ax: Any = None) -> Any:
    """Hypervolume against the number of true evaluations.

    >>> plot_hypervolume(res)  # doctest: +SKIP
    """
    ax = _axes(ax)
    df = hypervolume_data(result)
    ax.plot(df["true_evaluations"], df["hypervolume"], marker=".")
    ax.set_xlabel("true evaluations")
    ax.set_ylabel("hypervolume")
    return ax


_METHOD_STYLE = {
    "mpsearch": ("black", "o"),
    "uniform": ("tab:gray", "s"),
    "greedy": ("tab:orange", "^"),
    "ilp": ("tab:green", "D"),
}


def plot_method_fronts(result: Any, *, x: str = "memory_mb", ax: Any = None) -> Any:
    """Each method's front of quality against ``x`` (``memory_mb`` / ``latency_ms``) as a step line.

    >>> plot_method_fronts(res, x="latency_ms")  # doctest: +SKIP
    """
    ax = _axes(ax)
    df = method_fronts_data(result, x=x)
    for method, part in df.groupby("method", sort=False):
        color, marker = _METHOD_STYLE.get(method, ("tab:purple", "x"))
        ax.step(part[x], part["quality"], where="post", color=color, lw=1.0, alpha=0.8)
        ax.scatter(part[x], part["quality"], color=color, marker=marker, s=22, label=method)
    ax.set_xlabel(x)
    ax.set_ylabel("quality")
    ax.legend(fontsize=8)
    return ax


def plot_controller_tradeoff(tradeoff: Any, *, y: str = "agreement", ax: Any = None) -> Any:
    """Controller settings (a line) and static variants (points): ``y`` against mean cost per input.

    ``tradeoff`` is :func:`controller_tradeoff_data`'s table.

    >>> plot_controller_tradeoff(df, y="accuracy")  # doctest: +SKIP
    """
    if y not in ("agreement", "accuracy"):
        raise ValueError(f"The 'y' argument must be 'agreement' or 'accuracy'. Got {y!r} instead.")
    ax = _axes(ax)
    static = tradeoff[tradeoff["method"] == "static"]
    ctrl = tradeoff[tradeoff["method"] == "controller"].sort_values("cost_ms")
    ax.plot(ctrl["cost_ms"], ctrl[y], marker="o", color="tab:blue", label="controller")
    for row in ctrl.itertuples(index=False):
        ax.annotate(row.setting, (row.cost_ms, getattr(row, y)), fontsize=7, alpha=0.7)
    ax.scatter(static["cost_ms"], static[y], marker="s", color="tab:red", label="static plans")
    for row in static.itertuples(index=False):
        ax.annotate(row.setting, (row.cost_ms, getattr(row, y)), fontsize=7, color="tab:red")
    ax.set_xlabel("mean cost per input (ms)")
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
    return ax


def plot_variant_share(tradeoff: Any, variants: Sequence[str], *, ax: Any = None) -> Any:
    """Stacked bars: the share of inputs each variant serves, per controller setting.

    >>> plot_variant_share(df, [v.name for v in ctrl.variants])  # doctest: +SKIP
    """
    ax = _axes(ax)
    long = variant_share_data(tradeoff, variants)
    settings = list(dict.fromkeys(long["setting"]))
    bottom = [0.0] * len(settings)
    for variant in variants:
        part = long[long["variant"] == variant].set_index("setting").reindex(settings)
        heights = part["share"].tolist()
        ax.bar(settings, heights, bottom=bottom, label=variant)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("share of inputs")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=8)
    return ax
