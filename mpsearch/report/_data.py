"""Report data: every number and table the report shows, computed (and tested) apart from drawing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mpsearch.plan import PrecisionPlan
from mpsearch.report._record import RECOVERY_COLUMNS, StudyRecord, check_controller_frame
from mpsearch.schemes._rounding import DEFAULT_ROUNDING, split_choice


def plan_label(assignment: Mapping[str, str] | PrecisionPlan, *, skip_fp32: bool = True) -> str:
    """A short text for a plan: ``"conv2=w8a8 fc1=w4a16"`` (fp32 layers left out), ``"fp32"`` if none.

    >>> plan_label({"conv1": "fp32", "fc1": "w4a16"})
    'fc1=w4a16'
    """
    rules = assignment.rules if isinstance(assignment, PrecisionPlan) else dict(assignment)
    parts = [f"{k}={v}" for k, v in rules.items() if not (skip_fp32 and v == "fp32")]
    return " ".join(parts) if parts else "fp32"


def _fp32(record: StudyRecord, key: str) -> float:
    value = record.info.get(key)
    if value is None and record.summary is not None and len(record.summary):
        column = {"fp32_memory_mb": "memory_mb", "fp32_latency_ms": "latency_ms"}.get(key)
        rows = record.summary[record.summary["plan"] == "fp32"]
        if column and len(rows):
            value = rows[column].iloc[0]
    return float(value) if value is not None else math.nan


def front_table(record: StudyRecord) -> pd.DataFrame:
    """The Pareto front, cheapest in memory first, with ratios to fp32 and the chosen plan marked.

    Columns: ``trial``, ``origin``, ``quality``, ``memory_mb``, ``latency_ms`` (predicted by
    the cost model), ``memory_ratio`` and ``speedup`` (vs fp32), ``chosen`` (the plan in
    ``best_plan.json``) and ``plan`` (:func:`plan_label`).

    >>> front_table(StudyRecord.load("studies/out/digits"))   # doctest: +SKIP
    """
    columns = [
        "trial",
        "origin",
        "quality",
        "memory_mb",
        "latency_ms",
        "memory_ratio",
        "speedup",
        "chosen",
        "plan",
    ]
    if record.pareto is None or not len(record.pareto):
        return pd.DataFrame(columns=columns)
    df = record.pareto.copy()
    best_trial = None if record.best is None else record.best.metadata.get("trial")
    df["memory_ratio"] = df["memory_mb"] / _fp32(record, "fp32_memory_mb")
    df["speedup"] = _fp32(record, "fp32_latency_ms") / df["latency_ms"]
    if best_trial is not None:
        df["chosen"] = df["trial"] == int(best_trial)
    elif record.best is not None:
        df["chosen"] = [p.rules == record.best.rules for p in df["plan"]]
    else:
        df["chosen"] = False
    df["plan"] = [plan_label(p) for p in df["plan"]]
    df = df.sort_values(["memory_mb", "latency_ms"], kind="stable").reset_index(drop=True)
    if "decode" in record.info:  # a causal LM: quality = -log perplexity, latency per token
        df["perplexity"] = np.exp(-df["quality"])
        df["tokens_per_s"] = 1000.0 / df["latency_ms"]
        columns = [*columns[:3], "perplexity", *columns[3:5], "tokens_per_s", *columns[5:]]
    return df[columns]


def layer_table(record: StudyRecord, plan: PrecisionPlan | None = None) -> pd.DataFrame:
    """Per layer of ``plan`` (default: the chosen plan): its scheme, size, bits and sensitivity.

    Columns: ``layer``, ``layer_type``, ``scheme``, ``params`` (weight elements),
    ``bits_per_weight`` (scales included; 32 for fp32), ``sensitivity`` (the profile's
    single-layer end-to-end error of the layer in that scheme, 0 for fp32), ``task_drop``
    (the profile's, NaN where not measured), ``memory_kb`` and ``latency_ms`` of the layer in
    that scheme (from the cost table, NaN without one). ``scheme`` is the layer's choice,
    with its calibrated rounding (``"w4a16+gptq"``).

    >>> layer_table(StudyRecord.load("studies/out/digits"))[["layer", "scheme"]]  # doctest: +SKIP
    """
    plan = plan if plan is not None else record.best
    columns = [
        "layer",
        "layer_type",
        "scheme",
        "params",
        "bits_per_weight",
        "sensitivity",
        "task_drop",
        "memory_kb",
        "latency_ms",
    ]
    if plan is None:
        return pd.DataFrame(columns=columns)
    layers = record.layers or list(plan.rules)
    assignment = plan.resolve_choices(layers)  # with the rounding: "w4a16+gptq"
    prof = record.profile.set_index(["layer", "scheme"]) if record.profile is not None else None
    cost = record.cost.set_index(["layer", "scheme"]) if record.cost is not None else None
    rows = []
    for layer, choice in assignment.items():
        scheme = split_choice(choice)[0]  # the cost table's rows are per scheme
        row: dict[str, Any] = {"layer": layer, "scheme": choice}
        p = _row(prof, layer, choice)
        any_p = _any_row(prof, layer)
        row["layer_type"] = any_p.get("layer_type", "") if any_p is not None else ""
        row["params"] = int(any_p["params"]) if any_p is not None else np.nan
        if scheme == "fp32":
            row.update(bits_per_weight=32.0, sensitivity=0.0, task_drop=0.0)
        else:
            row["bits_per_weight"] = float(p["bits_per_weight"]) if p is not None else np.nan
            row["sensitivity"] = float(p["e2e"]) if p is not None else np.nan
            row["task_drop"] = float(p["task_drop"]) if p is not None else np.nan
        c = _row(cost, layer, scheme)
        row["memory_kb"] = float(c["memory_bytes"]) / 1e3 if c is not None else np.nan
        row["latency_ms"] = float(c["latency_ms"]) if c is not None else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _row(frame: pd.DataFrame | None, layer: str, scheme: str) -> pd.Series | None:
    if frame is None or (layer, scheme) not in frame.index:
        return None
    row = frame.loc[(layer, scheme)]
    return row.iloc[0] if isinstance(row, pd.DataFrame) else row


def _any_row(frame: pd.DataFrame | None, layer: str) -> pd.Series | None:
    if frame is None or layer not in frame.index.get_level_values(0):
        return None
    return frame.xs(layer, level=0).iloc[0]


def best_uniform(record: StudyRecord) -> str | None:
    """The uniform plan the chosen plan is compared with: the best-quality feasible one.

    Among the ``summary`` rows named ``uniform:<scheme>`` whose search trial met the budget
    (``feasible`` in ``trials``), the one with the highest measured quality (ties: the faster).
    Without a feasible one, the best-quality uniform plan. ``None`` without uniform rows.

    >>> best_uniform(StudyRecord.load("studies/out/digits"))   # doctest: +SKIP
    'uniform:w8a8'
    """
    if record.summary is None:
        return None
    uniform = record.summary[record.summary["plan"].astype(str).str.startswith("uniform:")]
    if not len(uniform):
        return None
    if record.trials is not None and {"origin", "feasible"} <= set(record.trials.columns):
        feasible = set(record.trials.loc[record.trials["feasible"].astype(bool), "origin"])
        ok = uniform[uniform["plan"].isin(feasible)]
        uniform = ok if len(ok) else uniform
    ranked = uniform.sort_values(["quality", "latency_ms"], ascending=[False, True], kind="stable")
    return str(ranked["plan"].iloc[0])


def speedup_table(record: StudyRecord) -> pd.DataFrame:
    """The plans measured on the real backend, with speed-ups vs fp32 and the chosen plan's vs each.

    Columns: ``plan``, ``quality``, ``quality_drop`` (vs fp32), ``memory_mb``,
    ``memory_ratio``, ``latency_ms`` (measured), ``speedup`` (fp32 latency / latency),
    ``best_vs`` (this row's latency / the chosen plan's: how much faster the chosen plan is),
    ``role`` (``"reference"`` for fp32, ``"chosen"``, ``"best uniform"`` or ``""``).

    >>> speedup_table(StudyRecord.load("studies/out/digits"))   # doctest: +SKIP
    """
    columns = [
        "plan",
        "role",
        "quality",
        "quality_drop",
        "memory_mb",
        "memory_ratio",
        "latency_ms",
        "speedup",
        "best_vs",
    ]
    if record.summary is None or not len(record.summary):
        return pd.DataFrame(columns=columns)
    df = record.summary.copy()
    fp32 = df[df["plan"] == "fp32"]
    ref = fp32.iloc[0] if len(fp32) else df.iloc[0]
    df["quality_drop"] = ref["quality"] - df["quality"]
    df["memory_ratio"] = df["memory_mb"] / ref["memory_mb"]
    df["speedup"] = ref["latency_ms"] / df["latency_ms"]
    best = df[df["plan"] == "best"]
    best_ms = float(best["latency_ms"].iloc[0]) if len(best) else math.nan
    df["best_vs"] = df["latency_ms"] / best_ms
    uniform = best_uniform(record)
    df["role"] = [
        "reference"
        if p == "fp32"
        else "chosen"
        if p == "best"
        else "best uniform"
        if p == uniform
        else ""
        for p in df["plan"]
    ]
    return df[columns].reset_index(drop=True)


def headline(record: StudyRecord) -> dict[str, Any]:
    """The key figures: the chosen plan's quality, memory and measured speed-ups, and the search's size.

    Keys: ``study``, ``workload``, ``backend``, ``trials``, ``true_evaluations``,
    ``front_size``, ``fp32_quality``, ``best_quality``, ``quality_drop``,
    ``memory_ratio``, ``speedup_vs_fp32``, ``best_uniform``, ``speedup_vs_best_uniform``
    (NaN / ``None`` where the files needed are missing).

    >>> headline(StudyRecord.load("studies/out/digits"))["speedup_vs_fp32"]  # doctest: +SKIP
    """
    out: dict[str, Any] = {
        "study": record.name,
        "workload": record.info.get("workload", ""),
        "backend": record.info.get("config", {}).get("backend", ""),
        "trials": len(record.trials) if record.trials is not None else 0,
        "true_evaluations": int((record.trials["quality_source"] == "true").sum())
        if record.trials is not None and "quality_source" in record.trials
        else 0,
        "front_size": len(record.pareto) if record.pareto is not None else 0,
        "fp32_quality": math.nan,
        "best_quality": math.nan,
        "quality_drop": math.nan,
        "memory_ratio": math.nan,
        "speedup_vs_fp32": math.nan,
        "best_uniform": None,
        "speedup_vs_best_uniform": math.nan,
    }
    table = speedup_table(record)
    if len(table):
        by = table.set_index("plan")
        if "fp32" in by.index:
            out["fp32_quality"] = float(by.loc["fp32", "quality"])
        if "best" in by.index:
            row = by.loc["best"]
            out.update(
                best_quality=float(row["quality"]),
                quality_drop=float(row["quality_drop"]),
                memory_ratio=float(row["memory_ratio"]),
                speedup_vs_fp32=float(row["speedup"]),
            )
        uniform = best_uniform(record)
        if uniform is not None:
            out["best_uniform"] = uniform
            out["speedup_vs_best_uniform"] = float(by.loc[uniform, "best_vs"])
    return out


RECOVERY_TABLE_COLUMNS: tuple[str, ...] = (
    *RECOVERY_COLUMNS[:5],
    "quality_gain",
    *RECOVERY_COLUMNS[5:],
)


def recovery_table(record: StudyRecord) -> pd.DataFrame | None:
    """The recovery fine-tune per plan (``recovery.csv``), with ``quality_gain`` = quality
    after - quality before (on the test split); ``None`` when the study ran no recovery.

    >>> rec = StudyRecord(name="demo", recovery=pd.DataFrame({"plan": ["best"],
    ...     "quality_before": [0.81], "quality_after": [0.86]}))
    >>> round(float(recovery_table(rec)["quality_gain"].iloc[0]), 2)
    0.05
    """
    if record.recovery is None:
        return None
    df = record.recovery.copy()
    for column in ("quality_before", "quality_after"):
        if column not in df.columns:
            raise ValueError(
                f"The recovery table lacks the column {column!r} (got {list(df.columns)})."
            )
    df["quality_gain"] = df["quality_after"] - df["quality_before"]
    for column in RECOVERY_TABLE_COLUMNS:
        if column not in df.columns:
            df[column] = "" if column in ("rounding", "backend", "note") else np.nan
    df["note"] = df["note"].fillna("").astype(str)
    return df[list(RECOVERY_TABLE_COLUMNS)].reset_index(drop=True)


def rounding_table(record: StudyRecord) -> pd.DataFrame:
    """The calibrated rounding methods of the study: per method, the choices profiled with it
    (``profiled``, from the profile's rows) and the chosen plan's layers that use it
    (``chosen_layers``). Empty when no method but round to nearest was used.

    >>> prof = pd.DataFrame({"layer": ["fc", "fc"], "scheme": ["w4a16", "w4a16+gptq"]})
    >>> rounding_table(StudyRecord(name="demo", profile=prof,
    ...                            best=PrecisionPlan({"fc": "w4a16+gptq"}))).values.tolist()
    [['gptq', 'w4a16+gptq', 'fc']]
    """
    profiled: dict[str, list[str]] = {}
    if record.profile is not None and "scheme" in record.profile.columns:
        for choice in dict.fromkeys(record.profile["scheme"].astype(str)):
            profiled.setdefault(split_choice(choice)[1], []).append(choice)
    chosen: dict[str, list[str]] = {}
    if record.best is not None:
        layers = record.layers or list(record.best.rules)
        for layer, choice in record.best.resolve_choices(layers).items():
            chosen.setdefault(split_choice(choice)[1], []).append(layer)
    methods = [m for m in dict.fromkeys([*profiled, *chosen]) if m != DEFAULT_ROUNDING]
    rows = [
        [m, ", ".join(profiled.get(m, [])), ", ".join(chosen.get(m, [])) or "none"] for m in methods
    ]
    return pd.DataFrame(rows, columns=["method", "profiled", "chosen_layers"])


def controller_curve_data(frame: pd.DataFrame) -> pd.DataFrame:
    """The controller's curve: each method's per-input latency and disagreement, grouped in series.

    ``frame`` has the :data:`~mpsearch.report._record.CONTROLLER_COLUMNS`. Methods named
    ``ctrl:<scorer>:<eps>`` form the series ``ctrl:<scorer>`` (one point per calibration
    target ``eps``, sorted by latency), ``static:<variant>`` rows the series ``static``
    (single plans served to every input); others are a series of their own.

    >>> df = pd.DataFrame({"method": ["static:fp32", "ctrl:gate:0.01"], "latency_ms": [1.0, 0.7],
    ...                    "disagreement": [0.0, 0.004], "accuracy": [0.99, 0.99]})
    >>> controller_curve_data(df)[["series", "epsilon"]].values.tolist()
    [['ctrl:gate', 0.01], ['static', nan]]
    """
    df = check_controller_frame(frame)
    series, eps = [], []
    for method in df["method"]:
        parts = method.split(":")
        if parts[0] == "ctrl" and len(parts) >= 3:
            series.append(":".join(parts[:2]))
            eps.append(_float(parts[-1]))
        elif parts[0] == "static":
            series.append("static")
            eps.append(math.nan)
        else:
            series.append(method)
            eps.append(math.nan)
    df["series"] = series
    if "epsilon" not in df.columns:
        df["epsilon"] = eps
    keep = ["series", "method", "epsilon", "latency_ms", "disagreement", "accuracy"]
    if "note" in df.columns:  # e.g. why a target was not certifiable
        df["note"] = df["note"].fillna("").astype(str)
        keep.append("note")
    return df.sort_values(["series", "latency_ms"], kind="stable")[keep].reset_index(drop=True)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
