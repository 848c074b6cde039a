"""Resume: n_trials counts COMPLETE trials, warm starts are not repeated, the same trials come back."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pytest
from fake_search import SCHEMES, SENS, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import Budget, SearchSpace, search
from mpsearch.search._reseed import ReseededSampler

SPACE = SearchSpace(schemes=SCHEMES)


def _search(storage, **kwargs):
    options = dict(
        profile=FakeProfile(),
        cost=FakeCost(),
        evaluate=known_quality,
        space=SPACE,
        storage=storage,
        study_name="s",
        budget=Budget(memory_mb=0.03),
        seed=3,
    )
    options.update(kwargs)
    return search(fake_model(), **options)


def _sequence(study):
    return [(t.number, t.state.name, t.params, t.values) for t in study.get_trials()]


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_resumed_study_equals_uninterrupted_run(tmp_path, sampler) -> None:
    whole = _search(f"sqlite:///{tmp_path}/whole.db", n_trials=40, sampler=sampler)
    url = f"journal:///{tmp_path}/parts.log"
    part = _search(url, n_trials=7, sampler=sampler)  # stops inside the warm starts
    assert (part.trials["state"] == "COMPLETE").sum() == 7
    _search(url, n_trials=19, sampler=sampler, load_if_exists=True)
    resumed = _search(url, n_trials=40, sampler=sampler, load_if_exists=True)
    assert (resumed.trials["state"] == "COMPLETE").sum() == 40
    assert _sequence(resumed.study) == _sequence(whole.study)
    origins = Counter(resumed.trials["origin"])
    origins.pop("sampler")
    assert origins and max(origins.values()) == 1  # each warm start ran once


def test_n_trials_counts_complete_trials_and_failures_are_recorded(tmp_path) -> None:
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("CPU out of memory")
        if calls["n"] == 3:
            return "0.9"
        if calls["n"] == 4:
            return math.inf
        return known_quality(model)

    res = _search(f"sqlite:///{tmp_path}/s.db", evaluate=flaky, n_trials=8, screen=False)
    df = res.trials
    assert (df["state"] == "COMPLETE").sum() == 8
    assert list(df[df["state"] == "FAIL"]["reason"]) == [
        "evaluate raised MemoryError: CPU out of memory",
        "evaluate returned '0.9'; it must return a finite number",
        "evaluate returned inf; it must return a finite number",
    ]
    complete = res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert all(set(t.constraints) == {"memory"} for t in complete)


class _OtherProfile(FakeProfile):
    def error(self, layer, scheme, metric="e2e"):
        return SENS[layer][scheme] * (2 if layer == "3" else 1)


@pytest.mark.parametrize(
    ("change", "part"),
    [
        ({"profile": _OtherProfile()}, "profile"),
        ({"space": SearchSpace(schemes=["fp32", "bf16", "w8a8"])}, "search space"),
        ({"budget": Budget(memory_mb=0.04)}, "budget"),
        ({"metric": "other"}, "metric"),
    ],
)
def test_resuming_with_another_setup_is_refused_naming_the_change(tmp_path, change, part) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    _search(url, n_trials=3)
    calls = []

    def counted(model):
        calls.append(1)
        return known_quality(model)

    with pytest.raises(ValueError, match=rf"made for another setup \(changed: [^)]*\b{part}\b"):
        _search(url, n_trials=6, load_if_exists=True, evaluate=counted, **change)
    assert calls == []


def test_resuming_with_other_weights_is_refused(tmp_path) -> None:
    import torch

    url = f"sqlite:///{tmp_path}/s.db"
    _search(url, n_trials=3)
    model = fake_model()
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    with pytest.raises(ValueError, match=r"changed: model weights\)"):
        search(
            model,
            profile=FakeProfile(),
            cost=FakeCost(),
            evaluate=known_quality,
            space=SPACE,
            storage=url,
            study_name="s",
            budget=Budget(memory_mb=0.03),
            load_if_exists=True,
        )


def test_reseeded_sampler_draws_depend_on_seed_and_trial_number_only() -> None:
    def run(seed, n):
        study = optuna.create_study(
            sampler=ReseededSampler(optuna.samplers.TPESampler(n_startup_trials=4), seed=seed)
        )
        study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=n)
        return [t.params["x"] for t in study.trials]

    first = run(0, 12)
    assert run(0, 12) == first
    assert run(1, 12) != first
    assert len(set(first)) == 12  # a fresh draw for every trial, not one repeated
    # a new process continuing a study draws what the first one would have
    study = optuna.create_study(
        sampler=ReseededSampler(optuna.samplers.TPESampler(n_startup_trials=4), seed=0)
    )
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=5)
    study.sampler = ReseededSampler(optuna.samplers.TPESampler(n_startup_trials=4), seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=7)
    assert [t.params["x"] for t in study.trials] == first
