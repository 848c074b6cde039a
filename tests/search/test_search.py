from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from fake_search import (
    LAYERS,
    SCHEMES,
    FakeCost,
    FakeProfile,
    brute_force_best,
    fake_model,
    known_quality,
)

from mpsearch.search import Budget, SearchSpace, baselines, search
from mpsearch.search._leases import LOST_REASON, LeasePolicy, TrialLease, fail_trial
from mpsearch.search._optuna_compat import study_storage, trial_id
from mpsearch.search._pareto import pareto_mask
from mpsearch.search._table import ChoiceTable

SPACE = SearchSpace(schemes=SCHEMES)
MEMORY_MB = 0.02  # fp32 needs 0.065 MB, the smallest plan 0.0125 MB


def _search(tmp_path, **kwargs):
    options = dict(
        profile=FakeProfile(),
        cost=FakeCost(),
        evaluate=known_quality,
        space=SPACE,
        storage=f"sqlite:///{tmp_path}/s.db",
        seed=0,
    )
    options.update(kwargs)
    return search(fake_model(), **options)


def _table():
    return ChoiceTable.build(SPACE.resolve(fake_model()), FakeProfile(), FakeCost())


def test_ilp_equals_brute_force_optimum() -> None:
    for memory_mb in (0.015, MEMORY_MB, 0.03, 0.05):
        expected = brute_force_best(memory_mb=memory_mb)
        assert baselines.ilp_assignment(_table(), memory_bytes=memory_mb * 1e6) == expected
    expected = brute_force_best(latency_ms=0.9)
    assert baselines.ilp_assignment(_table(), latency_ms=0.9) == expected


class _NonFinite(FakeProfile):
    """Layer 0 in w4a16 gave a non-finite output (the profiler's error: inf)."""

    def error(self, layer: str, scheme: str, metric: str = "e2e") -> float:
        return math.inf if (layer, scheme) == ("0", "w4a16") else super().error(layer, scheme)


def test_a_choice_whose_output_was_not_finite_is_not_offered(tmp_path) -> None:
    """An inf error (a subnormal range's NaN) stopped the ILP warm start: ``c`` not finite."""
    table = ChoiceTable.build(SPACE.resolve(fake_model()), _NonFinite(), FakeCost())
    assert "w4a16" not in table.choices("0") and "w4a16" in table.choices("1")
    assert baselines.ilp_assignment(table, memory_bytes=0.015e6)["0"] != "w4a16"
    res = _search(tmp_path, profile=_NonFinite(), budget=Budget(memory_mb=0.015), n_trials=8)
    assert all(plan.resolve(LAYERS)["0"] != "w4a16" for plan in res.plans)


def test_search_finds_known_optimum_under_budget(tmp_path) -> None:
    res = _search(
        tmp_path, budget=Budget(memory_mb=MEMORY_MB), objectives=("quality",), n_trials=30
    )
    best = res.best()
    assert best.resolve(LAYERS) == brute_force_best(memory_mb=MEMORY_MB)
    assert best.metadata["quality"] == pytest.approx(known_quality_of(best.resolve(LAYERS)))


def test_sampler_alone_gets_near_the_optimum_without_warm_start(tmp_path) -> None:
    # TPE alone (no uniform/greedy/ILP warm starts) over 4**5 plans: within 0.015 of the
    # known optimal quality after 150 trials; the warm-started search finds it exactly (above).
    res = _search(
        tmp_path,
        budget=Budget(memory_mb=MEMORY_MB),
        objectives=("quality",),
        n_trials=150,
        warm_start=False,
        screen=False,
        seed=1,
    )
    optimum = known_quality_of(brute_force_best(memory_mb=MEMORY_MB))
    assert optimum - 0.015 <= res.best().metadata["quality"] <= optimum + 1e-12


def known_quality_of(assignment: dict[str, str]) -> float:
    from fake_search import SENS

    return 1.0 - sum(SENS[ly][s] for ly, s in assignment.items())


def test_pareto_front_is_non_dominated_and_covers_baselines(tmp_path) -> None:
    res = _search(tmp_path, n_trials=60)
    front = res.pareto
    pts = front[["quality", "memory_mb", "latency_ms"]].to_numpy()
    assert pareto_mask(pts, [True, False, False]).all()
    assert (np.diff(front["memory_mb"].to_numpy()) >= 0).all()
    cost = FakeCost()
    for params in baselines.uniform_assignments(_table()).values():
        q, m, lat = (
            known_quality_of(params),
            cost.memory_bytes(params) / 1e6,
            cost.latency_ms(params),
        )
        assert (
            (pts[:, 0] >= q - 1e-12) & (pts[:, 1] <= m + 1e-12) & (pts[:, 2] <= lat + 1e-12)
        ).any()
    assert res.hypervolume() > 0
    hist = res.hypervolume_history()
    assert hist["hypervolume"].is_monotonic_increasing
    assert hist["hypervolume"].iloc[-1] == pytest.approx(res.hypervolume())
    assert res.n_true_evaluations == len(hist)


