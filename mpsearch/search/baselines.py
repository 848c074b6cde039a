"""Baseline plans, each usable alone and as warm starts of the search.

- :func:`uniform_assignments`: every layer in one scheme (where the space allows it).
- :func:`greedy_path`: AIMET-style Pareto walk: start all-high, repeatedly lower the
  parameter with the least error added per unit of cost saved.
- :func:`ilp_assignment`: HAWQ-V3-style integer linear program: minimise the summed
  sensitivity subject to memory / latency budgets (``scipy.optimize.milp``).

All work on a :class:`ChoiceTable` (per-parameter error, memory, latency) and return
``{parameter: scheme}`` dicts; ``table.space.assignment(params)`` gives the plan.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from mpsearch.schemes import get_scheme
from mpsearch.search._table import ChoiceTable

__all__ = ["greedy_assignment", "greedy_path", "ilp_assignment", "uniform_assignments"]


def uniform_assignments(table: ChoiceTable) -> dict[str, dict[str, str]]:
    """``{scheme: params}`` with every parameter in ``scheme`` where it may take it.

    A parameter that cannot take ``scheme`` takes its allowed choice with the nearest weight
    bits (the higher one on a tie). Duplicates are removed.
    """
    schemes = list(dict.fromkeys(s for p in table.error for s in table.choices(p)))
    out: dict[str, dict[str, str]] = {}
    seen: set[tuple[str, ...]] = set()
    for scheme in schemes:
        bits = get_scheme(scheme).weight_bits
        params = {}
        for p in table.error:
            choices = table.choices(p)
            params[p] = (
                scheme
                if scheme in choices
                else min(
                    choices,
                    key=lambda s: (
                        abs(get_scheme(s).weight_bits - bits),
                        -get_scheme(s).weight_bits,
                    ),
                )
            )
        key = tuple(params.values())
        if key not in seen:
            seen.add(key)
            out[scheme] = params
    return out


def greedy_path(table: ChoiceTable, *, objective: str = "memory") -> list[dict[str, str]]:
    """The greedy Pareto walk from the costliest plan to the cheapest, one move per step.

    Each step lowers one parameter to a cheaper choice (by ``objective``: ``memory`` or
    ``latency``), picking the move with the smallest ``added error / saved cost``.
    """
    cost = _cost_dict(table, objective)
    current = {p: max(cost[p], key=lambda s: (cost[p][s], -table.error[p][s])) for p in table.error}
    path = [dict(current)]
    while True:
        best, best_ratio = None, float("inf")
        for p, choices in cost.items():
            for s, c in choices.items():
                saved = cost[p][current[p]] - c
                if saved <= 0:
                    continue
                ratio = (table.error[p][s] - table.error[p][current[p]]) / saved
                if ratio < best_ratio:
                    best, best_ratio = (p, s), ratio
        if best is None:
            return path
        current[best[0]] = best[1]
        path.append(dict(current))


def greedy_assignment(
    table: ChoiceTable, *, memory_bytes: float | None = None, latency_ms: float | None = None
) -> dict[str, str] | None:
    """The first plan of the greedy walk (on the binding budget) that meets every budget."""
    objective = "memory" if memory_bytes is not None or latency_ms is None else "latency"
    for params in greedy_path(table, objective=objective):
        _, mem, lat = table.totals(params)
        if (memory_bytes is None or mem <= memory_bytes) and (
            latency_ms is None or lat <= latency_ms
        ):
            return params
    return None


def ilp_assignment(
    table: ChoiceTable, *, memory_bytes: float | None = None, latency_ms: float | None = None
) -> dict[str, str] | None:
    """Minimum summed error subject to budgets, solved exactly (``None`` when infeasible)."""
    index = [(p, s) for p in table.error for s in table.choices(p)]
    n = len(index)
    c = np.array([table.error[p][s] for p, s in index])
    params = list(table.error)
    a_eq = np.zeros((len(params), n))
    for j, (p, _) in enumerate(index):
        a_eq[params.index(p), j] = 1.0
    constraints = [LinearConstraint(a_eq, 1.0, 1.0)]
    if memory_bytes is not None:
        row = np.array([table.memory[p][s] for p, s in index])
        constraints.append(
            LinearConstraint(row[None, :], -np.inf, memory_bytes - table.base_memory)
        )
    if latency_ms is not None:
        row = np.array([table.latency[p][s] for p, s in index])
        constraints.append(LinearConstraint(row[None, :], -np.inf, latency_ms - table.base_latency))
    res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        return None
    return {p: s for (p, s), x in zip(index, res.x, strict=True) if x > 0.5}


def _cost_dict(table: ChoiceTable, objective: str) -> dict[str, dict[str, float]]:
    if objective == "memory":
        return table.memory
    if objective == "latency":
        return table.latency
    raise ValueError(
        f"The 'objective' argument must be one of 'latency', 'memory'. Got {objective!r} instead."
    )
