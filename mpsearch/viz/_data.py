"""Plot data: the numbers behind every figure, computed (and tested) apart from the drawing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from mpsearch.plan import PrecisionPlan
from mpsearch.schemes import get_scheme

_AXES = ("quality", "memory_mb", "latency_ms")


def pareto_data(result: Any, *, x: str = "memory_mb", y: str = "quality") -> pd.DataFrame:
    """Every truly evaluated trial with ``x``, ``y``, its origin, feasibility and whether it is on the front.

    >>> df = pareto_data(res)          # doctest: +SKIP
    >>> df[df.on_front][["memory_mb", "quality"]]   # doctest: +SKIP
    """
    for name, value in (("x", x), ("y", y)):
        if value not in _AXES:
            raise ValueError(
                f"The {name!r} argument must be one of {list(_AXES)}. Got {value!r} instead."
            )
    df = result.trials
    df = df[(df["state"] == "COMPLETE") & df["quality_source"].isin(["true", "memo"])].copy()
    front = set(result.pareto["trial"])
    df["on_front"] = df["trial"].isin(front)
    df["kind"] = df["origin"].str.split(":").str[0]
    return (
        df[["trial", x, y, "kind", "origin", "feasible", "on_front"]]
        .sort_values(x)
        .reset_index(drop=True)
    )


def bit_allocation_data(
    plans: Sequence[PrecisionPlan], layers: Sequence[str], *, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """Weight bits per layer (columns) for each plan (rows), and the scheme names alongside.

    >>> int(bit_allocation_data([PrecisionPlan(default="w8a8")], ["fc1", "fc2"]).loc[0, "fc1"])
    8
    """
    labels = list(labels) if labels is not None else [f"plan {i}" for i in range(len(plans))]
    if len(labels) != len(plans):
        raise ValueError(
            f"The 'labels' argument must have one label per plan ({len(plans)}). Got {len(labels)} instead."
        )
    rows = []
    for label, plan in zip(labels, plans, strict=True):
        assignment = plan.resolve(list(layers))
        rows.append(
            {"plan": label, **{n: get_scheme(s).weight_bits for n, s in assignment.items()}}
        )
    return (
        pd.DataFrame(rows, columns=["plan", *layers])
        .set_index("plan", drop=False)
        .reset_index(drop=True)
    )


def hypervolume_data(
    result: Any, reference: tuple[float, float, float] | None = None
) -> pd.DataFrame:
    """Hypervolume after each true evaluation (columns ``true_evaluations``, ``trial``, ``hypervolume``).

    >>> hypervolume_data(res)["hypervolume"].iloc[-1] == res.hypervolume()  # doctest: +SKIP
    True
    """
    return result.hypervolume_history(reference)
