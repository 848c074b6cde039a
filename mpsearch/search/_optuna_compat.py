"""Every use of Optuna's private API, in one place (checked by ``tests/search/test_optuna_compat.py``).

Optuna has no public equivalent for these; ``pyproject.toml`` bounds Optuna to the versions
checked (:data:`TESTED_OPTUNA`), and the test fails loudly when a name moves or changes:

- :func:`study_storage` / :func:`trial_id`: the storage behind a study and a trial's storage
  id, to renew leases and fail another worker's trial (``Study._storage``,
  ``Trial._trial_id``, ``FrozenTrial._trial_id``);
- :func:`compute_hypervolume`: Optuna's exact WFG hypervolume (``optuna._hypervolume``);
- :func:`random_state`: the NumPy random state behind a sampler's lazy one
  (``optuna.samplers._lazy_random_state.LazyRandomState``), to reseed per trial;
- :func:`told_finished_trial`: recognises what ``Study.optimize`` raises when the trial it ran
  was failed meanwhile by another worker's sweep (a behaviour, not a name: Optuna 5 raises
  ``AssertionError("Should not reach.")`` from a ``finally`` over the ``ValueError``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume as _compute_hypervolume
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial

TESTED_OPTUNA = ("5.0", "5.1")  # the minor versions whose private API was checked


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (the one its trials' ids belong to)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage id of a trial (unique in the storage, unlike its number within a study)."""
    return trial._trial_id


def compute_hypervolume(loss: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of ``loss`` rows (every objective minimised) bounded by ``reference``.

    >>> compute_hypervolume(np.array([[1.0, 1.0]]), np.array([2.0, 3.0]))
    2.0
    """
    return float(_compute_hypervolume(loss, reference))


def is_random_state(obj: Any) -> bool:
    """Whether ``obj`` is a random state a sampler draws from (NumPy's or Optuna's lazy one)."""
    return isinstance(obj, (LazyRandomState, np.random.RandomState))


def random_state(obj: Any) -> np.random.RandomState:
    """The NumPy random state behind ``obj`` (itself, or the one a lazy state wraps)."""
    return obj.rng if isinstance(obj, LazyRandomState) else obj


def told_finished_trial(exc: BaseException) -> bool:
    """Whether ``exc``, raised by ``Study.optimize``, says the trial it ran had already been
    finished by someone else: ``UpdateFinishedTrialError``, ``ValueError("Cannot tell a FAIL
    trial.")``, or Optuna 5's ``AssertionError("Should not reach.")`` raised over the latter.

    >>> told_finished_trial(ValueError("Cannot tell a FAIL trial.")), told_finished_trial(ValueError("x"))
    (True, False)
    """
    seen: BaseException | None = exc
    for _ in range(3):
        if isinstance(seen, UpdateFinishedTrialError):
            return True
        if isinstance(seen, ValueError):
            return "Cannot tell" in str(seen)
        if not isinstance(seen, AssertionError):
            return False
        seen = seen.__context__
    return False
