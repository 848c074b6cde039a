"""The search against its baselines, from one study: fronts, hypervolumes, best plan per budget.

Every study made by :func:`mpsearch.search` truly evaluates the uniform, greedy and ILP plans
it is warm-started with. So each baseline's front is the front of its own plans, and
mpsearch's is the front of every plan the study evaluated, all measured the same way, on the
same reference. Which plans are a baseline's: with the result's choice table (a result from
:func:`~mpsearch.search` has it; pass ``table=`` to :func:`load_result`), every plan the
baseline proposes (:func:`baseline_params`), also when another method proposed it first;
without it, the trials' ``origin`` (``uniform:*``, ``greedy:*``, ``ilp:*``), which names only
the first method that proposed a plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mpsearch._validation import check_fraction, invalid
from mpsearch.search import Budget, hypervolume
from mpsearch.search._search import baseline_plans
from mpsearch.search._table import ChoiceTable

METHODS = ("mpsearch", "uniform", "greedy", "ilp")
_COST_AXES = ("memory_mb", "latency_ms")


def _evaluated(result: Any) -> pd.DataFrame:
    """Feasible COMPLETE trials whose quality was truly evaluated (or memoised), one per plan,
    with ``kind`` (the first part of ``origin``)."""
    df = result.trials
    if not len(df):
        return pd.DataFrame(columns=["trial", "quality", "memory_mb", "latency_ms", "kind"])
    df = df[
        (df["state"] == "COMPLETE") & df["quality_source"].isin(["true", "memo"]) & df["feasible"]
    ].copy()
    df["kind"] = df["origin"].str.split(":").str[0]
    # one point per plan: a memoised re-run of a plan (quality_source "memo") is not a new point
    if "assignment" in df.columns:
        keys = [tuple(sorted(a.items())) if isinstance(a, dict) else None for a in df["assignment"]]
        return df[~pd.Series(keys, index=df.index).duplicated() | df["assignment"].isna()]
    return df.drop_duplicates(subset=["quality", "memory_mb", "latency_ms"])


def baseline_params(
    table: ChoiceTable,
    limits: tuple[float | None, float | None] = (None, None),
    *,
    n_greedy: int = 8,
    n_ilp: int = 6,
) -> dict[str, list[dict[str, str]]]:
    """The plans (one value per searched parameter) each baseline proposes, as
    :func:`mpsearch.search._search.warm_start_params` builds them, but without removing a plan that an
    earlier method proposed too. ``limits`` is ``(memory MB, latency ms)`` (``None``: none).

    ``uniform``: every layer in one scheme; ``greedy``: ``n_greedy`` points along the greedy
    walk and the walk's plan at the budget; ``ilp``: the ILP plan at the budget and at
    ``n_ilp`` memory levels between the smallest and the largest plan.

    >>> sorted(baseline_params(res.table, res.limits))  # doctest: +SKIP
    ['greedy', 'ilp', 'uniform']
    """
    out: dict[str, list[dict[str, str]]] = {"uniform": [], "greedy": [], "ilp": []}
    for origin, params in baseline_plans(table, limits, n_greedy=n_greedy, n_ilp=n_ilp).items():
        out[origin.split(":")[0]].append(params)
    return out


def _by_method(df: pd.DataFrame, result: Any) -> dict[str, pd.DataFrame]:
    table = getattr(result, "table", None)
    if not isinstance(table, ChoiceTable) or not table.error or not len(df):
        return {m: df if m == "mpsearch" else df[df["kind"] == m] for m in METHODS}
    params = list(table.error)
    proposed = {
        method: {tuple(p[k] for k in params) for p in plans}
        for method, plans in baseline_params(table, result.limits).items()
    }
    keys = [
        tuple(table.space.params_of(a)[k] for k in params) if a else None for a in df["assignment"]
    ]
    out = {"mpsearch": df}
    for method in METHODS[1:]:
        out[method] = df[[k in proposed[method] for k in keys]]
    return out


def front_2d(points: pd.DataFrame, x: str, y: str = "quality") -> pd.DataFrame:
    """The rows of ``points`` on the 2-D front (``x`` down, ``y`` up), sorted by ``x``.

    A row stays when no other row has ``x`` at most and ``y`` at least as good with one
    strictly better; of identical points the first is kept.

    >>> pts = pd.DataFrame({"memory_mb": [1.0, 2.0, 2.0, 3.0], "quality": [0.5, 0.9, 0.7, 0.9]})
    >>> front_2d(pts, "memory_mb")["quality"].tolist()
    [0.5, 0.9]
    """
    ordered = points.sort_values([x, y], ascending=[True, False], kind="stable")
    keep, best = [], -np.inf
    for value in ordered[y].to_numpy(dtype=float):
        keep.append(value > best)
        best = max(best, value)
    return ordered[np.asarray(keep, dtype=bool)].reset_index(drop=True)


def method_fronts_data(result: Any, *, x: str = "memory_mb") -> pd.DataFrame:
    """Each method's front of quality against ``x`` (``memory_mb`` or ``latency_ms``).

    Columns: ``method`` (``mpsearch``, ``uniform``, ``greedy``, ``ilp``), ``trial``,
    ``quality``, ``x``, ``origin``; per method sorted by ``x``. Only feasible, truly evaluated
    plans count; ``mpsearch`` is every one of them (its warm starts included).

    >>> method_fronts_data(res, x="latency_ms").groupby("method").size()  # doctest: +SKIP
    """
    if x not in _COST_AXES:
        raise invalid("x", x, f"one of {list(_COST_AXES)}")
    parts = []
    for method, part in _by_method(_evaluated(result), result).items():
        if not len(part):
            continue
        front = front_2d(part, x)[["trial", "quality", x, "origin"]]
        front.insert(0, "method", method)
        parts.append(front)
    columns = ["method", "trial", "quality", x, "origin"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def hypervolume_reference(
    result: Any, *, margin: float = 0.01, cover_all: bool = False
) -> tuple[float, float, float]:
    """A hypervolume reference point ``(quality, memory_mb, latency_ms)`` for comparing methods.

    Quality: the lowest truly evaluated quality minus ``margin`` times the highest (so plans
    tied at the lowest quality, as on an easy task, still add volume); memory and latency:
    ``result.fp32_memory_mb`` / ``result.fp32_latency_ms`` (the convention of
    ``benchmarks/bench_search.py``). With ``cover_all`` they are raised to the largest value
    any evaluated plan has, so plans costlier than fp32 (e.g. latency on a machine where the
    quantized kernels lose) still count.

    >>> hypervolume_reference(res)  # doctest: +SKIP
    (0.9845, 0.362, 2.15)
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise invalid("margin", margin, "a number in [0, 1)")
    df = _evaluated(result)
    if not len(df):
        return (0.0, float(result.fp32_memory_mb), float(result.fp32_latency_ms))
    quality = float(df["quality"].min()) - margin * abs(float(df["quality"].max()))
    memory, latency = float(result.fp32_memory_mb), float(result.fp32_latency_ms)
    if cover_all:
        memory = max(memory, float(df["memory_mb"].max()))
        latency = max(latency, float(df["latency_ms"].max()))
    return (quality, memory, latency)


