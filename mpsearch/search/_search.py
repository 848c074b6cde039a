"""``search``: Optuna over per-layer schemes, warm-started by baselines, screened by a proxy."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from mpsearch._validation import check_positive, invalid, unknown
from mpsearch.search import baselines
from mpsearch.search._budget import Budget, as_budget
from mpsearch.search._quality import Fidelity, PlanRunner
from mpsearch.search._result import SearchResult
from mpsearch.search._space import ResolvedSpace, SearchSpace, load_space
from mpsearch.search._storage import make_storage
from mpsearch.search._table import ChoiceTable, CostLike, ProfileLike

OBJECTIVES: dict[str, str] = {"quality": "maximize", "memory": "minimize", "latency": "minimize"}
FINGERPRINT_ATTR = "mpsearch_fingerprint"


class EvaluationError(RuntimeError):
    """``evaluate`` raised or returned a non-finite value: the trial fails, the study goes on."""


SAMPLERS: dict[str, Callable[[int | None, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, n_objectives: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=8
    ),
    "nsga2": lambda seed, n_objectives: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=24
    ),
    "random": lambda seed, n_objectives: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(
    sampler: str | optuna.samplers.BaseSampler, *, seed: int | None, n_objectives: int
) -> optuna.samplers.BaseSampler:
    """A sampler from its registry name (``tpe``, ``nsga2``, ``random``) or any Optuna sampler."""
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler not in SAMPLERS:
        raise unknown("sampler", sampler, SAMPLERS)
    return SAMPLERS[sampler](seed, n_objectives)


@dataclass
class _Screen:
    """Proxy screening: quality predicted from summed sensitivity, calibrated on true evaluations."""

    min_points: int = 6
    margin_sigmas: float = 2.0

    def predict(
        self, proxy: float, history: list[tuple[float, float]]
    ) -> tuple[float, float] | None:
        """``(predicted quality, residual std)`` from a least-squares line, or ``None`` if too few points."""
        if len(history) < self.min_points:
            return None
        x = np.array([h[0] for h in history])
        y = np.array([h[1] for h in history])
        if np.ptp(x) == 0:
            return None
        slope, intercept = np.polyfit(x, y, 1)
        resid = y - (slope * x + intercept)
        return float(slope * proxy + intercept), float(resid.std(ddof=1) if len(x) > 2 else 0.0)


def search(
    model: nn.Module,
    *,
    profile: ProfileLike,
    cost: CostLike,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_data: Iterable[Any] | None = None,
    budget: Budget | Mapping[str, float] | None = None,
    space: SearchSpace | str | Path | Mapping[str, Any] | None = None,
    objectives: Sequence[str] = ("quality", "memory", "latency"),
    n_trials: int = 100,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    seed: int | None = 0,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    load_if_exists: bool = False,
    warm_start: bool = True,
    screen: bool = True,
    metric: str = "e2e",
    quality_backend: str = "simulate",
    n_jobs: int = 1,
    timeout: float | None = None,
    show_progress_bar: bool = False,
) -> SearchResult:
    """Search per-layer schemes; return the Pareto front of quality × memory × latency.

    Quality is ``evaluate(model)`` (higher is better) or, without it, :class:`Fidelity` to the
    fp32 model on ``eval_data``; memory (exact) and latency (predicted) come from ``cost``.
    ``budget`` limits become Optuna constraints (every trial records all of them). With
    ``objectives=("quality",)`` the search maximises quality under the budget; otherwise it
    returns the whole front. Warm starts (uniform, greedy, ILP plans) are enqueued first;
    with ``screen`` a candidate whose proxy-predicted quality (calibrated on true
    evaluations) is clearly dominated is pruned before its true evaluation.

    >>> res = search(model, profile=prof, cost=cost, eval_data=held_out,
    ...              budget=Budget(memory_fraction=0.3), n_trials=60)   # doctest: +SKIP
    >>> res.best().resolve(model)                                        # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    objectives = tuple(objectives)
    if (
        not objectives
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) != len(objectives)
    ):
        raise invalid(
            "objectives", objectives, f"a non-empty tuple of distinct names from {list(OBJECTIVES)}"
        )
    if "quality" not in objectives:
        raise invalid("objectives", objectives, "a tuple that includes 'quality'")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise invalid("n_trials", n_trials, "a positive integer")
    check_positive("timeout", timeout, allow_none=True)
    budget = as_budget(budget)
    if evaluate is None and eval_data is None:
        raise invalid(
            "evaluate",
            None,
            "a callable(model) -> float, or pass 'eval_data' for the default fidelity",
        )
    if evaluate is not None and not callable(evaluate):
        raise invalid("evaluate", evaluate, "a callable(model) -> float")
    model.eval()
    resolved = load_space(space, model).resolve(model, supported=getattr(cost, "supported", None))
    table = ChoiceTable.build(resolved, profile, cost, metric=metric)
    limits = budget.limits(
        fp32_memory_mb=cost.fp32_memory_bytes / 1e6, fp32_latency_ms=cost.fp32_latency_ms
    )
    _check_feasible(table, limits)
    quality_fn = evaluate if evaluate is not None else Fidelity(model, eval_data)
    sampler_obj = make_sampler(sampler, seed=seed, n_objectives=len(objectives))

    fingerprint = _fingerprint(model, resolved, objectives, limits, metric)
    study_name = study_name or f"mpsearch-{type(model).__name__.lower()}-{fingerprint[:8]}"
    storage = make_storage(_default_storage(storage, study_name))
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler_obj,
        directions=[OBJECTIVES[o] for o in objectives],
        load_if_exists=load_if_exists,
    )
    _check_fingerprint(study, fingerprint, resolved, objectives, limits)
    if len(objectives) > 1:
        study.set_metric_names(list(objectives))

    if warm_start:
        for origin, params in warm_start_params(table, limits).items():
            study.enqueue_trial(params, user_attrs={"origin": origin}, skip_if_exists=True)

    objective = _Objective(
        resolved=resolved,
        table=table,
        cost=cost,
        limits=limits,
        objectives=objectives,
        runner=PlanRunner(model, backend=quality_backend),
        quality_fn=quality_fn,
        screen=_Screen() if screen else None,
        study=study,
    )
    done = sum(t.state in _FINISHED for t in study.get_trials(deepcopy=False))
    started = time.perf_counter()
    if n_trials - done > 0:
        study.optimize(
            objective,
            n_trials=n_trials - done,
            timeout=timeout,
            n_jobs=n_jobs,
            catch=(EvaluationError,),
            show_progress_bar=show_progress_bar,
        )
    return SearchResult(
        study=study,
        space=resolved,
        table=table,
        objectives=objectives,
        limits=limits,
        fp32_memory_mb=cost.fp32_memory_bytes / 1e6,
        fp32_latency_ms=cost.fp32_latency_ms,
        wall_time_s=time.perf_counter() - started,
    )


_FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


def warm_start_params(
    table: ChoiceTable,
    limits: tuple[float | None, float | None],
    *,
    n_greedy: int = 8,
    n_ilp: int = 6,
) -> dict[str, dict[str, str]]:
    """Warm-start parameter sets by origin: uniform plans, greedy walk points, ILP plans.

    ILP plans are solved at the budget and at ``n_ilp`` memory levels spread between the
    smallest and the largest plan (so the front is seeded across its whole range).
    """
    memory_limit = None if limits[0] is None else limits[0] * 1e6
    latency_limit = limits[1]
    out: dict[str, dict[str, str]] = {
        f"uniform:{s}": p for s, p in baselines.uniform_assignments(table).items()
    }
    path = baselines.greedy_path(
        table,
        objective="latency" if memory_limit is None and latency_limit is not None else "memory",
    )
    picks = sorted({round(i * (len(path) - 1) / max(n_greedy - 1, 1)) for i in range(n_greedy)})
    for i in picks:
        out[f"greedy:{i}"] = path[i]
    at_budget = baselines.greedy_assignment(
        table, memory_bytes=memory_limit, latency_ms=latency_limit
    )
    if at_budget is not None:
        out["greedy:budget"] = at_budget
    if memory_limit is not None or latency_limit is not None:
        ilp = baselines.ilp_assignment(table, memory_bytes=memory_limit, latency_ms=latency_limit)
        if ilp is not None:
            out["ilp:budget"] = ilp
    lo, hi = _memory_range(table)
    for k in range(n_ilp):
        level = lo + (hi - lo) * (k + 1) / (n_ilp + 1)
        if memory_limit is not None:
            level = min(level, memory_limit)
        ilp = baselines.ilp_assignment(table, memory_bytes=level, latency_ms=latency_limit)
        if ilp is not None:
            out[f"ilp:{level / 1e6:.4g}MB"] = ilp
    unique: dict[tuple[str, ...], str] = {}
    for origin, params in out.items():
        unique.setdefault(tuple(params[p] for p in table.error), origin)
    return {origin: out[origin] for origin in unique.values()}


