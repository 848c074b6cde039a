"""Trial leases: a trial whose worker died is failed within a bounded time and retried.

Every running trial carries a lease (an expiry time in the trial's system attributes,
``mpsearch:lease_until``) renewed by a thread of the worker that runs it. Any worker's
:func:`sweep_expired` marks a RUNNING trial whose lease has expired FAIL with the reason
``"worker lost (lease expired)"`` and enqueues its parameters again, at most
``LeasePolicy.max_retry`` times. This works the same on every storage (SQLite, journal file,
PostgreSQL) and outside ``Study.optimize`` too, where Optuna's own heartbeat (RDB storages
inside ``optimize`` only) does not reach. Expiry times are wall-clock times: on several
machines their clocks must agree to well within ``lease_s`` (NTP does).

A worker stopped by SIGTERM fails its running trial with the reason ``"SIGTERM"`` (see
:func:`sigterm_handler`), which is retried the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from mpsearch._validation import check_positive, invalid
from mpsearch.search._optuna_compat import study_storage, trial_id

LEASE_ATTR = "mpsearch:lease_until"
WORKER_ATTR = "mpsearch:worker"
LOST_REASON = "worker lost (lease expired)"
SIGTERM_REASON = "SIGTERM"


@dataclass(frozen=True)
class LeasePolicy:
    """How long a silent worker keeps its trial (``lease_s``), and how often a lost trial is retried.

    The lease is renewed every ``lease_s / 4`` seconds, so a worker is declared lost between
    ``lease_s`` and ``lease_s`` plus the time to the next sweep after its death.

    >>> LeasePolicy(lease_s=30, max_retry=1).renew_s
    7.5
    """

    lease_s: float = 60.0
    max_retry: int = 2

    def __post_init__(self) -> None:
        check_positive("lease_s", self.lease_s)
        if (
            isinstance(self.max_retry, bool)
            or not isinstance(self.max_retry, int)
            or self.max_retry < 0
        ):
            raise invalid("max_retry", self.max_retry, "a non-negative integer")

    @property
    def renew_s(self) -> float:
        return self.lease_s / 4


def worker_id() -> str:
    """``host:pid`` of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM handler; Optuna fails the running trial on it."""


class TrialLease:
    """Holds the lease of one running trial while the ``with`` block runs (renewed by a thread).

    >>> with TrialLease(study, trial, LeasePolicy()):   # doctest: +SKIP
    ...     value = objective(trial)
    """

    active: ClassVar[dict[int, TrialLease]] = {}  # trial id -> lease, in this process

    def __init__(self, study: optuna.Study, trial: optuna.Trial, policy: LeasePolicy) -> None:
        self.study = study
        self.storage = study_storage(study)
        self.trial_id = trial_id(trial)
        self.number = trial.number
        self.policy = policy
        self.lost = False
        self.until = 0.0  # the expiry last written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> bool:
        """Push the expiry forward; ``False`` (and ``lost``) once another worker has failed the trial."""
        try:
            until = time.time() + self.policy.lease_s
            self.storage.set_trial_system_attr(self.trial_id, LEASE_ATTR, until)
            self.until = until
            return True
        except UpdateFinishedTrialError:
            self.lost = True
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.renew_s):
            try:
                if not self.renew():
                    return
            except Exception:  # a storage hiccup: try again at the next beat
                continue

    def __enter__(self) -> TrialLease:
        self.storage.set_trial_system_attr(self.trial_id, WORKER_ATTR, worker_id())
        self.renew()
        TrialLease.active[self.trial_id] = self
        self._thread = threading.Thread(
            target=self._loop, name=f"mpsearch-lease-{self.number}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        TrialLease.active.pop(self.trial_id, None)
        if not self.lost and self.until - time.time() < self.policy.lease_s / 2:
            with contextlib.suppress(Exception):  # a stalled renewer: cover Optuna's tell too
                self.renew()
        if not self.lost:  # failed by a sweep since the last renewal (a stalled, loaded worker)?
            with contextlib.suppress(Exception):
                self.lost = self.storage.get_trial(self.trial_id).state.is_finished()


def _expiry(trial: FrozenTrial, policy: LeasePolicy) -> float:
    lease = trial.system_attrs.get(LEASE_ATTR)
    if lease is not None:
        return float(lease)
    # created (or popped from the queue) but its worker never took the lease: count from its start
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return start + policy.lease_s


def retry_params(
    study: optuna.Study, trial: FrozenTrial, policy: LeasePolicy, *, reason: str
) -> bool:
    """Enqueue ``trial``'s parameters again unless it has been retried ``max_retry`` times.

    The new trial carries ``retry`` (its count), ``retry_of`` (the lost trial's number),
    ``retry_reason`` and the lost trial's ``origin``. Returns whether it was enqueued.
    """
    count = int(trial.user_attrs.get("retry", 0))
    if count >= policy.max_retry or not trial.params:
        return False
    attrs: dict[str, Any] = {"retry": count + 1, "retry_of": trial.number, "retry_reason": reason}
    if "origin" in trial.user_attrs:
        attrs["origin"] = trial.user_attrs["origin"]
    study.enqueue_trial(dict(trial.params), user_attrs=attrs, skip_if_exists=False)
    return True


def fail_trial(
    study: optuna.Study, trial: FrozenTrial, policy: LeasePolicy, *, reason: str
) -> bool:
    """Mark a RUNNING trial FAIL with ``reason`` and retry it; ``False`` if it had already finished.

    Only the caller whose state change takes effect retries, so two sweepers never both do.
    """
    storage, tid = study_storage(study), trial_id(trial)
    try:
        storage.set_trial_user_attr(tid, "fail_reason", reason)
        storage.set_trial_state_values(tid, state=TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if storage.get_trial(tid).state != TrialState.FAIL:
        return False
    retry_params(study, trial, policy, reason=reason)
    return True


def sweep_expired(
    study: optuna.Study, policy: LeasePolicy, *, now: float | None = None
) -> list[int]:
    """Fail (and retry) every RUNNING trial whose lease has expired; return their numbers.

    >>> sweep_expired(study, LeasePolicy(lease_s=30))   # doctest: +SKIP
    [12]
    """
    now = time.time() if now is None else now
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial_id(t) in TrialLease.active or _expiry(t, policy) > now:
            continue
        if fail_trial(study, t, policy, reason=LOST_REASON):
            lost.append(t.number)
    return lost


def next_expiry(study: optuna.Study, policy: LeasePolicy) -> float | None:
    """The earliest lease expiry among RUNNING trials (``None`` if none runs)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return min((_expiry(t, policy) for t in running), default=None)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_handler() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread (no-op elsewhere).

    The objective records ``fail_reason="SIGTERM"`` on its trial, Optuna marks it FAIL (it
    treats a ``KeyboardInterrupt`` so), and the search retries it, then exits with status 143.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
