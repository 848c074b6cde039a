"""The rule that keeps racing workers from running more than ``n_trials`` COMPLETE trials."""

from __future__ import annotations

import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from mpsearch.search._search import _budget_full

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


def _trial(number: int, state: TrialState, start_s: float | None) -> FrozenTrial:
    return FrozenTrial(
        number=number,
        state=state,
        value=1.0 if state == TrialState.COMPLETE else None,
        datetime_start=None if start_s is None else T0 + datetime.timedelta(seconds=start_s),
        datetime_complete=T0 if state == TrialState.COMPLETE else None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def test_a_trial_written_first_keeps_the_last_slot_whatever_its_start_time() -> None:
    """Worker B wrote its trial first (number 1) but took its start time after worker A, who
    wrote second (number 2): B, checking before A's write, sees itself alone and runs. A must
    see B ahead and stop, or the study ends with one trial too many. Ranking by start time let
    both run (a journal study of 24 trials once ended with 25)."""
    done = _trial(0, TrialState.COMPLETE, 0.0)
    b = _trial(1, TrialState.RUNNING, 2.0)
    a = _trial(2, TrialState.RUNNING, 1.0)
    assert not _budget_full([done, b], b.number, 2)  # B's check, A not written yet
    assert _budget_full([done, b, a], a.number, 2)  # A's check: B is ahead


def test_enqueued_trials_ahead_count_and_later_ones_do_not() -> None:
    waiting = _trial(0, TrialState.WAITING, None)
    mine = _trial(1, TrialState.RUNNING, 0.0)
    later = _trial(2, TrialState.RUNNING, 0.0)
    assert _budget_full([waiting, mine, later], mine.number, 1)
    assert not _budget_full([waiting, mine, later], mine.number, 2)
    # failed and pruned trials hold no slot
    failed = _trial(0, TrialState.FAIL, 0.0)
    pruned = _trial(1, TrialState.PRUNED, 0.0)
    assert not _budget_full([failed, pruned, later], later.number, 1)


def test_real_study_trials_follow_the_rule() -> None:
    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    trials = study.get_trials(deepcopy=False)
    assert not _budget_full(trials, first.number, 1)
    assert _budget_full(trials, second.number, 1)
