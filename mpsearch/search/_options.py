"""``SearchOptions``: how a search runs, in one frozen, validated object (YAML round trip)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optuna

from mpsearch._options import Check, Options, flag, positive_int
from mpsearch._validation import InvalidTypeError, check_positive, invalid, unknown
from mpsearch.backends import BACKENDS
from mpsearch.search._leases import LeasePolicy
from mpsearch.search._samplers import SAMPLERS
from mpsearch.search._space import SearchSpace, load_space

OBJECTIVES: dict[str, str] = {"quality": "maximize", "memory": "minimize", "latency": "minimize"}


def _objectives(name: str, value: Any) -> tuple[str, ...]:
    names = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else ()
    if (
        not names
        or any(o not in OBJECTIVES for o in names)
        or len(set(names)) != len(names)
        or "quality" not in names
    ):
        raise invalid(
            name,
            value,
            f"a non-empty list of distinct names from {list(OBJECTIVES)} that includes 'quality'",
            kind="option",
        )
    return names


def _sampler(name: str, value: Any) -> Any:
    if isinstance(value, optuna.samplers.BaseSampler):
        return value
    if value not in SAMPLERS:
        raise unknown(name, value, SAMPLERS, kind="option")
    return value


def _seed(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid(name, value, "an integer or None", kind="option")
    return value


def _storage(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, (str, optuna.storages.BaseStorage)):
        raise invalid(name, value, "a storage URL, an Optuna storage or None", kind="option")
    return value


def _study_name(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(name, value, "a non-empty string or None", kind="option")
    return value


def _space(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, (SearchSpace, str, Path, Mapping)):
        raise invalid(
            name,
            value,
            "a SearchSpace, a YAML path, a bundled space name, a dict or None",
            kind="option",
        )
    load_space(value, None)  # type: ignore[arg-type]  # reads and checks it now (no model needed)
    return value


def _metric(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(name, value, "the name of a profile error column, e.g. 'e2e'", kind="option")
    return value


def _backend(name: str, value: Any) -> str:
    if value not in BACKENDS:
        raise unknown(name, value, BACKENDS, kind="option")
    return value


def _n_jobs(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise invalid(name, value, "a positive integer, or -1 (one per CPU)", kind="option")
    return value


def _timeout(name: str, value: Any) -> float | None:
    check_positive(name, value, allow_none=True, kind="option")
    return value


def _verify(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise invalid(name, value, "a non-negative integer, or 0 / None to skip", kind="option")
    return value


def _lease(name: str, value: Any) -> LeasePolicy | None:
    if value is None or isinstance(value, LeasePolicy):
        return value
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"lease_s", "max_retry"})
        if extra:
            raise invalid(
                name, dict(value), "a mapping of 'lease_s' and 'max_retry'", kind="option"
            )
        return LeasePolicy(**value)
    raise invalid(
        name, value, "a LeasePolicy(lease_s=..., max_retry=...), a mapping or None", kind="option"
    )


_CHECKS: dict[str, Check] = {
    "n_trials": positive_int,
    "storage": _storage,
    "study_name": _study_name,
    "space": _space,
    "objectives": _objectives,
    "sampler": _sampler,
    "seed": _seed,
    "load_if_exists": flag,
    "warm_start": flag,
    "screen": flag,
    "metric": _metric,
    "quality_backend": _backend,
    "verify": _verify,
    "n_jobs": _n_jobs,
    "timeout": _timeout,
    "show_progress_bar": flag,
    "lease": _lease,
    "handle_sigterm": flag,
}


@dataclass(frozen=True)
class SearchOptions(Options):
    """How :func:`~mpsearch.search.search` runs: study, space, sampler, screening, limits.

    Every field is checked when the object is made (a bad value raises ``ValueError`` naming
    the option, the value and what is accepted), so a bad option fails before any work. It
    round-trips through a plain dict (:meth:`to_dict` / :meth:`from_dict`, e.g. from YAML)
    when its values are plain (a sampler or storage given as an object is not).

    - ``n_trials``: COMPLETE trials the study holds when done (every worker's count);
    - ``storage``, ``study_name``: where the study lives (default: in memory, a fresh study
      for each call, nothing written; ``storage`` is needed to resume a study or to share it
      between workers: ``sqlite:///studies/<name>.db``, a journal file or PostgreSQL);
    - ``space``: a :class:`SearchSpace`, a YAML path, a bundled name or a dict (``None``: the
      model family's bundled space);
    - ``objectives``: from ``quality``, ``memory``, ``latency`` (``quality`` required);
    - ``sampler`` (``tpe``, ``nsga2``, ``random`` or an Optuna sampler), ``seed``;
    - ``load_if_exists``: resume a study of that name from ``storage``; ``warm_start``: enqueue uniform, greedy
      and ILP plans once; ``screen``: prune candidates the proxy predicts dominated;
    - ``metric``: the profile error column summed by the proxy; ``quality_backend``: the
      backend ``evaluate`` sees quantized models on;
    - ``verify``: after the trials, run at most this many front plans (those
      :meth:`SearchResult.best` ranks first) for real on the cost model's backend (quality
      by ``evaluate`` on ``quantize(model, plan, backend=cost.backend)``, latency end to end
      next to fp32), kept in ``SearchResult.verified`` and the front's ``real_*`` columns,
      which ``best`` then ranks by; ``0`` or ``None``: no check;
    - ``n_jobs``, ``timeout`` (s), ``show_progress_bar``: as in ``Study.optimize``;
    - ``lease``: the :class:`LeasePolicy` of running trials; ``handle_sigterm``: fail and retry
      the running trial on SIGTERM, then exit with status 143.

    >>> opts = SearchOptions(n_trials=60, sampler="nsga2", objectives=["quality", "memory"])
    >>> opts.objectives
    ('quality', 'memory')
    >>> SearchOptions.from_dict(opts.to_dict()) == opts
    True
    >>> SearchOptions(n_trials=-3)
    Traceback (most recent call last):
    ...
    ValueError: The 'n_trials' option must be a positive integer. Got -3 instead.
    """

    n_trials: int = 100
    storage: str | optuna.storages.BaseStorage | None = None
    study_name: str | None = None
    space: SearchSpace | str | Path | Mapping[str, Any] | None = None
    objectives: tuple[str, ...] = ("quality", "memory", "latency")
    sampler: str | optuna.samplers.BaseSampler = "tpe"
    seed: int | None = 0
    load_if_exists: bool = False
    warm_start: bool = True
    screen: bool = True
    metric: str = "e2e"
    quality_backend: str = "simulate"
    verify: int | None = 8
    n_jobs: int = 1
    timeout: float | None = None
    show_progress_bar: bool = False
    lease: LeasePolicy | None = None
    handle_sigterm: bool = True

    CHECKS: ClassVar[dict[str, Check]] = _CHECKS
    VERB: ClassVar[str] = "search"

    @property
    def lease_policy(self) -> LeasePolicy:
        """``lease``, or the default :class:`LeasePolicy`."""
        return self.lease or LeasePolicy()

    @staticmethod
    def _plain(name: str, value: Any) -> Any:
        if isinstance(value, LeasePolicy):
            return dataclasses.asdict(value)
        if isinstance(value, SearchSpace):
            return value.to_dict()
        if isinstance(value, (optuna.samplers.BaseSampler, optuna.storages.BaseStorage)):
            raise InvalidTypeError(
                f"The {name!r} option holds a {type(value).__name__} object, which a dict (YAML) "
                f"cannot hold; give it by name or URL to write the options out."
            )
        return Options._plain(name, value)


def resolve_options(
    options: SearchOptions | None,
    overrides: Mapping[str, Any],
    *,
    verb: str = "search",
    also: Iterable[str] = (),
) -> SearchOptions:
    """``options`` (default ``SearchOptions()``) with the keyword ``overrides`` of ``verb``;
    overrides given as ``None`` for ``n_trials``, ``storage`` and ``study_name`` keep the options'.
    """
    given = {
        k: v
        for k, v in overrides.items()
        if not (v is None and k in ("n_trials", "storage", "study_name"))
    }
    return SearchOptions.resolve(options, given, verb=verb, also=also)
