"""Optuna search over per-layer schemes under budgets, with baselines and Pareto fronts.

What a user calls; the parts behind them (choice tables, samplers, leases, storages, the
objective) live in this package's private modules.
"""

from mpsearch.search import baselines
from mpsearch.search._budget import Budget
from mpsearch.search._options import SearchOptions
from mpsearch.search._pareto import hypervolume
from mpsearch.search._result import SearchResult
from mpsearch.search._search import search
from mpsearch.search._space import SearchSpace, SpaceError, load_space
from mpsearch.search._storage import make_storage
from mpsearch.search._workers import WorkerPool, WorkerSpec, run_workers

__all__ = [
    "Budget",
    "SearchOptions",
    "SearchResult",
    "SearchSpace",
    "SpaceError",
    "WorkerPool",
    "WorkerSpec",
    "baselines",
    "hypervolume",
    "load_space",
    "make_storage",
    "run_workers",
    "search",
]
