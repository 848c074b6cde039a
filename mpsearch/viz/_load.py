"""Load a finished (or running) study back from its Optuna storage as a :class:`SearchResult`.

A study made by :func:`mpsearch.search` keeps every trial's plan, memory, latency, origin and
quality source, plus a summary of its space, objectives and budget limits. That is all the
front, the bit allocations and the hypervolume need; what the storage does not keep (the
per-layer cost table, the cost model's fp32 figures) may be passed in.
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from mpsearch._validation import invalid
from mpsearch.search import SearchResult, make_storage
from mpsearch.search._fingerprint import SUMMARY_ATTR
from mpsearch.search._space import ResolvedSpace
from mpsearch.search._storage import safe_url
from mpsearch.search._table import ChoiceTable


def _space_from_summary(study: optuna.Study, summary: dict[str, Any]) -> ResolvedSpace:
    layers: list[str] = []
    for trial in study.get_trials(deepcopy=False):
        plan = trial.user_attrs.get("plan")
        if plan:
            layers = list(plan)
            break
    choices = {str(p): list(c) for p, c in summary.get("params", {}).items()}
    params = {p: [p.removeprefix("group:")] for p in choices}
    return ResolvedSpace(
        layers=layers,
        params=params,
        choices=choices,
        pinned=dict(summary.get("pinned", {})),
        followers=dict(summary.get("followers", {})),
    )


def load_result(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    *,
    table: ChoiceTable | None = None,
    fp32_memory_mb: float | None = None,
    fp32_latency_ms: float | None = None,
) -> SearchResult:
    """The :class:`SearchResult` of the mpsearch study ``study_name`` kept in ``storage``.

    ``storage`` is a URL as for :func:`mpsearch.search` (``sqlite:///...``, a journal file,
    ``postgresql://...``) or a storage object. Objectives and budget limits are read from the
    study. ``table`` (a :class:`~mpsearch.search._table.ChoiceTable` built from the same profile and
    cost model) gives the exact space; without it the space is rebuilt from the study's summary
    (tied layer groups named by their first layer) and the table is empty. ``fp32_memory_mb`` /
    ``fp32_latency_ms`` (the cost model's ``fp32_memory_bytes / 1e6`` and ``fp32_latency_ms``)
    set the hypervolume reference and fraction budgets; without them the largest memory and
    latency among the study's trials stand in.

    >>> res = load_result("sqlite:///studies/digits.db", "digits")  # doctest: +SKIP
    >>> res.pareto[["quality", "memory_mb", "latency_ms"]]            # doctest: +SKIP
    """
    if not isinstance(study_name, str) or not study_name:
        raise invalid("study_name", study_name, "a non-empty study name")
    for name, value in (("fp32_memory_mb", fp32_memory_mb), ("fp32_latency_ms", fp32_latency_ms)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
        ):
            raise invalid(name, value, "a positive number or None")
    opened = make_storage(storage)
    names = optuna.get_all_study_names(storage=opened)
    if study_name not in names:
        raise ValueError(
            f"The storage {safe_url(storage)!r} holds no study named {study_name!r}; "
            f"it holds {sorted(names)!r}. Pass one of these as 'study_name'."
        )
    study = optuna.load_study(study_name=study_name, storage=opened)
    summary = study.user_attrs.get(SUMMARY_ATTR)
    if not isinstance(summary, dict):
        raise ValueError(
            f"The study {study_name!r} in {safe_url(storage)!r} was not made by mpsearch.search "
            f"(it has no {SUMMARY_ATTR!r} user attribute); load it with optuna.load_study instead."
        )
    space = table.space if table is not None else _space_from_summary(study, summary)
    if table is None:
        table = ChoiceTable(space, {}, {}, {}, math.nan, math.nan)
    limits = tuple(summary.get("limits", (None, None)))
    memory, latency = [], []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        memory.append(float(t.user_attrs.get("memory_mb", math.nan)))
        latency.append(float(t.user_attrs.get("latency_ms", math.nan)))
    return SearchResult(
        study=study,
        space=space,
        table=table,
        objectives=tuple(summary.get("objectives", ("quality", "memory", "latency"))),
        limits=(limits[0], limits[1]),
        fp32_memory_mb=float(fp32_memory_mb or _nanmax(memory)),
        fp32_latency_ms=float(fp32_latency_ms or _nanmax(latency)),
    )


def _nanmax(values: list[float]) -> float:
    """The largest value that is not NaN (NaN when there is none)."""
    finite = [v for v in values if not math.isnan(v)]
    return max(finite, default=math.nan)
