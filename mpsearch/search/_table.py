"""Per-layer error and cost of every choice, gathered from a profile and a cost model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from mpsearch.backends._quantize import tied_groups
from mpsearch.layers import quantizable_layers
from mpsearch.schemes._rounding import split_choice
from mpsearch.search._space import ResolvedSpace, SearchSpace, load_space


class ProfileLike(Protocol):
    """What the search needs of a sensitivity profile (``mpsearch.SensitivityProfile``);
    a ``schemes`` list, where it has one, limits the space to the schemes profiled."""

    def error(self, layer: str, scheme: str, metric: str = ...) -> float: ...


class CostLike(Protocol):
    """What the search needs of a cost model (``mpsearch.CostModel``); its ``schemes`` and
    ``supported(layer, scheme)``, where it has them, limit the space to what was measured."""

    fp32_memory_bytes: int
    fp32_latency_ms: float

    def memory_bytes(self, plan: Any) -> int: ...

    def latency_ms(self, plan: Any) -> float: ...


def resolve_space(
    space: SearchSpace | str | Path | Mapping[str, Any] | None,
    model: nn.Module,
    *,
    profile: ProfileLike,
    cost: CostLike,
) -> ResolvedSpace:
    """``space`` (see :func:`load_space`) applied to ``model``, narrowed to the schemes the
    profile and the cost model have figures for (``fp32`` always: its error is 0 by definition)
    and that the backend runs.

    >>> resolve_space("mlp", model, profile=prof, cost=cost).choices  # doctest: +SKIP
    """
    profiled = getattr(profile, "schemes", None)
    return load_space(space, model).resolve(
        model,
        supported=getattr(cost, "supported", None),
        measured=getattr(cost, "schemes", None),
        profiled=None if profiled is None else list(dict.fromkeys(["fp32", *profiled])),
        skipped=_skipped_rows(profile),
    )


def _skipped_rows(profile: ProfileLike) -> dict[tuple[str, str], str]:
    """(layer, scheme) -> reason for the rows the profile skipped (none for a profile without
    a table)."""
    table = getattr(profile, "table", None)
    if table is None or "status" not in getattr(table, "columns", ()):
        return {}
    rows = table[table["status"] == "skipped"]
    return {(r.layer, r.scheme): r.reason for r in rows.itertuples()}


@dataclass
class ChoiceTable:
    """For each searched parameter and each of its choices: error, memory bytes, latency ms.

    A parameter's figures sum over its tied layers. ``base_memory`` and ``base_latency``
    are what the plan does not change (the other tensors, the fixed overhead, pinned layers)
    so that ``memory = base_memory + sum(memory of the choices)`` exactly, and latency
    approximately (the cost model's own prediction is the reference).
    """

    space: ResolvedSpace
    error: dict[str, dict[str, float]]
    memory: dict[str, dict[str, float]]
    latency: dict[str, dict[str, float]]
    base_memory: float
    base_latency: float

    @classmethod
    def build(
        cls, space: ResolvedSpace, profile: ProfileLike, cost: CostLike, *, metric: str = "e2e"
    ) -> ChoiceTable:
        layer_cost = _per_layer_costs(cost, space)
        _tied_memory(layer_cost, space, cost)
        error: dict[str, dict[str, float]] = {}
        memory: dict[str, dict[str, float]] = {}
        latency: dict[str, dict[str, float]] = {}
        for param, layers in space.params.items():
            error[param], memory[param], latency[param] = {}, {}, {}
            for s in space.choices[param]:
                errs = [
                    0.0 if s == "fp32" else float(profile.error(layer, s, metric))
                    for layer in layers
                ]
                if not all(math.isfinite(e) for e in errs):
                    continue  # skipped by the profiler (NaN) or its output not finite (inf)
                error[param][s] = sum(errs)
                memory[param][s] = sum(layer_cost[(layer, s)][0] for layer in layers)
                latency[param][s] = sum(layer_cost[(layer, s)][1] for layer in layers)
        searched = [layer for layers in space.params.values() for layer in layers]
        reference = space.assignment(dict.fromkeys(space.params, "fp32"))
        base_memory = cost.memory_bytes(reference) - sum(
            layer_cost[(n, "fp32")][0] for n in searched
        )
        base_latency = cost.latency_ms(reference) - sum(
            layer_cost[(n, "fp32")][1] for n in searched
        )
        return cls(space, error, memory, latency, float(base_memory), float(base_latency))

    def choices(self, param: str) -> list[str]:
        return list(self.error[param])

    def totals(self, params: Mapping[str, str]) -> tuple[float, float, float]:
        """``(error, memory bytes, latency ms)`` of one value per parameter (additive model)."""
        err = sum(self.error[p][s] for p, s in params.items())
        mem = self.base_memory + sum(self.memory[p][s] for p, s in params.items())
        lat = self.base_latency + sum(self.latency[p][s] for p, s in params.items())
        return err, mem, lat


def _tied_memory(
    layer_cost: dict[tuple[str, str], tuple[float, float]], space: ResolvedSpace, cost: Any
) -> None:
    """Replace (in place) the memory of searched layers that share one weight (a tied
    embedding and output layer) by their group's: with every layer of the group that takes a
    scheme in it (the others fp32), the exact bytes the plan adds to the all-fp32 one
    (``cost.memory_bytes``), split evenly; fp32 adds none. Their own rows each count the whole
    weight, held once or shared (a bf16 pair holds one table), so the sum of rows was off by a
    table or more; this way a group in one scheme is priced exactly."""
    model = getattr(cost, "model", None)
    if model is None:
        return
    layers = {n: p for p, ls in space.params.items() for n in ls}
    reference = space.assignment(dict.fromkeys(space.params, "fp32"))
    base = cost.memory_bytes(reference)
    for group in tied_groups(quantizable_layers(model), layers):
        choices = {n: space.choices[layers[n]] for n in group}
        for scheme in {split_choice(c)[0] for cs in choices.values() for c in cs}:
            takers = [n for n in group if any(split_choice(c)[0] == scheme for c in choices[n])]
            plan = space.followed({**reference, **dict.fromkeys(takers, scheme)})
            share = (cost.memory_bytes(plan) - base) / len(takers)
            for n in takers:
                for c in choices[n]:
                    if split_choice(c)[0] == scheme:
                        layer_cost[(n, c)] = (share, layer_cost[(n, c)][1])
        for n in group:
            layer_cost[(n, "fp32")] = (0.0, layer_cost[(n, "fp32")][1])


def _per_layer_costs(cost: Any, space: ResolvedSpace) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(layer, scheme): (memory bytes, latency ms)}`` from the cost model's table."""
    table = cost.table
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for row in table.itertuples(index=False):
        out[(row.layer, row.scheme)] = (float(row.memory_bytes), float(row.latency_ms))
    for p, layers in space.params.items():  # a choice with a rounding costs its scheme
        for layer in layers:
            for s in space.choices[p]:
                if (layer, s) not in out and (layer, split_choice(s)[0]) in out:
                    out[(layer, s)] = out[(layer, split_choice(s)[0])]
    missing = [
        (layer, s)
        for p, layers in space.params.items()
        for layer in layers
        for s in [*space.choices[p], "fp32"]
        if (layer, s) not in out
    ]
    if missing:
        shown = ", ".join(f"{layer}/{s}" for layer, s in missing[:8])
        raise ValueError(
            f"The cost model has no figures for {len(missing)} (layer, scheme) pair(s) of the search space "
            f"({shown}); measure it with schemes covering the space (plus 'fp32')."
        )
    return out