def test_every_trial_records_all_constraints(tmp_path) -> None:
    res = _search(tmp_path, budget=Budget(memory_mb=0.03, latency_ms=0.9), n_trials=25)
    complete = res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert complete and all(set(t.constraints) == {"memory", "latency"} for t in complete)


def test_infeasible_budget_is_refused_with_smallest_value(tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"memory budget 0\.001 MB cannot be met: .* needs 0\.0125 MB"
    ):
        _search(tmp_path, budget=Budget(memory_mb=0.001))
    with pytest.raises(ValueError, match=r"latency budget 0\.1 ms cannot be met: .* at 0\.3875 ms"):
        _search(tmp_path, budget=Budget(latency_ms=0.1))
    with pytest.raises(ValueError, match=r"0\.0125 MB \((0\.\d+) of fp32's .*'memory_fraction' to"):
        _search(tmp_path, budget=Budget(memory_fraction=0.01))  # the fraction it would take
    assert not (tmp_path / "s.db").exists()


def test_failing_and_nan_evaluations_are_recorded_and_study_goes_on(tmp_path) -> None:
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        if calls["n"] == 3:
            return math.nan
        return known_quality(model)

    res = _search(tmp_path, evaluate=flaky, n_trials=10, screen=False)
    df = res.trials
    failed = df[df["state"] == "FAIL"]
    assert len(failed) == 2
    assert set(failed["reason"]) == {
        "evaluate raised RuntimeError: out of memory",
        "evaluate returned nan; it must return a finite number",
    }
    assert (df["state"] == "COMPLETE").sum() == 10


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="'objectives' option must be"):
        _search(tmp_path, objectives=("speed",))
    with pytest.raises(ValueError, match="'n_trials' option must be a positive integer"):
        _search(tmp_path, n_trials=0)
    with pytest.raises(ValueError, match="'memory_mb' argument must be a positive number. Got -3"):
        Budget(memory_mb=-3)
    with pytest.raises(ValueError, match="'sampler' option must be one of"):
        _search(tmp_path, sampler="cmaes-please")
    with pytest.raises(ValueError, match="'evaluate' argument must be a callable"):
        _search(tmp_path, evaluate=None)


def test_seeded_runs_are_reproducible(tmp_path) -> None:
    a = _search(tmp_path / "a", n_trials=30, budget=Budget(memory_mb=0.03))
    b = _search(tmp_path / "b", n_trials=30, budget=Budget(memory_mb=0.03))
    assert list(a.trials["assignment"]) == list(b.trials["assignment"])


def test_lease_notices_a_sweep_that_happened_since_its_last_renewal(tmp_path) -> None:
    """Under load a lease can lapse between two renewals and another worker's sweep fail the
    trial; the lease must report it as lost on exit, so the worker goes on instead of dying
    on Optuna's "Cannot tell a FAIL trial"."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    trial = study.ask()
    with TrialLease(study, trial, LeasePolicy(lease_s=600.0)) as lease:
        study_storage(study).set_trial_state_values(trial_id(trial), optuna.trial.TrialState.FAIL)
    assert lease.lost
    trial = study.ask()
    with TrialLease(study, trial, LeasePolicy(lease_s=600.0)) as lease:
        pass
    assert not lease.lost


def test_a_trial_swept_between_its_objective_and_its_tell_is_retried(tmp_path, monkeypatch) -> None:
    """Another worker's sweep can fail a trial after its objective returned and before Optuna
    tells its values (Optuna then raises over "Cannot tell a FAIL trial"): the search goes on
    and the sweep's retry runs the plan again."""
    original_exit = TrialLease.__exit__
    swept: list[int] = []

    def exit_then_swept(self, *exc) -> None:
        original_exit(self, *exc)
        if not swept:
            swept.append(self.number)
            frozen = self.storage.get_trial(self.trial_id)
            fail_trial(self.study, frozen, self.policy, reason=LOST_REASON)

    monkeypatch.setattr(TrialLease, "__exit__", exit_then_swept)
    res = _search(tmp_path, n_trials=6)
    trials = res.study.get_trials()
    lost = trials[swept[0]]
    assert lost.state == optuna.trial.TrialState.FAIL
    assert lost.user_attrs["fail_reason"] == LOST_REASON
    retries = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert [t.params or t.system_attrs["fixed_params"] for t in retries] == [lost.params]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 6