def method_hypervolume_data(
    result: Any, *, reference: tuple[float, float, float] | None = None
) -> pd.DataFrame:
    """Hypervolume of each method's plans over (quality up, memory down, latency down).

    One ``reference`` for all (default ``result.reference_point()``: lowest true quality,
    fp32 memory, fp32 latency). Columns: ``method``, ``points``, ``hypervolume``,
    ``relative`` (to the best method; NaN when every volume is 0).

    >>> method_hypervolume_data(res).set_index("method")["relative"]  # doctest: +SKIP
    """
    ref = tuple(reference) if reference is not None else result.reference_point()
    if len(ref) != 3:
        raise invalid("reference", reference, "a (quality, memory_mb, latency_ms) triple")
    rows = []
    for method, part in _by_method(_evaluated(result), result).items():
        pts = part[["quality", "memory_mb", "latency_ms"]].to_numpy(dtype=float)
        rows.append(
            {
                "method": method,
                "points": len(pts),
                "hypervolume": hypervolume(pts, ref, [True, False, False]),
            }
        )
    df = pd.DataFrame(rows)
    top = df["hypervolume"].max()
    df["relative"] = df["hypervolume"] / top if top > 0 else np.nan
    return df


def method_budget_data(
    result: Any, budgets: Mapping[str, Budget | Mapping[str, float]]
) -> pd.DataFrame:
    """Best plan of each method at each budget: ``budget``, ``method``, ``trial``, ``quality``,
    ``memory_mb``, ``latency_ms`` (NaN where no plan of the method meets the budget).

    Fractions are of ``result.fp32_memory_mb`` / ``result.fp32_latency_ms``; ties go to the
    smaller, then faster plan (as :meth:`SearchResult.best`).

    >>> method_budget_data(res, {"mem 30%": Budget(memory_fraction=0.3)})  # doctest: +SKIP
    """
    if not isinstance(budgets, Mapping) or not budgets:
        raise invalid("budgets", budgets, "a non-empty mapping of label to Budget")
    limits = {}
    for label, budget in budgets.items():
        b = budget if isinstance(budget, Budget) else Budget(**budget)
        limits[label] = b.limits(
            fp32_memory_mb=result.fp32_memory_mb, fp32_latency_ms=result.fp32_latency_ms
        )
    by_method = _by_method(_evaluated(result), result)
    rows = []
    for label, (memory_mb, latency_ms) in limits.items():
        for method, part in by_method.items():
            ok = part
            if memory_mb is not None:
                ok = ok[ok["memory_mb"] <= memory_mb * (1 + 1e-9)]
            if latency_ms is not None:
                ok = ok[ok["latency_ms"] <= latency_ms * (1 + 1e-9)]
            row = {"budget": label, "method": method}
            if len(ok):
                best = ok.sort_values(
                    ["quality", "memory_mb", "latency_ms"],
                    ascending=[False, True, True],
                    kind="stable",
                ).iloc[0]
                row |= {
                    "trial": int(best["trial"]),
                    "quality": float(best["quality"]),
                    "memory_mb": float(best["memory_mb"]),
                    "latency_ms": float(best["latency_ms"]),
                }
            else:
                row |= {
                    "trial": np.nan,
                    "quality": np.nan,
                    "memory_mb": np.nan,
                    "latency_ms": np.nan,
                }
            rows.append(row)
    return pd.DataFrame(rows)


def evaluations_to_reach(history: pd.DataFrame, fraction: float = 0.99) -> int | None:
    """The first number of true evaluations whose hypervolume reaches ``fraction`` of the final one.

    ``history`` is :meth:`SearchResult.hypervolume_history` (or :func:`hypervolume_data`);
    ``None`` when it is empty or the final hypervolume is 0.

    >>> h = pd.DataFrame({"true_evaluations": [1, 2, 3], "hypervolume": [0.5, 0.995, 1.0]})
    >>> evaluations_to_reach(h)
    2
    """
    check_fraction("fraction", fraction, open_high=False)
    if not len(history):
        return None
    final = float(history["hypervolume"].iloc[-1])
    if not final > 0:
        return None
    reached = history[history["hypervolume"] >= fraction * final]
    return int(reached["true_evaluations"].iloc[0])
