"""``search``: Optuna over per-layer schemes, warm-started by baselines, screened by a proxy."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from mpsearch._data import as_batches, run_model
from mpsearch._validation import InvalidTypeError, invalid
from mpsearch.search import baselines
from mpsearch.search._budget import Budget, as_budget
from mpsearch.search._fingerprint import check_fingerprint, fingerprint_parts
from mpsearch.search._leases import (
    SIGTERM_REASON,
    LeasePolicy,
    Terminated,
    TrialLease,
    next_expiry,
    retry_params,
    sigterm_handler,
    sweep_expired,
    worker_id,
)
from mpsearch.search._options import OBJECTIVES, SearchOptions, resolve_options
from mpsearch.search._optuna_compat import study_storage, told_finished_trial, trial_id
from mpsearch.search._quality import Fidelity, PlanRunner, quality_value
from mpsearch.search._realcheck import verify_front
from mpsearch.search._result import SearchResult, warn_about
from mpsearch.search._samplers import SAMPLERS, make_sampler
from mpsearch.search._space import ResolvedSpace
from mpsearch.search._storage import make_storage, safe_url
from mpsearch.search._table import ChoiceTable, CostLike, ProfileLike, resolve_space

__all__ = ["OBJECTIVES", "SAMPLERS", "EvaluationError", "make_sampler", "search"]

WARM_STARTED_ATTR = "mpsearch_warm_started"
BUDGET_REASON = "study budget reached"
SEARCH_KEYWORDS = (
    "model",
    "profile",
    "cost",
    "evaluate",
    "eval_data",
    "example_input",
    "budget",
    "n_trials",
    "storage",
    "study_name",
    "options",
)
_logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """``evaluate`` raised or returned a non-finite value: the trial fails, the study goes on."""


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
    example_input: Any = None,
    budget: Budget | Mapping[str, float] | None = None,
    n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    options: SearchOptions | None = None,
    **overrides: Any,
) -> SearchResult:
    """Search per-layer schemes; return the Pareto front of quality × memory × latency.

    Quality is ``evaluate(model)`` (higher is better) or, without it, :class:`Fidelity` to the
    fp32 model on ``eval_data`` (``1 - MSE / Var`` where the profile's metric was ``"mse"``,
    else arg-max agreement on class scores); memory (exact) and latency (predicted) come from
    ``cost``.
    ``budget`` limits become Optuna constraints (every trial records all of them). How the
    search runs is :class:`SearchOptions` (``options``); ``n_trials``, ``storage``,
    ``study_name`` and any other option given as a keyword (``sampler="nsga2"``,
    ``objectives=("quality",)``, ``seed=1``...) override it, and an unknown keyword raises
    ``TypeError`` listing the accepted ones. Every option is checked before any work.

    The space (``space``; default: the model family's bundled one) is narrowed to the schemes
    the profile and the cost model have figures for. With ``objectives=("quality",)`` the
    search maximises quality under the budget; otherwise it returns the whole front. Each of
    the result's ``warnings`` (e.g. its best plan slower than fp32) is issued as a
    ``UserWarning``. After the trials, the ``verify`` front plans :meth:`SearchResult.best`
    ranks first are run for real on the backend ``cost`` was measured on (quality by
    ``evaluate`` on ``quantize(model, plan, backend=cost.backend)``, latency end to end next to
    the fp32 model): ``res.verified`` and the front's ``real_*`` columns hold the figures, and
    ``best`` ranks by them. Warm starts (uniform, greedy, ILP plans) are enqueued first,
    once per study; with ``screen`` a candidate whose proxy-predicted quality (calibrated on
    true evaluations) is clearly dominated is pruned before its true evaluation.

    Persistence: without ``storage`` the study lives in memory, for this call only: nothing
    is written, and calling again (re-running a notebook cell) starts a fresh study. With a
    ``storage`` (see :func:`make_storage`) the study is kept; creating one under a name the
    storage already holds is refused, saying how to resume it or rename it. ``n_trials`` is the
    study's total of COMPLETE trials, whoever ran them, so ``load_if_exists=True`` resumes a
    study up to it and several processes (see :func:`run_workers`) or machines sharing
    ``storage`` (a journal file or PostgreSQL) split it. A study made for another model,
    profile, cost, schemes, space or budget is refused. Each running trial holds a lease (``lease``); a trial whose
    worker died is failed within ``lease.lease_s`` and retried ``lease.max_retry`` times. On
    SIGTERM (``handle_sigterm``) the running trial is failed with reason ``"SIGTERM"``,
    retried, and the process exits with status 143. The model is first run once on
    ``example_input`` (or the first ``eval_data`` batch), and a failure is refused up front.

    >>> res = search(model, profile=prof, cost=cost, eval_data=held_out,
    ...              budget=Budget(memory_fraction=0.3), n_trials=60)   # doctest: +SKIP
    >>> opts = SearchOptions(n_trials=60, sampler="nsga2", seed=1)
    >>> res = search(model, profile=prof, cost=cost, eval_data=held_out,
    ...              options=opts, study_name="digits")                 # doctest: +SKIP
    >>> res.best().resolve(model)                                        # doctest: +SKIP
    """
    opts = resolve_options(
        options,
        {"n_trials": n_trials, "storage": storage, "study_name": study_name, **overrides},
        verb="search",
        also=SEARCH_KEYWORDS,
    )
    prepared = _prepare(
        model,
        profile=profile,
        cost=cost,
        evaluate=evaluate,
        eval_data=eval_data,
        example_input=example_input,
        budget=budget,
        options=opts,
    )
    started = time.perf_counter()
    prepared.drive(
        timeout=opts.timeout,
        n_jobs=opts.n_jobs,
        show_progress_bar=opts.show_progress_bar,
        handle_sigterm=opts.handle_sigterm,
    )
    return warn_about(prepared.result(wall_time_s=time.perf_counter() - started))


@dataclass
class _Prepared:
    """A study ready to run: created or loaded, checked, warm-started; and its objective."""

    study: optuna.Study
    objective: _Objective
    resolved: ResolvedSpace
    table: ChoiceTable
    objectives: tuple[str, ...]
    limits: tuple[float | None, float | None]
    cost: CostLike
    n_trials: int
    policy: LeasePolicy
    verify: int | None = None

    def result(self, *, wall_time_s: float = 0.0) -> SearchResult:
        """The study's :class:`SearchResult`, its front first checked on the real backend
        (the ``verify`` plans :meth:`SearchResult.best` ranks first; see
        :func:`~mpsearch.search._realcheck.verify_front`): quality by the search's ``evaluate``
        (or fidelity) on ``quantize(model, plan, backend=cost.backend)``, latency end to end on
        the example input, timed as the cost model times, next to the fp32 model. No check
        without ``verify``, without a front, or for a cost model with no real backend."""
        result = SearchResult(
            study=self.study,
            space=self.resolved,
            table=self.table,
            objectives=self.objectives,
            limits=self.limits,
            fp32_memory_mb=self.cost.fp32_memory_bytes / 1e6,
            fp32_latency_ms=self.cost.fp32_latency_ms,
            wall_time_s=wall_time_s,
        )
        backend = getattr(self.cost, "backend", None)
        if getattr(backend, "choices", None):
            result.kernels = {"backend": backend.name, "choices": dict(backend.choices)}
        if self.verify and getattr(backend, "real", False) and len(result.pareto):
            verify_front(
                self.study,
                result.candidates(self.verify),
                model=self.objective.runner.model,
                backend=backend,
                evaluate=self.objective.quality_fn,
                time_module=self.cost.time_module,
                rounder=self.objective.runner.rounder,
            )
        return result

    def drive(
        self,
        *,
        timeout: float | None = None,
        n_jobs: int = 1,
        show_progress_bar: bool = False,
        handle_sigterm: bool = True,
    ) -> None:
        """Run trials until the study holds ``n_trials`` COMPLETE ones (counting every worker's).

        Before each round, expired leases are swept; while the running trials of other
        workers could fill the budget, this one waits for them (or for their leases to expire).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        guard = sigterm_handler() if handle_sigterm else contextlib.nullcontext()
        with guard:
            try:
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    free = self._free_slots(remaining)
                    if free is None:
                        return
                    if free <= 0:  # others' running trials may fill the budget: wait for them
                        self._wait_for_others(remaining)
                        continue
                    self._optimize(free, remaining, n_jobs, show_progress_bar)
            except KeyboardInterrupt as exc:
                for frozen in self.objective.interrupted:
                    retry_params(
                        self.study, frozen, self.policy, reason=self.objective.interrupt_reason
                    )
                if isinstance(exc, Terminated):
                    raise SystemExit(143) from None
                raise

    def _free_slots(self, remaining: float | None) -> int | None:
        """Trials this round may start (``<= 0``: wait), or ``None`` when the run is over."""
        sweep_expired(self.study, self.policy)
        trials = self.study.get_trials(deepcopy=False)
        complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if complete >= self.n_trials or (remaining is not None and remaining <= 0):
            return None
        if self.objective.n_failed >= max(self.n_trials, 10):
            _logger.warning(
                "Stopping: %d trials failed in this process (see their fail_reason).",
                self.objective.n_failed,
            )
            return None
        return self.n_trials - complete - running

    def _wait_for_others(self, remaining: float | None) -> None:
        expiry = next_expiry(self.study, self.policy)
        renew = self.policy.renew_s
        pause = renew if expiry is None else expiry - time.time() + 0.05
        pause = min(max(pause, 0.05), renew, 1.0)
        time.sleep(pause if remaining is None else min(pause, remaining))

    def _optimize(
        self, free: int, remaining: float | None, n_jobs: int, show_progress_bar: bool
    ) -> None:
        complete = (optuna.trial.TrialState.COMPLETE,)
        try:
            self.study.optimize(
                self.objective,
                n_trials=free,
                timeout=remaining,
                n_jobs=n_jobs,
                catch=(EvaluationError,),
                callbacks=[optuna.study.MaxTrialsCallback(self.n_trials, states=complete)],
                show_progress_bar=show_progress_bar,
            )
        except (ValueError, AssertionError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            # our trial was failed by another worker's sweep (our lease lapsed, maybe between
            # the objective's return and Optuna's tell): the sweep retries it; go on
            if not told_finished_trial(exc):
                raise
            _logger.warning("Lost the lease of a trial; going on: %s", exc)
            self.objective.lost_lease = False


def _prepare(
    model: nn.Module,
    *,
    profile: ProfileLike,
    cost: CostLike,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_data: Iterable[Any] | None = None,
    example_input: Any = None,
    budget: Budget | Mapping[str, float] | None = None,
    options: SearchOptions | None = None,
    workers: int = 1,
) -> _Prepared:
    """Check every input, open the storage, create or load the study, enqueue warm starts."""
    options = options or SearchOptions()
    if options.storage is None and options.load_if_exists:
        raise invalid(
            "load_if_exists",
            True,
            "False without a 'storage': without one the study lives in memory for this call "
            "only, so there is nothing to resume. Pass storage='sqlite:///studies/<name>.db' "
            "(and a study_name) to keep a study and resume it",
            kind="option",
        )
    budget = as_budget(budget)
    eval_batches = _check_inputs(model, evaluate, eval_data, example_input)
    resolved = resolve_space(options.space, model, profile=profile, cost=cost)
    table = ChoiceTable.build(resolved, profile, cost, metric=options.metric)
    limits = budget.limits(
        fp32_memory_mb=cost.fp32_memory_bytes / 1e6, fp32_latency_ms=cost.fp32_latency_ms
    )
    _check_feasible(table, limits, fp32=(cost.fp32_memory_bytes / 1e6, cost.fp32_latency_ms))
    study = _open_study(model, resolved, table, limits, options, workers=workers)
    if options.warm_start:
        _warm_start(study, table, limits)
    policy = options.lease_policy
    objective = _Objective(
        resolved=resolved,
        table=table,
        cost=cost,
        limits=limits,
        objectives=options.objectives,
        runner=PlanRunner(
            model, backend=options.quality_backend, rounder=getattr(profile, "rounder", None)
        ),
        quality_fn=evaluate
        if evaluate is not None
        else Fidelity(model, eval_batches, metric=getattr(profile, "e2e_metric", None)),
        screen=_Screen() if options.screen else None,
        study=study,
        n_trials=options.n_trials,
        policy=policy,
    )
    return _Prepared(
        study=study,
        objective=objective,
        resolved=resolved,
        table=table,
        objectives=options.objectives,
        limits=limits,
        cost=cost,
        n_trials=options.n_trials,
        policy=policy,
        verify=options.verify,
    )


def _check_inputs(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float] | None,
    eval_data: Iterable[Any] | None,
    example_input: Any,
) -> list[Any] | None:
    """Refuse a non-module, a missing or non-callable ``evaluate``, a model that fails to run;
    return the evaluation batches (``None`` without ``eval_data``)."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    if evaluate is None and eval_data is None:
        raise invalid(
            "evaluate",
            None,
            "a callable(model) -> float, or pass 'eval_data' for the default fidelity",
        )
    if evaluate is not None and not callable(evaluate):
        raise invalid("evaluate", evaluate, "a callable(model) -> float")
    model.eval()
    eval_batches = None if eval_data is None else as_batches(eval_data, argument="eval_data")
    _check_model_runs(model, example_input, eval_batches)
    return eval_batches


def _open_study(
    model: nn.Module,
    resolved: ResolvedSpace,
    table: ChoiceTable,
    limits: tuple[float | None, float | None],
    options: SearchOptions,
    *,
    workers: int = 1,
) -> optuna.Study:
    """Create (or, with ``load_if_exists``, load and check) the study in its storage; without
    one, a fresh study in memory."""
    objectives = options.objectives
    parts = fingerprint_parts(model, resolved, table, objectives, limits, options.metric)
    name = options.study_name or (
        f"mpsearch-{type(model).__name__.lower()}-{parts['model weights'][:8]}"
    )
    url = options.storage
    storage = (
        optuna.storages.InMemoryStorage() if url is None else make_storage(url, workers=workers)
    )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=make_sampler(options.sampler, seed=options.seed, n_objectives=len(objectives)),
            directions=[OBJECTIVES[o] for o in objectives],
            load_if_exists=options.load_if_exists,
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise ValueError(
            f"The storage {safe_url(url)!r} already holds a study named {name!r}. Resume it "
            "(load_if_exists=True; on the command line `--resume`) or start a new one under "
            f"another name (study_name='{name}-2'; on the command line `--study-name`)."
        ) from None
    check_fingerprint(study, parts, resolved, objectives, limits)
    if len(objectives) > 1 and not study.metric_names:
        study.set_metric_names(list(objectives))
    return study


def _warm_start(
    study: optuna.Study, table: ChoiceTable, limits: tuple[float | None, float | None]
) -> None:
    """Enqueue the baselines' plans, once per study (whichever worker gets there first)."""
    if study.user_attrs.get(WARM_STARTED_ATTR):
        return
    for origin, params in warm_start_params(table, limits).items():
        study.enqueue_trial(params, user_attrs={"origin": origin}, skip_if_exists=True)
    study.set_user_attr(WARM_STARTED_ATTR, worker_id())


def _check_model_runs(model: nn.Module, example_input: Any, eval_batches: list[Any] | None) -> None:
    """Run the fp32 model once on the example input (or first eval batch); refuse it if it fails."""
    if example_input is not None:
        probe, what = example_input, "'example_input'"
    elif eval_batches:
        probe, what = eval_batches[0], "the first 'eval_data' batch"
    else:
        return
    try:
        with torch.inference_mode():
            run_model(model, probe)
    except Exception as exc:
        raise ValueError(
            f"The model fails on {what} before any quantization ({type(exc).__name__}: {exc}). "
            "Fix the model or the input (shape, dtype, device) before searching."
        ) from exc


def baseline_plans(
    table: ChoiceTable,
    limits: tuple[float | None, float | None],
    *,
    n_greedy: int = 8,
    n_ilp: int = 6,
) -> dict[str, dict[str, str]]:
    """Every plan the baselines propose, by origin (``uniform:<scheme>``, ``greedy:<i>``,
    ``greedy:budget``, ``ilp:budget``, ``ilp:<level>MB``), duplicates across origins kept.

    ILP plans are solved at the budget and at ``n_ilp`` memory levels spread between the
    smallest and the largest plan (so the front is seeded across its whole range).

    >>> sorted({o.split(":")[0] for o in baseline_plans(table, (None, None))})  # doctest: +SKIP
    ['greedy', 'ilp', 'uniform']
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
    return out


def warm_start_params(
    table: ChoiceTable,
    limits: tuple[float | None, float | None],
    *,
    n_greedy: int = 8,
    n_ilp: int = 6,
) -> dict[str, dict[str, str]]:
    """Warm-start parameter sets by origin: :func:`baseline_plans`, each plan once (under the
    first origin that proposed it)."""
    out = baseline_plans(table, limits, n_greedy=n_greedy, n_ilp=n_ilp)
    unique: dict[tuple[str, ...], str] = {}
    for origin, params in out.items():
        unique.setdefault(tuple(params[p] for p in table.error), origin)
    return {origin: out[origin] for origin in unique.values()}


def _memory_range(table: ChoiceTable) -> tuple[float, float]:
    lo = table.base_memory + sum(min(m.values()) for m in table.memory.values())
    hi = table.base_memory + sum(max(m.values()) for m in table.memory.values())
    return lo, hi


def _check_feasible(
    table: ChoiceTable, limits: tuple[float | None, float | None], *, fp32: tuple[float, float]
) -> None:
    """Refuses a budget no plan of ``table`` meets, saying what would (in MB or ms, and as
    the fraction of fp32's ``fp32`` (MB, ms) a ``memory_fraction``/``latency_fraction`` takes)."""
    memory_mb, latency_ms = limits
    fastest = table.base_latency + sum(min(v.values()) for v in table.latency.values())
    for kind, limit, best, what, least, unit, base in (
        ("memory", memory_mb, "smallest", "needs", _memory_range(table)[0] / 1e6, "MB", fp32[0]),
        ("latency", latency_ms, "fastest", "is predicted at", fastest, "ms", fp32[1]),
    ):
        if limit is not None and least > limit:
            raise ValueError(
                f"The {kind} budget {limit:.6g} {unit} cannot be met: the {best} plan in this "
                f"search space {what} {least:.6g} {unit} ({least / base:.3g} of fp32's "
                f"{base:.6g} {unit}). Raise '{kind}_{unit.lower()}' to at least {least:.6g} (or "
                f"'{kind}_fraction' to at least {math.ceil(least / base * 1000) / 1000:.3g}), "
                "or widen the space."
            )


def _budget_full(trials: list[optuna.trial.FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether the COMPLETE trials and the live ones ahead of trial ``number`` fill ``n_trials``.

    Ahead means a smaller trial number: the storage hands numbers out in the order trials are
    written, so every trial ahead of this one is already visible to it, and among workers racing
    for the last slots exactly the first ones run. (Start times, taken from each process's clock
    before the write, can disagree with that order: two workers then both saw themselves first.)
    Enqueued WAITING trials ahead count too: they will run before the study is done.

    >>> from optuna.trial import TrialState, create_trial
    >>> done = create_trial(state=TrialState.COMPLETE, value=1.0)
    >>> _budget_full([done], 1, 2), _budget_full([done], 1, 1)
    (False, True)
    """
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    complete = ahead = 0
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            complete += 1
        elif t.state in live and t.number < number:
            ahead += 1
    return complete + ahead >= n_trials


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
        n_trials: int = 100,
        policy: LeasePolicy | None = None,
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
        self.n_trials = n_trials
        self.policy = policy or LeasePolicy()
        self.memo: dict[tuple[str, ...], float] = {}
        self.n_failed = 0
        self.lost_lease = False
        self.interrupted: list[optuna.trial.FrozenTrial] = []
        self.interrupt_reason = SIGTERM_REASON

    def _true_history(self) -> list[optuna.trial.FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
            )
            if t.user_attrs.get("quality_source") in ("true", "memo")
        ]

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        lease = TrialLease(self.study, trial, self.policy)
        try:
            with lease:
                try:
                    self._claim_slot(trial)
                    return self._run(trial)
                except KeyboardInterrupt as exc:  # SIGTERM or Ctrl-C: Optuna fails the trial
                    self._interrupted(trial, exc)
                    raise
        finally:  # after the lease's exit, which also notices a sweep since its last renewal
            self.lost_lease = self.lost_lease or lease.lost

    def _interrupted(self, trial: optuna.Trial, exc: KeyboardInterrupt) -> None:
        self.interrupt_reason = SIGTERM_REASON if isinstance(exc, Terminated) else "interrupted"
        with contextlib.suppress(Exception):
            trial.set_user_attr("fail_reason", self.interrupt_reason)
        self.interrupted.append(study_storage(self.study).get_trial(trial_id(trial)))

    def _claim_slot(self, trial: optuna.Trial) -> None:
        """Prune this trial if the COMPLETE trials and the ones ahead of it fill the budget
        (:func:`_budget_full`): the study never exceeds ``n_trials`` COMPLETE trials."""
        sweep_expired(self.study, self.policy)
        if _budget_full(self.study.get_trials(deepcopy=False), trial.number, self.n_trials):
            self.study.stop()
            trial.set_user_attr("pruned_reason", BUDGET_REASON)
            raise optuna.TrialPruned(BUDGET_REASON)

    def _run(self, trial: optuna.Trial) -> float | tuple[float, ...]:
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
        for t in history:  # every worker's (and every earlier run's) true evaluations
            self.memo.setdefault(tuple(t.user_attrs["plan"].values()), t.values[0])
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
            self.n_failed += 1
            trial.set_user_attr("fail_reason", reason)
            raise EvaluationError(reason) from exc
        try:
            return quality_value(value)
        except ValueError as exc:
            self.n_failed += 1
            trial.set_user_attr("fail_reason", str(exc))
            raise EvaluationError(str(exc)) from None

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
