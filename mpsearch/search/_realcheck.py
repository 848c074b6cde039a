"""Plans checked where they run: whole quantized models on a real backend, quality and
end-to-end latency next to the user's fp32 model."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from mpsearch.backends import Backend, quantize
from mpsearch.plan import PrecisionPlan
from mpsearch.rounding import Rounder
from mpsearch.search._quality import quality_value

VERIFIED_ATTR = "mpsearch_verified"
"""The study user attribute holding the last check of its front on a real backend (see :func:`verify_front`)."""

PLAN_COLUMNS = ("plan", "quality", "latency_ms", "speedup", "note")
_FIGURES = ("quality", "latency_ms", "speedup")


def measure_plans(
    model: nn.Module,
    plans: Mapping[str, PrecisionPlan],
    *,
    backend: str | Backend,
    evaluate: Callable[[nn.Module], float],
    time_module: Callable[[nn.Module], float],
    rounds: int = 3,
    progress: bool = False,
    rounder: Rounder | None = None,
    calib: Any = None,
) -> pd.DataFrame:
    """Quality and end-to-end latency of ``model`` (row ``fp32``, the model as it is) and of
    each plan quantized on ``backend`` (``quantize(model, plan, backend=backend,
    rounder=rounder, calib=calib)``: ``rounder`` rounds the plans' calibrated choices,
    ``"w4a16+gptq"``; ``calib`` calibrates a backend that needs it, ``cpu-pt2e``).

    Columns: ``plan`` (the name), ``quality`` (``evaluate``), ``latency_ms`` (the median over
    ``rounds`` rounds that time every model in turn with ``time_module``, so that a burst of
    load on a shared machine does not land on one plan only), ``speedup`` (fp32 latency /
    latency) and ``note``: why a plan could not run (quantize, evaluate or timing raised, or
    ``evaluate`` gave no finite number; its figures are then NaN), empty otherwise.
    ``progress`` shows a progress bar over the plans. Plans that give every layer the same
    choice and carry the same kernels (the chosen plan is often one of the uniform ones) are
    quantized, evaluated and timed once, and get the same figures.

    >>> measure_plans(net, {"w8a8": PrecisionPlan.uniform("w8a8")}, backend="cpu",
    ...               evaluate=score, time_module=cost.time_module)  # doctest: +SKIP
    """
    models: dict[str, nn.Module] = {"fp32": model}
    rows = {"fp32": {"plan": "fp32", "quality": quality_value(evaluate(model)), "note": ""}}
    first: dict[tuple[Any, ...], str] = {}  # resolved choices and kernels -> the plan measured
    same: dict[str, str] = {}  # a plan -> the earlier plan of the same choices
    for name, plan in tqdm(plans.items(), desc="measure", disable=not progress, leave=False):
        key = _choices(model, plan)
        if key in first:
            same[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        try:
            models[name] = quantize(model, plan, backend=backend, rounder=rounder, calib=calib)
            quality = quality_value(evaluate(models[name]))
        except Exception as exc:  # recorded: the other plans are still measured
            models.pop(name, None)
            rows[name] = {"plan": name, "quality": float("nan"), "note": _why(exc)}
        else:
            rows[name] = {"plan": name, "quality": quality, "note": ""}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, module in list(models.items()):
            try:
                times[name].append(time_module(module))
            except Exception as exc:
                del models[name], times[name]
                rows[name].update(quality=float("nan"), note=_why(exc))
    measured = [rows[same.get(n, n)] | {"plan": n} for n in ["fp32", *plans]]
    df = pd.DataFrame(measured)
    df["latency_ms"] = [
        statistics.median(times[m]) if (m := same.get(n, n)) in times else float("nan")
        for n in df["plan"]
    ]
    df["speedup"] = df.loc[0, "latency_ms"] / df["latency_ms"]
    return df[list(PLAN_COLUMNS)]


def _choices(model: nn.Module, plan: PrecisionPlan) -> tuple[Any, ...] | None:
    """Every layer's choice under ``plan`` and the kernels it carries
    (``metadata["kernels"]``, which :func:`quantize` builds), comparable; ``None`` where the
    plan does not resolve on ``model`` (:func:`quantize` then says why)."""
    try:
        choices = tuple(sorted(plan.resolve_choices(model).items()))
    except Exception:
        return None
    return choices, json.dumps(plan.metadata.get("kernels"), sort_keys=True)


def _why(exc: Exception) -> str:
    return f"cannot run: {type(exc).__name__}: {exc}".strip()


def verify_front(
    study: Any,
    plans: Mapping[int, PrecisionPlan],
    *,
    model: nn.Module,
    backend: Backend,
    evaluate: Callable[[nn.Module], float],
    time_module: Callable[[nn.Module], float],
    rounder: Rounder | None = None,
) -> None:
    """Measure ``plans`` (by trial number) with :func:`measure_plans` and keep the figures in
    the study (user attribute :data:`VERIFIED_ATTR`, replacing an earlier check), where
    :attr:`SearchResult.verified <mpsearch.search.SearchResult.verified>` reads them."""
    df = measure_plans(
        model,
        {str(trial): plan for trial, plan in plans.items()},
        backend=backend,
        evaluate=evaluate,
        time_module=time_module,
        rounder=rounder,
    )
    # plain JSON for every storage: NaN (a plan that cannot run) kept as null
    rows = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in df.astype({c: object for c in _FIGURES}).to_dict("records")
    ]
    study.set_user_attr(VERIFIED_ATTR, {"backend": backend.name, "rows": rows})


def verified_frame(study: Any) -> pd.DataFrame | None:
    """The last check kept in ``study`` (see :func:`verify_front`) as a table: fp32 first, then
    one row per plan with its ``trial``; ``None`` when its front was never checked."""
    kept = study.user_attrs.get(VERIFIED_ATTR)
    if not kept:
        return None
    df = pd.DataFrame(kept["rows"], columns=list(PLAN_COLUMNS))
    df = df.astype(dict.fromkeys(_FIGURES, float))
    trial = pd.array([None if p == "fp32" else int(p) for p in df["plan"]], dtype="Int64")
    df.insert(1, "trial", trial)
    df["plan"] = ["fp32" if p == "fp32" else f"trial {p}" for p in df["plan"]]
    df.insert(len(df.columns) - 1, "backend", kept["backend"])
    return df
