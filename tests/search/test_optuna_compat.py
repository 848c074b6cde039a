"""Optuna's private API, as mpsearch uses it (all in mpsearch/search/_optuna_compat.py).

Each test fails loudly when an Optuna release moves or changes a private name or behaviour
that the search relies on; pyproject.toml bounds Optuna to the versions checked here.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import optuna
import pytest

from mpsearch.search import _optuna_compat as compat
from mpsearch.search._reseed import ReseededSampler, _random_states

ROOT = Path(__file__).resolve().parents[2]
PRIVATE = re.compile(
    r"optuna(\.\w+)*\._\w+|(?<!mpsearch\.search)\._storage\b|\._trial_id\b|\._study_id\b"
    r"|_lazy_random_state"
)


def test_the_installed_optuna_is_a_checked_version_and_pyproject_bounds_it() -> None:
    major_minor = ".".join(optuna.__version__.split(".")[:2])
    assert major_minor in compat.TESTED_OPTUNA, (
        f"Optuna {optuna.__version__} is not among the checked versions {compat.TESTED_OPTUNA}: "
        "run this file, then widen TESTED_OPTUNA and the bound in pyproject.toml"
    )
    pin = re.search(r'"optuna>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must bound optuna above (private API in use)"
    low, high = (tuple(int(p) for p in v.split(".")) for v in pin.groups())
    for version in compat.TESTED_OPTUNA:
        assert low <= tuple(int(p) for p in version.split(".")) < high


def test_no_module_but_the_compat_one_touches_optuna_privates() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "mpsearch").rglob("*.py"))
        if path.name != "_optuna_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not offenders, offenders


def test_study_storage_and_trial_ids_address_the_same_trials() -> None:
    study = optuna.create_study()
    trial = study.ask()
    storage = compat.study_storage(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert storage.get_trial(compat.trial_id(trial)).number == trial.number
    storage.set_trial_system_attr(compat.trial_id(trial), "probe", 1)
    frozen = study.get_trials(deepcopy=False)[0]
    assert compat.trial_id(frozen) == compat.trial_id(trial)
    assert frozen.system_attrs["probe"] == 1


def test_compute_hypervolume_matches_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    loss = rng.uniform(0, 1, size=(6, 3))
    ref = np.array([1.0, 1.0, 1.0])
    exact = compat.compute_hypervolume(loss, ref)
    grid = (np.arange(40) + 0.5) / 40  # cell centres of a 40^3 grid over the unit cube
    cells = np.array(list(itertools.product(grid, grid, grid)))
    dominated = (cells[:, None, :] >= loss[None, :, :]).all(-1).any(-1)
    assert exact == pytest.approx(dominated.mean(), abs=0.02)
    assert compat.compute_hypervolume(np.array([[1.0, 1.0]]), np.array([2.0, 3.0])) == 2.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: optuna.samplers.TPESampler(seed=1),
        lambda: optuna.samplers.RandomSampler(seed=1),
        lambda: optuna.samplers.NSGAIISampler(seed=1),
    ],
)
def test_samplers_hold_random_states_that_reseeding_controls(make) -> None:
    sampler = make()
    states = _random_states(sampler)
    assert states, f"{type(sampler).__name__} holds no random state the reseeding can find"
    for state in states:
        assert compat.is_random_state(state)
        rng = compat.random_state(state)
        assert isinstance(rng, np.random.RandomState)
        rng.seed(5)
        first = rng.random_sample(3)
        rng.seed(5)
        np.testing.assert_array_equal(first, compat.random_state(state).random_sample(3))


def test_reseeded_random_sampler_depends_on_seed_and_number_only() -> None:
    def draws(seed: int) -> list[float]:
        study = optuna.create_study(
            sampler=ReseededSampler(optuna.samplers.RandomSampler(), seed=seed)
        )
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
        return [t.params["x"] for t in study.trials]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_optimize_on_a_trial_failed_meanwhile_is_recognised() -> None:
    """What ``Study.optimize`` raises when another worker's sweep failed the running trial."""
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        compat.study_storage(study).set_trial_state_values(
            compat.trial_id(trial), optuna.trial.TrialState.FAIL
        )
        return 1.0

    with pytest.raises(Exception) as info:
        study.optimize(objective, n_trials=1)
    assert compat.told_finished_trial(info.value), repr(info.value)
    assert not compat.told_finished_trial(ValueError("something else"))
    assert not compat.told_finished_trial(AssertionError("a real bug"))
