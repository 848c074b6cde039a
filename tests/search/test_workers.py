"""Real worker processes on one study: budget, kills, SIGTERM, journal file and PostgreSQL."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import Budget, SearchSpace
from mpsearch.search._leases import LOST_REASON, SIGTERM_REASON, WORKER_ATTR, LeasePolicy
from mpsearch.search._storage import make_storage
from mpsearch.search._workers import WorkerPool, WorkerSpec, run_workers

FACTORY = f"{__file__}:make_setup"
ROOT = Path(__file__).resolve().parents[2]


def make_setup(delay: float = 0.0, marker_dir: str | None = None) -> dict:
    """The fake search, with an evaluate that takes ``delay`` s and leaves a marker per call."""

    def evaluate(model):
        if marker_dir is not None:
            (Path(marker_dir) / f"{os.getpid()}.eval").write_text(str(time.time()))
        time.sleep(delay)
        return known_quality(model)

    return {
        "model": fake_model(),
        "profile": FakeProfile(),
        "cost": FakeCost(),
        "evaluate": evaluate,
        "space": SearchSpace(schemes=SCHEMES),
        "budget": Budget(memory_mb=0.03),
        "screen": False,
    }


def _pool(tmp_path, storage, n_trials, *, workers, delay=0.0, lease_s=1.0, markers=None):
    return WorkerPool(
        WorkerSpec(FACTORY, {"delay": delay, "marker_dir": markers and str(markers)}),
        workers=workers,
        storage=storage,
        study_name="s",
        n_trials=n_trials,
        lease=LeasePolicy(lease_s=lease_s, max_retry=2),
        log_dir=tmp_path / f"logs-{uuid.uuid4().hex[:6]}",
    )


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def _snapshot(study):
    return {
        t.number: (t.params, t.values, t.user_attrs)
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }


def _check_study(study, n_trials):
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == n_trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    origins = Counter(
        t.user_attrs["origin"]
        for t in trials
        if "origin" in t.user_attrs and "retry" not in t.user_attrs
    )
    assert origins and max(origins.values()) == 1, f"duplicated warm starts: {origins}"
    return trials


def test_four_workers_share_a_journal_study(tmp_path) -> None:
    # a lease long enough that no worker loses one on a loaded machine (no traceback expected)
    pool = _pool(
        tmp_path, f"journal:///{tmp_path}/study.log", 24, workers=4, delay=0.02, lease_s=10.0
    )
    res = pool.run()
    codes = pool.wait()
    assert codes == [0, 0, 0, 0], [pool.log(i)[-3000:] for i, c in enumerate(codes) if c]
    for i in range(4):
        assert "Traceback" not in pool.log(i)
    trials = _check_study(res.study, 24)
    workers = {t.system_attrs[WORKER_ATTR] for t in trials if WORKER_ATTR in t.system_attrs}
    assert len(workers) >= 2  # the trials really were spread over processes


def test_sqlite_is_refused_for_several_workers(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"cannot serve 2 parallel workers.*journal:///"):
        run_workers(
            WorkerSpec(FACTORY),
            workers=2,
            storage=f"sqlite:///{tmp_path}/s.db",
            study_name="s",
            n_trials=4,
        )


def test_killed_workers_lose_nothing_and_the_study_completes_on_restart(tmp_path) -> None:
    storage, markers, n = f"{tmp_path}/study.log", tmp_path / "markers", 14
    markers.mkdir()
    pool = _pool(tmp_path, storage, n, workers=2, delay=0.3, markers=markers)
    study = pool.prepare().study
    mid, after = pool.start()
    # kill one worker in the middle of an evaluation
    _wait_for(lambda: (markers / f"{mid.pid}.eval").exists())
    time.sleep(0.1)
    os.kill(mid.pid, signal.SIGKILL)
    mid_trial = [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if t.system_attrs.get(WORKER_ATTR, "").endswith(f":{mid.pid}")
    ]
    assert len(mid_trial) == 1

    # kill the other right after it reported a result
    def reported():
        return any(
            t.system_attrs.get(WORKER_ATTR, "").endswith(f":{after.pid}")
            for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        )

    _wait_for(reported)
    os.kill(after.pid, signal.SIGKILL)
    assert pool.wait(30) == [-signal.SIGKILL, -signal.SIGKILL]
    before = _snapshot(study)
    assert 0 < len(before) < n

    res = _pool(tmp_path, storage, n, workers=2, delay=0.02).run()  # restart
    trials = _check_study(res.study, n)
    after_restart = _snapshot(res.study)
    assert {k: after_restart[k] for k in before} == before  # nothing finished was changed or lost
    lost = res.study.get_trials()[mid_trial[0].number]
    assert lost.state == optuna.trial.TrialState.FAIL
    assert lost.user_attrs["fail_reason"] == LOST_REASON
    retries = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retries) == 1 and retries[0].params == lost.params
    assert retries[0].user_attrs["retry"] == 1


def test_sigterm_fails_the_running_trial_and_retries_it(tmp_path) -> None:
    storage, markers = f"{tmp_path}/study.log", tmp_path / "markers"
    markers.mkdir()
    pool = _pool(tmp_path, storage, 6, workers=1, delay=2.0, markers=markers, lease_s=30)
    study = pool.prepare().study
    (proc,) = pool.start()
    _wait_for(lambda: (markers / f"{proc.pid}.eval").exists())
    os.kill(proc.pid, signal.SIGTERM)
    assert pool.wait(30) == [143]
    trials = study.get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == SIGTERM_REASON
    retry = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.WAITING
    assert retry[0].user_attrs["retry_reason"] == SIGTERM_REASON


def _postgres_url() -> str:
    url = os.environ.get("MPSEARCH_TEST_POSTGRES_URL")
    if not url and (ROOT / ".ci-postgres-url").exists():
        url = (ROOT / ".ci-postgres-url").read_text().strip()
    if not url:
        why = Path("/tmp/mpsearch-ci-postgres/why-not")
        reason = why.read_text().strip() if why.exists() else "scripts/ci_services.sh was not run"
        pytest.skip(f"no PostgreSQL server for the multi-machine test: {reason}")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("no PostgreSQL driver: pip install psycopg2-binary (the 'postgres' extra)")
    return url


def test_two_workers_share_a_postgresql_study(tmp_path) -> None:
    url = _postgres_url()
    name = f"test-{uuid.uuid4().hex[:10]}"
    pool = WorkerPool(
        WorkerSpec(FACTORY, {"delay": 0.02}),
        workers=2,
        storage=url,
        study_name=name,
        n_trials=12,
        lease=LeasePolicy(lease_s=2.0),
        log_dir=tmp_path / "logs",
    )
    try:
        res = pool.run()
        assert pool.wait() == [0, 0]
        _check_study(res.study, 12)
    finally:
        optuna.delete_study(study_name=name, storage=make_storage(url))
