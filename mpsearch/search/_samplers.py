"""Samplers by registry name (``tpe``, ``nsga2``, ``random``), reseeded per trial when seeded."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from mpsearch._validation import unknown
from mpsearch.search._reseed import ReseededSampler

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
    """A sampler from its registry name (``tpe``, ``nsga2``, ``random``) or any Optuna sampler.

    A named sampler with a ``seed`` draws trial ``k`` from ``(seed, k)`` and the study only
    (:class:`ReseededSampler`), so a resumed study proposes what an uninterrupted one would.

    >>> type(make_sampler("random", seed=0, n_objectives=1)).__name__
    'ReseededSampler'
    """
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler not in SAMPLERS:
        raise unknown("sampler", sampler, SAMPLERS)
    made = SAMPLERS[sampler](seed, n_objectives)
    return made if seed is None else ReseededSampler(made, seed=seed)
