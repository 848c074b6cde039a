"""Optuna search over per-layer schemes under budgets, with baselines and Pareto fronts."""

from mpsearch.search import baselines
from mpsearch.search._budget import Budget
from mpsearch.search._pareto import hypervolume, pareto_mask
from mpsearch.search._quality import Fidelity, PlanRunner
from mpsearch.search._result import SearchResult
from mpsearch.search._search import (
    SAMPLERS,
    EvaluationError,
    make_sampler,
    search,
    warm_start_params,
)
from mpsearch.search._space import ResolvedSpace, SearchSpace, SpaceError, load_space, model_family
from mpsearch.search._table import ChoiceTable

__all__ = [
    "SAMPLERS",
    "Budget",
    "ChoiceTable",
    "EvaluationError",
    "Fidelity",
    "PlanRunner",
    "ResolvedSpace",
    "SearchResult",
    "SearchSpace",
    "SpaceError",
    "baselines",
    "hypervolume",
    "load_space",
    "make_sampler",
    "model_family",
    "pareto_mask",
    "search",
    "warm_start_params",
]
