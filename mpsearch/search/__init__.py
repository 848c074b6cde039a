"""Optuna search over per-layer schemes under budgets, with baselines and Pareto fronts."""

from mpsearch.search import baselines
from mpsearch.search._budget import Budget
from mpsearch.search._leases import LeasePolicy, sweep_expired
from mpsearch.search._pareto import hypervolume, pareto_mask
from mpsearch.search._quality import Fidelity, PlanRunner
from mpsearch.search._reseed import ReseededSampler
from mpsearch.search._result import SearchResult
from mpsearch.search._search import (
    SAMPLERS,
    EvaluationError,
    baseline_plans,
    make_sampler,
    search,
    warm_start_params,
)
from mpsearch.search._space import ResolvedSpace, SearchSpace, SpaceError, load_space, model_family
from mpsearch.search._storage import make_storage, safe_url, storage_kind
from mpsearch.search._table import ChoiceTable
from mpsearch.search._workers import WorkerPool, WorkerSpec, run_workers

__all__ = [
    "SAMPLERS",
    "Budget",
    "ChoiceTable",
    "EvaluationError",
    "Fidelity",
    "LeasePolicy",
    "PlanRunner",
    "ReseededSampler",
    "ResolvedSpace",
    "SearchResult",
    "SearchSpace",
    "SpaceError",
    "WorkerPool",
    "WorkerSpec",
    "baseline_plans",
    "baselines",
    "hypervolume",
    "load_space",
    "make_sampler",
    "make_storage",
    "model_family",
    "pareto_mask",
    "run_workers",
    "safe_url",
    "search",
    "storage_kind",
    "sweep_expired",
    "warm_start_params",
]