def _memory_range(table: ChoiceTable) -> tuple[float, float]:
    lo = table.base_memory + sum(min(m.values()) for m in table.memory.values())
    hi = table.base_memory + sum(max(m.values()) for m in table.memory.values())
    return lo, hi


def _check_feasible(table: ChoiceTable, limits: tuple[float | None, float | None]) -> None:
    memory_mb, latency_ms = limits
    if memory_mb is not None:
        smallest = _memory_range(table)[0] / 1e6
        if smallest > memory_mb:
            raise ValueError(
                f"The memory budget {memory_mb:.6g} MB cannot be met: the smallest plan in this search "
                f"space needs {smallest:.6g} MB. Raise 'memory_mb' to at least {smallest:.6g} or widen the space."
            )
    if latency_ms is not None:
        fastest = table.base_latency + sum(min(v.values()) for v in table.latency.values())
        if fastest > latency_ms:
            raise ValueError(
                f"The latency budget {latency_ms:.6g} ms cannot be met: the fastest plan in this search "
                f"space is predicted at {fastest:.6g} ms. Raise 'latency_ms' to at least {fastest:.6g} or widen the space."
            )


def _fingerprint(
    model: nn.Module, space: ResolvedSpace, objectives: Sequence[str], limits: Any, metric: str
) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(
            tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()
        )
    h.update(
        json.dumps(
            [space.params, space.choices, space.pinned, list(objectives), limits, metric],
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def _check_fingerprint(
    study: optuna.Study,
    fingerprint: str,
    space: ResolvedSpace,
    objectives: Sequence[str],
    limits: Any,
) -> None:
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    summary = {
        "params": space.choices,
        "pinned": space.pinned,
        "objectives": list(objectives),
        "limits": list(limits),
    }
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        study.set_user_attr("mpsearch_space", summary)
        return
    if stored != fingerprint:
        before = study.user_attrs.get("mpsearch_space", {})
        changed = [k for k in summary if before.get(k) != json.loads(json.dumps(summary[k]))] or [
            "model weights or metric"
        ]
        raise ValueError(
            f"The study {study.study_name!r} was made for another model, space or budget (changed: {', '.join(changed)}). "
            "Use a new study_name, or restore the original setup to resume it."
        )


def _default_storage(storage: Any, study_name: str) -> Any:
    if storage is not None:
        return storage
    folder = Path("studies")
    folder.mkdir(exist_ok=True)
    return f"sqlite:///{folder / study_name}.db"


class _Objective:
    def __init__(
        self,
        *,
        resolved: ResolvedSpace,
        table: ChoiceTable,
        cost: CostLike,
        limits: tuple[float | None, float | None],
        objectives: tuple[str, ...],
        runner: PlanRunner,
        quality_fn: Callable[[nn.Module], float],
        screen: _Screen | None,
        study: optuna.Study,
    ) -> None:
        self.resolved = resolved
        self.table = table
        self.cost = cost
        self.limits = limits
        self.objectives = objectives
        self.runner = runner
        self.quality_fn = quality_fn
        self.screen = screen
        self.study = study
        self.memo: dict[tuple[str, ...], float] = {}

    def _true_history(self) -> list[optuna.trial.FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
            )
            if t.user_attrs.get("quality_source") in ("true", "memo")
        ]

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        params = {
            p: trial.suggest_categorical(p, self.table.choices(p)) for p in self.resolved.params
        }
        assignment = self.resolved.assignment(params)
        memory_mb = self.cost.memory_bytes(assignment) / 1e6
        latency_ms = float(self.cost.latency_ms(assignment))
        proxy = self.table.totals(params)[0]
        trial.set_user_attr("plan", assignment)
        trial.set_user_attr("memory_mb", memory_mb)
        trial.set_user_attr("latency_ms", latency_ms)
        trial.set_user_attr("proxy_error", proxy)
        violations = []
        if self.limits[0] is not None:
            trial.set_constraint("memory", memory_mb - self.limits[0])
            violations.append(memory_mb - self.limits[0])
        if self.limits[1] is not None:
            trial.set_constraint("latency", latency_ms - self.limits[1])
            violations.append(latency_ms - self.limits[1])
        feasible = all(v <= 0 for v in violations)
        key = tuple(assignment.values())
        history = self._true_history()
        if key in self.memo:
            quality, source = self.memo[key], "memo"
        elif not feasible and len(self.objectives) == 1:
            quality, source = self._proxy_quality(proxy, history), "proxy"
        else:
            if (
                self.screen is not None
                and feasible
                and self._screened(proxy, memory_mb, latency_ms, history)
            ):
                trial.set_user_attr("pruned_reason", "proxy predicts a dominated plan")
                raise optuna.TrialPruned("proxy predicts a dominated plan")
            quality, source = self._evaluate(trial, assignment), "true"
            self.memo[key] = quality
        trial.set_user_attr("quality_source", source)
        values = {"quality": quality, "memory": memory_mb, "latency": latency_ms}
        out = tuple(values[o] for o in self.objectives)
        return out[0] if len(out) == 1 else out

    def _evaluate(self, trial: optuna.Trial, assignment: dict[str, str]) -> float:
        try:
            value = self.runner(assignment, self.quality_fn)
        except Exception as exc:  # recorded on the trial; the study goes on
            reason = f"evaluate raised {type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            raise EvaluationError(reason) from exc
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.floating))
            or not math.isfinite(value)
        ):
            reason = f"evaluate returned {value!r}; it must return a finite number"
            trial.set_user_attr("fail_reason", reason)
            raise EvaluationError(reason)
        return float(value)

    def _proxy_quality(self, proxy: float, history: list[optuna.trial.FrozenTrial]) -> float:
        fit = _Screen(min_points=2).predict(proxy, _pairs(history))
        if fit is not None:
            return fit[0]
        return -proxy

    def _screened(
        self,
        proxy: float,
        memory_mb: float,
        latency_ms: float,
        history: list[optuna.trial.FrozenTrial],
    ) -> bool:
        assert self.screen is not None
        fit = self.screen.predict(proxy, _pairs(history))
        if fit is None:
            return False
        optimistic = fit[0] + self.screen.margin_sigmas * fit[1] + 1e-9
        for t in history:
            if any(v > 0 for v in t.constraints.values()):
                continue
            q = t.values[0]
            mem, lat = t.user_attrs["memory_mb"], t.user_attrs["latency_ms"]
            cheaper = (mem <= memory_mb or "memory" not in self.objectives) and (
                lat <= latency_ms or "latency" not in self.objectives
            )
            if cheaper and q > optimistic:
                return True
        return False


def _pairs(history: list[optuna.trial.FrozenTrial]) -> list[tuple[float, float]]:
    return [(t.user_attrs["proxy_error"], t.values[0]) for t in history]
