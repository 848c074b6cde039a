"""SearchResult: the study, its Pareto front, plans, best plan under a budget, hypervolume."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import optuna
import pandas as pd

from mpsearch.plan import PrecisionPlan
from mpsearch.schemes import get_scheme
from mpsearch.search._budget import Budget, as_budget
from mpsearch.search._pareto import hypervolume, pareto_mask
from mpsearch.search._realcheck import verified_frame
from mpsearch.search._space import ResolvedSpace
from mpsearch.search._table import ChoiceTable

_MAXIMIZE = {"quality": True, "memory_mb": False, "latency_ms": False}
_COLUMN = {"quality": "quality", "memory": "memory_mb", "latency": "latency_ms"}
# a plan is called slower than fp32 past this latency ratio (closer is timing noise)
SLOWER_THAN_FP32 = 1.05
_FRONT = ["trial", "quality", "memory_mb", "latency_ms", "origin"]
_REAL = ("quality", "latency_ms", "speedup", "note")
LATENCY_ERROR_WARNING = 0.25
"""Median relative error of the cost model on the front's real runs above which
:attr:`SearchResult.warnings` says so."""  # of ``verified``, as ``real_*`` columns


def _ranked(
    df: pd.DataFrame,
    memory_mb: float | None,
    latency_ms: float | None,
    quality: str = "quality",
    latency: str = "latency_ms",
) -> pd.DataFrame:
    """The rows of ``df`` that meet the limits, best first: by ``quality``, then the budget's
    tie rule (see :meth:`SearchResult.best`) on ``memory_mb`` and the ``latency`` column."""
    if not len(df):
        return df
    ok = np.ones(len(df), dtype=bool)
    if memory_mb is not None:
        ok &= df["memory_mb"].to_numpy() <= memory_mb
    if latency_ms is not None:
        ok &= df[latency].to_numpy() <= latency_ms
    df = df[ok]
    key = pd.DataFrame({"q": df[quality], "m": df["memory_mb"], "l": df[latency]})
    ties = ["m", "l"] if memory_mb is None and latency_ms is None else ["l", "m"]
    if memory_mb is not None and latency_ms is not None:
        key["share"] = key["m"] / memory_mb + key["l"] / latency_ms
        ties.insert(0, "share")
    order = key.sort_values(["q", *ties], ascending=[False, *[True] * len(ties)], kind="stable")
    return df.loc[order.index]


@dataclass
class SearchResult:
    """What :func:`search` found.

    ``study`` is the Optuna study; ``trials`` one row per finished trial; ``pareto`` the
    non-dominated feasible trials whose quality was truly evaluated, cheapest first;
    ``plans`` their :class:`PrecisionPlan` in the same order; ``warnings`` what to know before
    using :meth:`best` (e.g. that it is predicted slower than fp32).
    """

    study: optuna.Study
    space: ResolvedSpace
    table: ChoiceTable
    objectives: tuple[str, ...]
    limits: tuple[float | None, float | None]
    fp32_memory_mb: float
    fp32_latency_ms: float
    wall_time_s: float = 0.0
    kernels: dict[str, Any] = field(default_factory=dict, repr=False)
    """``{"backend": name, "choices": {choice key: implementation}}``: the kernels the cost
    model chose by measurement (empty when it chose none); each plan carries those of its
    schemes in ``metadata["kernels"]``, which :func:`~mpsearch.quantize` then builds."""
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def trials(self) -> pd.DataFrame:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            if (
                t.state == optuna.trial.TrialState.RUNNING
                or t.state == optuna.trial.TrialState.WAITING
            ):
                continue
            complete = t.state == optuna.trial.TrialState.COMPLETE
            rows.append(
                {
                    "trial": t.number,
                    "state": t.state.name,
                    "quality": t.values[0] if complete else np.nan,
                    "memory_mb": t.user_attrs.get("memory_mb", np.nan),
                    "latency_ms": t.user_attrs.get("latency_ms", np.nan),
                    "feasible": all(v <= 0 for v in t.constraints.values()),
                    "origin": t.user_attrs.get("origin", "sampler"),
                    "quality_source": t.user_attrs.get("quality_source", ""),
                    "proxy_error": t.user_attrs.get("proxy_error", np.nan),
                    "reason": t.user_attrs.get(
                        "fail_reason", t.user_attrs.get("pruned_reason", "")
                    ),
                    "assignment": t.user_attrs.get("plan"),
                }
            )
        return pd.DataFrame(rows)

    @property
    def n_true_evaluations(self) -> int:
        """How many plans had their quality truly evaluated (not memoised, not proxy, not pruned)."""
        df = self.trials
        return int((df["quality_source"] == "true").sum()) if len(df) else 0

    def _evaluated(self) -> pd.DataFrame:
        df = self.trials
        if not len(df):
            return df
        return df[(df["state"] == "COMPLETE") & df["quality_source"].isin(["true", "memo"])]

    @property
    def verified(self) -> pd.DataFrame | None:
        """The front's plans run for real after the search (``SearchOptions.verify``, on the
        cost model's backend), or ``None`` when none were: one row for the fp32 model, then
        one per plan, with ``plan``, ``trial``, ``quality`` (``evaluate`` on the quantized
        model), ``latency_ms`` (end to end on the example input, timed next to fp32),
        ``speedup`` (over fp32), ``backend`` and ``note`` (why a plan could not run).

        >>> res.verified[["plan", "quality", "speedup"]]  # doctest: +SKIP
        """
        return verified_frame(self.study)

    @cached_property
    def _front(self) -> pd.DataFrame:
        df = self._evaluated()
        df = df[df["feasible"]] if len(df) else df
        if not len(df):
            return pd.DataFrame(columns=[*_FRONT, "assignment"])
        cols = [_COLUMN[o] for o in self.objectives]
        pts = df[cols].to_numpy(dtype=float)
        front = df[pareto_mask(pts, [_MAXIMIZE[c] for c in cols])]
        front = front.drop_duplicates(subset=["quality", "memory_mb", "latency_ms"])
        front = front.sort_values(
            ["memory_mb", "latency_ms", "quality"], ascending=[True, True, False]
        )
        return front[[*_FRONT, "assignment"]].reset_index(drop=True)

    @property
    def pareto(self) -> pd.DataFrame:
        """The non-dominated feasible plans whose quality was truly evaluated, cheapest first:
        ``trial``, ``quality``, ``memory_mb``, ``latency_ms`` (predicted), ``origin``,
        ``plan``; after a check on the real backend (:attr:`verified`) also ``real_quality``,
        ``real_latency_ms``, ``real_speedup`` (NaN for a plan not checked or that cannot run)
        and ``real_note`` (``"not checked"``, or why a plan cannot run; empty when it ran)."""
        front = self._with_real(self._front)
        out = front.drop(columns="assignment")
        out["plan"] = [self._plan(row) for row in front.itertuples(index=False)]
        return out

    def _with_real(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` (rows with a ``trial``) with the real figures of :attr:`verified`, if any."""
        verified = self.verified
        if verified is None:
            return df
        real = verified[verified["trial"].notna()].astype({"trial": "int64"})
        real = real.rename(columns={c: f"real_{c}" for c in _REAL})[
            ["trial", *(f"real_{c}" for c in _REAL)]
        ]
        out = df.merge(real, on="trial", how="left")
        out["real_note"] = out["real_note"].fillna("not checked")
        return out.set_index(df.index)

    def _plan(self, row: object) -> PrecisionPlan:
        metadata = {
            "trial": int(row.trial),
            "quality": float(row.quality),
            "memory_mb": float(row.memory_mb),
            "latency_ms": float(row.latency_ms),
        }
        for c in _REAL[:-1]:
            value = getattr(row, f"real_{c}", np.nan)
            if not np.isnan(value):
                metadata[f"real_{c}"] = float(value)
        schemes = {get_scheme(choice).name for choice in row.assignment.values()}
        picked = {  # a choice key is "<scheme> <layer signature>"
            key: kernel
            for key, kernel in self.kernels.get("choices", {}).items()
            if key.split(" ", 1)[0] in schemes
        }
        if picked:
            metadata["kernels"] = {"backend": self.kernels["backend"], "choices": picked}
        return PrecisionPlan.from_assignment(row.assignment, metadata=metadata)

    @property
    def plans(self) -> list[PrecisionPlan]:
        """The Pareto plans, cheapest (in memory) first."""
        return list(self.pareto["plan"])

    def best(self, budget: Budget | dict | None = None) -> PrecisionPlan:
        """The truly evaluated plan with the best quality that meets ``budget`` (default: the search's).

        Where the front was run for real after the search (:attr:`verified`), the real figures
        decide: among the checked plans that meet the budget, the best real quality wins, a
        latency limit is held against the measured speed-up over fp32 (a plan meets
        ``latency_ms=L`` when ``fp32_latency_ms / real_speedup <= L``, so
        ``Budget(latency_fraction=1.0)`` means "measured no slower than fp32") and the ties
        below use that measured latency. A plan that cannot run on the real backend is never
        chosen; plans not checked count only when no checked plan meets the budget (then by
        their search figures: quality on ``quality_backend``, predicted latency).

        Ties in quality go by the budget asked for: under a latency budget or a memory budget
        alone to the faster plan (then the smaller: a plan within the memory limit gains
        nothing from being smaller still, and a memory budget met with a plan slower than
        another of equal quality would give up speed for nothing); under both, to the plan
        that spends the smaller share of them (``memory / memory limit + latency / latency
        limit``); without a budget, to the smaller, then the faster.

        >>> res.best(Budget(latency_fraction=0.8)).metadata["latency_ms"]  # doctest: +SKIP
        """
        memory_mb, latency_ms = self._limits(budget)
        df = self._with_real(self._evaluated())
        if len(df) and "real_quality" in df:
            ran = df["real_note"] == ""
            checked = df[ran].assign(_latency=self.fp32_latency_ms / df.loc[ran, "real_speedup"])
            ranked = _ranked(checked, memory_mb, latency_ms, "real_quality", "_latency")
            if not len(ranked):
                ranked = _ranked(df[df["real_note"] == "not checked"], memory_mb, latency_ms)
        else:
            ranked = _ranked(df, memory_mb, latency_ms)
        if not len(ranked):
            raise ValueError(
                f"No evaluated plan meets the budget (memory_mb={memory_mb}, latency_ms={latency_ms}); run more trials or relax it."
            )
        return self._plan(ranked.iloc[0])

    def candidates(self, n: int) -> dict[int, PrecisionPlan]:
        """The ``n`` front plans :meth:`best` ranks first under the search's budget, on the
        search's figures, by trial: those worth running for real (``SearchOptions.verify``)."""
        ranked = _ranked(self._front, *self.limits).head(n)
        return {int(row.trial): self._plan(row) for row in ranked.itertuples(index=False)}

    def _limits(self, budget: Budget | dict | None) -> tuple[float | None, float | None]:
        if budget is None:
            return self.limits
        return as_budget(budget).limits(
            fp32_memory_mb=self.fp32_memory_mb, fp32_latency_ms=self.fp32_latency_ms
        )

    @property
    def warnings(self) -> list[str]:
        """What to know before using :meth:`best`, in plain words: the best plan (under the
        search's budget) predicted more than 5% slower than fp32, with how to ask for speed
        too; the cost model's latency predictions off by more than
        :data:`LATENCY_ERROR_WARNING` (median) on the front plans run for real. Empty when
        there is nothing to say (or no plan meets the budget: :meth:`best` says so).

        >>> res.warnings  # doctest: +SKIP
        ['The best plan under the budget (trial 7) is predicted 1.60x slower than fp32 ...']
        """
        check = self.latency_check
        said = []
        if check is not None and len(check):
            error = float(check["rel_error"].median())
            if error > LATENCY_ERROR_WARNING:
                said.append(
                    f"The cost model's latency predictions were off by {error:.0%} (median over "
                    f"{len(check)} front plans run for real; res.latency_check): rank plans "
                    "by their measured latency (res.pareto's real_latency_ms), and re-measure "
                    "the cost model on a quiet machine."
                )
        return self._slower_than_fp32() + said

    @property
    def latency_check(self) -> pd.DataFrame | None:
        """The cost model checked against whole-plan runs: for each front plan run for real
        (:attr:`verified`), ``trial``, ``predicted_ms`` (the cost model), ``measured_ms`` (end
        to end on the backend) and ``rel_error`` (|predicted - measured| / measured); ``None``
        when the front was not run for real.

        >>> res.latency_check["rel_error"].median()  # doctest: +SKIP
        0.06
        """
        if self.verified is None:
            return None
        front = self.pareto
        ran = front[front["real_note"] == ""]
        out = pd.DataFrame(
            {
                "trial": ran["trial"].to_numpy(),
                "predicted_ms": ran["latency_ms"].to_numpy(dtype=float),
                "measured_ms": ran["real_latency_ms"].to_numpy(dtype=float),
            }
        )
        out["rel_error"] = (out["predicted_ms"] - out["measured_ms"]).abs() / out["measured_ms"]
        return out

    def _slower_than_fp32(self) -> list[str]:
        try:
            plan = self.best()
        except ValueError:
            return []
        speedup = plan.metadata.get("real_speedup")
        if speedup is not None:
            ratio, verb = 1 / speedup, "measured"
            fp32 = float(self.verified["latency_ms"].iloc[0])
            latency, where = fp32 * ratio, f"on the {self.verified['backend'].iloc[0]!r} backend"
        else:
            latency, fp32 = plan.metadata["latency_ms"], self.fp32_latency_ms
            ratio, verb, where = latency / fp32, "predicted", "on this machine"
        if ratio <= SLOWER_THAN_FP32:
            return []
        if self.limits == (None, None):
            what = "The best plan (no budget was given)"
            why = "without a budget, quality ties go to the smaller plan"
        else:
            what, why = "The best plan under the budget", "it meets the budget by giving up speed"
        return [
            f"{what} (trial {plan.metadata['trial']}) is {verb} {ratio:.2f}x slower "
            f"than fp32 ({latency:.4g} ms vs {fp32:.4g} ms) {where}: {why}. If speed "
            "matters too, add a latency budget, e.g. res.best(Budget(latency_fraction=1.0)) or "
            "search(..., budget=Budget(..., latency_fraction=1.0)), or pick another plan from "
            "the front (res.pareto)."
        ]

    def reference_point(self) -> tuple[float, float, float]:
        """Default hypervolume reference: (lowest true quality seen, fp32 memory, fp32 latency)."""
        df = self._evaluated()
        q = float(df["quality"].min()) if len(df) else 0.0
        return (q, self.fp32_memory_mb, self.fp32_latency_ms)

    def hypervolume(
        self, reference: tuple[float, float, float] | None = None, *, upto_trial: int | None = None
    ) -> float:
        """Hypervolume of the front over (quality, memory MB, latency ms) against ``reference``."""
        ref = reference or self.reference_point()
        df = self._evaluated()
        if len(df):
            df = df[df["feasible"]]
        if upto_trial is not None and len(df):
            df = df[df["trial"] <= upto_trial]
        pts = (
            df[["quality", "memory_mb", "latency_ms"]].to_numpy(dtype=float)
            if len(df)
            else np.zeros((0, 3))
        )
        return hypervolume(pts, ref, [True, False, False])

    def hypervolume_history(
        self, reference: tuple[float, float, float] | None = None
    ) -> pd.DataFrame:
        """Hypervolume after each true evaluation: columns ``true_evaluations``, ``trial``, ``hypervolume``."""
        ref = reference or self.reference_point()
        df = self.trials
        rows, count = [], 0
        for t in df[df["quality_source"] == "true"]["trial"]:
            count += 1
            rows.append(
                {
                    "true_evaluations": count,
                    "trial": int(t),
                    "hypervolume": self.hypervolume(ref, upto_trial=int(t)),
                }
            )
        return pd.DataFrame(rows)


def warn_about(result: SearchResult, *, stacklevel: int = 3) -> SearchResult:
    """Issue each of ``result.warnings`` as a ``UserWarning`` (shown once in a notebook or on
    the command line); return ``result``."""
    for note in result.warnings:
        warnings.warn(note, UserWarning, stacklevel=stacklevel)
    return result
