"""A sampler whose random draws for trial ``k`` depend only on ``(seed, k)`` and the study.

Optuna's seeded samplers draw from one random stream started at construction, so a study
resumed in a new process (a fresh stream) proposes different trials from an uninterrupted
run. :class:`ReseededSampler` reseeds the wrapped sampler's random states from
``(seed, trial number)`` before each trial; everything else the samplers use (TPE's
densities, NSGA-II's generations) is read from the study, so a resumed run with one worker
proposes exactly the trials the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mpsearch.search._optuna_compat import is_random_state, random_state


def _random_states(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list[Any]:
    """The random states held by a sampler and its parts (nested samplers, strategies)."""
    seen = set() if seen is None else seen
    found: list[Any] = []
    if id(obj) in seen or depth > 3:
        return found
    seen.add(id(obj))
    if is_random_state(obj):
        return [obj]
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return found
    for name in sorted(attrs):
        value = attrs[name]
        if is_random_state(value) or (
            hasattr(value, "__dict__") and not isinstance(value, type) and depth < 3
        ):
            found += _random_states(value, depth + 1, seen)
    return found


class ReseededSampler(optuna.samplers.BaseSampler):
    """Wraps ``sampler`` and reseeds its random states from ``(seed, trial.number)`` per trial.

    >>> s = ReseededSampler(optuna.samplers.TPESampler(), seed=0)
    >>> optuna.create_study(sampler=s).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, *, seed: int) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self._states = _random_states(sampler)

    def _reseed(self, number: int) -> None:
        for k, state in enumerate(self._states):
            derived = int(np.random.SeedSequence([self.seed, number, k]).generate_state(1)[0])
            random_state(state).seed(derived)

    def reseed_rng(self) -> None:
        """Kept deterministic: draws already depend only on ``(seed, trial number)``."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._reseed(trial.number)
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.sampler.after_trial(study, trial, state, values)
