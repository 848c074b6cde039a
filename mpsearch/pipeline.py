"""A whole study from one config: workload → profile → cost → search → quantize → summary.

This is what ``mpsearch run`` and the search-run scripts in ``studies/`` call. It only uses the
public API; everything it computes is cached or stored (profile rows, latency tables, the
Optuna study), so a rerun resumes instead of starting over.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mpsearch._validation import invalid, unknown
from mpsearch.backends import quantize
from mpsearch.cost import CostModel, measure_cost
from mpsearch.plan import PrecisionPlan
from mpsearch.profile import SensitivityProfile, profile
from mpsearch.search import Budget, SearchResult, search
from mpsearch.workloads import WORKLOADS, Workload, load_workload

QUALITY = ("task", "fidelity")


@dataclass
class StudyConfig:
    """Everything a study needs, loadable from YAML (unknown keys are refused).

    ``workload`` is a bundled workload name (``digits_cnn``, ``resnet18``,
    ``text_transformer``, ``mlp``) or ``"package.module:function"`` returning a
    :class:`~mpsearch.workloads.Workload`.

    >>> StudyConfig(workload="digits_cnn", n_trials=40).study_name
    'digits_cnn'
    """

    workload: str = "digits_cnn"
    study_name: str | None = None
    seed: int = 0
    schemes: list[str] = field(default_factory=lambda: ["bf16", "w8a8", "w8a16", "w4a16"])
    space: str | None = None
    backend: str = "cpu"
    budget: dict[str, float] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["quality", "memory", "latency"])
    n_trials: int = 60
    sampler: str = "tpe"
    storage: str | None = None
    quality: str = "task"
    output_dir: str | None = None
    cache_dir: str = "studies/.cache"
    num_threads: int | None = 1
    timer: str = "process"
    load_if_exists: bool = True

    def __post_init__(self) -> None:
        if self.study_name is None:
            self.study_name = self.workload.rsplit(":", 1)[-1]
        if self.quality not in QUALITY:
            raise unknown("quality", self.quality, QUALITY)
        if ":" not in self.workload and self.workload not in WORKLOADS:
            raise invalid(
                "workload",
                self.workload,
                f"one of {sorted(WORKLOADS)} or 'package.module:function'",
            )
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise invalid("n_trials", self.n_trials, "a positive integer")
        Budget(**self.budget)  # validates the budget's keys and values now

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> StudyConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ValueError(f"Cannot read study config {str(path)!r}: {exc.strerror}.") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a study config must be a mapping of keys to values.")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"{path}: unknown key(s) {extra}; accepted keys: {sorted(known)}.")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///studies/{self.study_name}.db"

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir or f"studies/out/{self.study_name}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StudyOutcome:
    """What a study produced: the workload, profile, cost model, search result, chosen plan, summary."""

    config: StudyConfig
    workload: Workload
    profile: SensitivityProfile
    cost: CostModel
    result: SearchResult
    best: PrecisionPlan
    summary: pd.DataFrame
    timings: dict[str, float]
    plan_path: Path


def build_workload(spec: str, *, seed: int = 0) -> Workload:
    """A bundled workload by name, or the result of ``"package.module:function"(seed=seed)``."""
    if ":" not in spec:
        return load_workload(spec, seed=seed)
    module_name, func_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise invalid("workload", spec, f"an importable 'module:function' ({exc})") from None
    return factory(seed=seed)


def run_study(
    config: StudyConfig, *, log: Callable[[str], None] = print, progress: bool | None = None
) -> StudyOutcome:
    """Run (or resume) the study ``config`` describes and summarise it.

    The summary compares, measured in this run on the real backend: fp32, each uniform plan,
    and the best plan under the budget (quality on the workload's test split, exact memory,
    median end-to-end latency), with ratios to fp32.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    wl = build_workload(config.workload, seed=config.seed)
    timings["workload_s"] = time.perf_counter() - t0
    log(
        f"workload {wl.name}: {sum(p.numel() for p in wl.model.parameters()):,} parameters, fp32 quality {wl.evaluate(wl.model):.4f}"
    )

    t0 = time.perf_counter()
    cache = Path(config.cache_dir)
    prof = profile(
        wl.model, wl.calib, schemes=config.schemes, cache_dir=cache / "profile", progress=progress
    )
    timings["profile_s"] = time.perf_counter() - t0
    log(f"profile: {len(prof.table)} (layer, scheme) rows in {timings['profile_s']:.1f} s")

    t0 = time.perf_counter()
    cost = measure_cost(
        wl.model,
        wl.example_input,
        schemes=["fp32", *config.schemes],
        backend=config.backend,
        cache_dir=cache / "cost",
        num_threads=config.num_threads,
        timer=config.timer,
    )
    timings["cost_s"] = time.perf_counter() - t0
    log(
        f"cost model ({config.backend}): fp32 {cost.fp32_memory_bytes / 1e6:.3f} MB, {cost.fp32_latency_ms:.3f} ms, measured in {timings['cost_s']:.1f} s"
    )

    t0 = time.perf_counter()
    evaluate = wl.evaluate if config.quality == "task" else None
    result = search(
        wl.model,
        profile=prof,
        cost=cost,
        evaluate=evaluate,
        eval_data=wl.calib,
        budget=Budget(**config.budget) if config.budget else None,
        space=config.space,
        objectives=tuple(config.objectives),
        n_trials=config.n_trials,
        sampler=config.sampler,
        seed=config.seed,
        storage=config.storage_url,
        study_name=config.study_name,
        load_if_exists=config.load_if_exists,
    )
    timings["search_s"] = time.perf_counter() - t0
    log(
        f"search: {len(result.trials)} trials, {result.n_true_evaluations} true evaluations, {len(result.pareto)} plans on the front, {timings['search_s']:.1f} s"
    )

    best = result.best()
    summary = summarize(wl, cost, {"best": best, **_uniform_plans(result)}, backend=config.backend)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plan_path = best.save(out / "best_plan.json")
    summary.to_csv(out / "summary.csv", index=False)
    return StudyOutcome(config, wl, prof, cost, result, best, summary, timings, plan_path)


def _uniform_plans(result: SearchResult) -> dict[str, PrecisionPlan]:
    df = result.trials
    uniform = df[df["origin"].str.startswith("uniform:") & (df["state"] == "COMPLETE")]
    return {
        row.origin: PrecisionPlan.from_assignment(row.assignment) for row in uniform.itertuples()
    }


def summarize(
    wl: Workload, cost: CostModel, plans: dict[str, PrecisionPlan], *, backend: str
) -> pd.DataFrame:
    """Quality, exact memory and measured latency of fp32 and each plan, with ratios to fp32."""
    rows = [
        {
            "plan": "fp32",
            "quality": wl.evaluate(wl.model),
            "memory_mb": cost.fp32_memory_bytes / 1e6,
            "latency_ms": cost.measure("fp32"),
        }
    ]
    for name, plan in plans.items():
        qmodel = quantize(wl.model, plan, backend=backend)
        rows.append(
            {
                "plan": name,
                "quality": wl.evaluate(qmodel),
                "memory_mb": cost.memory_bytes(plan) / 1e6,
                "latency_ms": cost.measure(plan),
            }
        )
    df = pd.DataFrame(rows)
    df["memory_ratio"] = df["memory_mb"] / df.loc[0, "memory_mb"]
    df["speedup"] = df.loc[0, "latency_ms"] / df["latency_ms"]
    df["quality_drop"] = df.loc[0, "quality"] - df["quality"]
    return df
