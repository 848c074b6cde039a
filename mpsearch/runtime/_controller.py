"""``Controller``: serve each input with the cheapest variant that is good enough for it.

The variants (quantized copies of one model, one per plan) form a cascade ordered by
measured cost. An input runs through the cheapest variant; its difficulty score decides
whether it is served there or escalated to the next variant (an escalated input pays both
passes). Inside a batch only the hard inputs are re-run. Thresholds are calibrated with
Learn-then-Test (see :mod:`mpsearch.runtime._calibration`), and every decision is audited.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mpsearch._data import as_batches, batch_size, output_tensor, run_model
from mpsearch._validation import check_fraction, invalid, unknown
from mpsearch.backends import as_plan, check_assignment, get_backend, quantize
from mpsearch.backends._registry import Backend
from mpsearch.plan import PrecisionPlan
from mpsearch.runtime._audit import AuditLog
from mpsearch.runtime._calibration import (
    PVALUES,
    CalibrationReport,
    cascade_cost,
    check_test_size,
    default_grid,
    learn_then_test,
    losses,
    quantile_grid,
    served_stage,
)
from mpsearch.runtime._scorers import (
    Scorer,
    answer_logits,
    check_score_array,
    check_scores,
    cut_point,
    make_scorer,
)

ScorerLike = str | Scorer | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Variant:
    """One quantized copy of the model inside a controller.

    ``cost_ms`` is the measured time per input (ms) on the example batch (``nan`` until
    measured); ``shared`` is true when the variant is the original model itself (an
    all-fp32 plan needs no copy).
    """

    name: str
    plan: PrecisionPlan
    assignment: dict[str, str]
    module: nn.Module
    cost_ms: float
    shared: bool


def plan_label(assignment: Mapping[str, str]) -> str:
    """A short name for a plan: its scheme if uniform, else scheme counts (``w8a8x3+bf16x2``).

    >>> plan_label({"a": "w8a8", "b": "w8a8", "c": "bf16"})
    'w8a8x2+bf16x1'
    """
    counts = Counter(assignment.values())
    if len(counts) <= 1:
        return next(iter(counts), "fp32")
    return "+".join(f"{s}x{c}" for s, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _take(batch: Any, index: Tensor, n: int) -> Any:
    """The rows ``index`` of every tensor in ``batch`` whose leading dimension is ``n``."""
    if isinstance(batch, Tensor):
        return batch.index_select(0, index) if batch.ndim and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _take(v, index, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, index, n) for v in batch)
    return batch


def _scatter(full: Any, index: Tensor, part: Any, n: int) -> Any:
    """Write ``part`` (outputs for rows ``index``) into ``full`` (outputs for all ``n`` rows)."""
    if isinstance(full, Tensor):
        if full.ndim and full.shape[0] == n and isinstance(part, Tensor):
            full[index] = part.to(full.dtype)
        return full
    if isinstance(full, Mapping):
        return {k: _scatter(v, index, part[k], n) for k, v in full.items()}
    if isinstance(full, (tuple, list)):
        return type(full)(_scatter(f, index, p, n) for f, p in zip(full, part, strict=True))
    return full


def _cast(output: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return output
    if isinstance(output, Tensor):
        return output.to(dtype) if output.dtype != dtype and output.is_floating_point() else output
    if isinstance(output, Mapping):
        return {k: _cast(v, dtype) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_cast(v, dtype) for v in output)
    return output


_Rule = tuple[
    float,
    int,
    float,
    Callable[[float], float] | None,
    Callable[[Tensor, int], float],
    Callable[[Tensor, int], list[float]],
    Callable[[Tensor], float] | None,
]
"""What one call reads of the thresholds in force, at once: ``(threshold, version, cut, link,
one, many, fast)``. ``one`` / ``many`` score one input / a small batch at a stage; with a
``link`` they return raw values compared with ``cut`` (see :func:`cut_point`), else scores
compared with ``cut == threshold``. ``fast`` is ``one`` without the stage (a call less), when
the scorer has one."""

_ALL = np.zeros(0, dtype=np.int64)
"""Sentinel of :func:`_hard_rows`: every row is hard."""
_SMALL = 256
"""Batches up to this size are scored and routed on Python floats (fewer calls than tensor ops:
right after a pass each call costs several us)."""


def _hard_rows(
    scorer: Scorer, logits: Tensor, stage: int, m: int, rule: _Rule
) -> tuple[Any, Any, Callable[[float], float] | None]:
    """The scores at ``stage`` of ``m > 1`` inputs, the positions whose score is above the
    threshold (``None`` if none, ``_ALL`` if all) and the link still to apply to the scores
    (raw values) or ``None``. Refuses scores that are not ``m`` numbers free of NaN."""
    threshold, _, cut, link, _, many, _ = rule
    if m <= _SMALL:
        values = many(logits, stage)
        hard = [i for i, v in enumerate(values) if not v <= cut]  # NaN lands here too
        if len(values) != m or (hard and any(values[i] != values[i] for i in hard)):
            check_scores(torch.tensor(values, dtype=torch.float64), m, scorer.name)  # raises
        if not hard:
            return values, None, link
        return values, (_ALL if len(hard) == m else np.asarray(hard, dtype=np.int64)), link
    scores = scorer.score(logits, stage)
    if not isinstance(scores, Tensor) or scores.shape != (m,):
        check_scores(scores, m, scorer.name)  # raises with the shape it got
    array = scores.numpy() if scores.dtype != torch.bfloat16 else scores.float().numpy()
    if np.isnan(array).any():
        check_scores(scores, m, scorer.name)
    mask = array > threshold
    count = int(np.count_nonzero(mask))
    if count == 0:
        return scores, None, None
    return scores, (_ALL if count == m else np.flatnonzero(mask)), None


def time_module(module: nn.Module, batch: Any, *, repeats: int = 3) -> float:
    """Median wall time (ms) of ``module`` on ``batch`` after one warm-up call.

    >>> time_module(nn.Linear(4, 4), torch.zeros(2, 4)) >= 0
    True
    """
    with torch.inference_mode():
        run_model(module, batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_model(module, batch)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class Controller:
    """Per-input precision switching: a cascade of quantized variants with calibrated thresholds.

    ``plans`` are quantized once on ``backend`` (an all-fp32 plan reuses ``model``; identical
    plans share one variant) and ordered by measured cost on ``example_input`` (given order
    when there is none). An input runs through the cheapest variant; ``scorer`` turns its
    per-input logits into a difficulty score (**higher = harder**: ``ratio`` (the default) is
    ``p2 / p1``, ``max_softmax`` ``1 - p_max``, ``margin`` ``1 - (p1 - p2)``, ``entropy`` the
    normalised entropy, ``gate`` a logistic regression fitted during calibration, or any
    callable ``logits [B, C] -> scores [B]`` following the same convention); when the score
    is above the threshold the input is re-run on the next variant. The last variant is the
    reference ("most precise").
    Until :meth:`calibrate` is called the threshold is ``-inf``: every input is escalated, so
    the served answer is the reference's.

    For language-model outputs ``[B, T, V]`` the per-input answer is the next-token
    prediction at the last position, and scores see the last-position logits; the whole
    ``[B, T, V]`` output of the serving variant is returned.

    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> ctrl = Controller(net, ["w8a8", "fp32"], backend="simulate",
    ...                   example_input=torch.randn(8, 16))
    >>> ctrl(torch.randn(3, 16)).shape
    torch.Size([3, 4])
    >>> ctrl.audit["variant"].tolist()  # uncalibrated: everything escalated to the reference
    [1, 1, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        plans: Sequence[PrecisionPlan | Mapping[str, str] | str],
        *,
        backend: str | Backend = "cpu",
        scorer: ScorerLike = "ratio",
        example_input: Any = None,
        calib: Sequence[Any] | None = None,
        order: str = "cost",
        audit_size: int = 100_000,
        audit_sink: str | Path | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "The 'model' argument must be a torch.nn.Module. "
                f"Got {type(model).__name__} instead."
            )
        if isinstance(plans, (str, PrecisionPlan, Mapping)) or not isinstance(plans, Sequence):
            raise invalid("plans", plans, "a non-empty list of PrecisionPlans (or scheme names)")
        if not plans:
            raise invalid("plans", plans, "a non-empty list of PrecisionPlans")
        if order not in ("cost", "given"):
            raise invalid("order", order, "'cost' or 'given'")
        self.scorer = make_scorer(scorer)
        impl = get_backend(backend)
        model.eval()
        # Validate every plan before quantizing any (clear errors before work).
        parsed = [as_plan(p, argument=f"plans[{i}]") for i, p in enumerate(plans)]
        assignments = [p.resolve(model) for p in parsed]
        for i, assignment in enumerate(assignments):
            try:
                check_assignment(model, assignment, impl)
            except ValueError as exc:
                raise ValueError(f"plans[{i}]: {exc}") from None
        self.backend = impl.name
        variants: list[Variant] = []
        seen: dict[tuple[tuple[str, str], ...], int] = {}
        names: Counter[str] = Counter()
        for plan, assignment in zip(parsed, assignments, strict=True):
            key = tuple(sorted(assignment.items()))
            if key in seen:
                continue
            seen[key] = len(variants)
            shared = all(s == "fp32" for s in assignment.values())
            module = model if shared else quantize(model, plan, backend=impl, calib=calib)
            module.eval()
            label = str(plan.metadata.get("name") or plan_label(assignment))
            names[label] += 1
            if names[label] > 1:
                label = f"{label}#{names[label]}"
            variants.append(Variant(label, plan, assignment, module, math.nan, shared))
        self._example = example_input
        self._out_dtype: torch.dtype | None = None
        if example_input is not None:
            variants = self._measure(variants, example_input)
            if order == "cost":
                variants.sort(key=lambda v: v.cost_ms)  # stable: ties keep the given order
            with torch.inference_mode():
                ref = output_tensor(run_model(model, example_input))
            self._out_dtype = ref.dtype if ref.is_floating_point() else None
        self.variants: tuple[Variant, ...] = tuple(variants)
        self._rule = self._make_rule(-math.inf, 0)
        self.report: CalibrationReport | None = None
        k = len(self.variants)
        columns = [
            "input_id",
            "call_id",
            "position",
            "batch_size",
            "variant",
            "plan",
            "passes",
            *[f"score_{i}" for i in range(k - 1)],
            "threshold",
            "thresholds_version",
            "latency_ms",
            "cost_ms",
            "inference_ms",
            "decision_ms",
        ]
        self._audit = AuditLog(
            columns, max_rows=audit_size, sink=audit_sink, expand=self._audit_rows
        )
        self._names = tuple(v.name for v in self.variants)
        self._next_id = 0
        self._next_call = 0
        self._totals: list[Any] = [0, 0, 0.0, 0.0]  # calls, samples, inference_s, decision_s

    # -- set-up ---------------------------------------------------------------------------------
    @staticmethod
    def _measure(variants: list[Variant], batch: Any) -> list[Variant]:
        n = max(1, batch_size(batch))
        return [
            Variant(
                v.name, v.plan, v.assignment, v.module, time_module(v.module, batch) / n, v.shared
            )
            for v in variants
        ]

    def _make_rule(self, threshold: float, version: int) -> _Rule:
        scorer = self.scorer
        fast = getattr(scorer, "one_fn", None)  # a FunctionScorer's: raw values if it has a link
        cut = None if scorer.link is None else cut_point(scorer.link, threshold)
        if cut is not None:
            return (threshold, version, cut, scorer.link, scorer.raw_one, scorer.raw_list, fast)
        # no link, or no raw value at or below the threshold: decide on the scores themselves
        fast = fast if scorer.link is None else None
        return (threshold, version, threshold, None, scorer.score_one, scorer.score_list, fast)

    @property
    def threshold(self) -> float:
        """The escalation threshold in force (an input is escalated when its score is above it)."""
        return self._rule[0]

    @property
    def thresholds_version(self) -> int:
        """Incremented each time the thresholds change (recorded in every audit row)."""
        return self._rule[1]

    def set_threshold(self, threshold: float) -> None:
        """Set the shared escalation threshold by hand (``-inf``: always escalate).

        >>> ctrl.set_threshold(0.2)  # doctest: +SKIP
        """
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or threshold != threshold
        ):
            raise invalid("threshold", threshold, "a number (-inf and inf allowed)")
        self._rule = self._make_rule(float(threshold), self._rule[1] + 1)

    # -- serving --------------------------------------------------------------------------------
    def __call__(self, x: Any) -> Any:
        """Serve one batch: cheapest variant first, escalating only the hard inputs.

        Returns the same type and shape as ``model(x)``. Runs under ``torch.inference_mode``
        (entering it only when the caller has not: a serving loop inside one saves that cost).
        """
        if torch.is_inference_mode_enabled():
            return self._serve(x)
        with torch.inference_mode():
            return self._serve(x)

    def _serve(self, x: Any) -> Any:
        # Every call and conversion here runs right after a pass that flushed the caches (a
        # few us each on small models), so the path is kept to the few it needs.
        clock = time.perf_counter
        start = clock()
        n = (x.shape[0] if x.ndim else 1) if type(x) is Tensor else batch_size(x)
        rule = self._rule
        cut, link, one, fast = rule[2], rule[3], rule[4], rule[6]
        variants = self.variants
        last = len(variants) - 1
        # per stage reached: (rows of x that ran it, or None for all; seconds per row; scores;
        # the link still to apply to them)
        stages: list[tuple[Any, float, Any, Any]] = []
        decide = 0.0
        t0 = clock()
        out = run_model(variants[0].module, x)
        t1 = clock()
        infer = stage_time = t1 - t0
        final = out
        rows: np.ndarray | None = None  # rows of x still in the cascade (None: all)
        k = 0
        while k < last:  # (a for loop's range costs ~2 us more right after the pass)
            logits = out if type(out) is Tensor and out.ndim == 2 else answer_logits(out)
            m = n if rows is None else len(rows)
            if m == 1:
                s = fast(logits) if fast is not None else one(logits, k)
                if s != s:
                    check_scores(torch.tensor([s]), 1, self.scorer.name)  # raises the NaN error
                pos = _ALL if s > cut else None
                lk = link
            else:
                s, pos, lk = _hard_rows(self.scorer, logits, k, m, rule)
            if pos is None:
                decide += clock() - t1
                stages.append((rows, stage_time / (m or 1), s, lk))
                break
            stages.append((rows, stage_time / m, s, lk))
            if pos is not _ALL:
                rows = pos if rows is None else rows[pos]
            index = None if rows is None else torch.from_numpy(rows)
            sub = x if index is None else _take(x, index, n)
            t2 = clock()
            decide += t2 - t1
            out = run_model(variants[k + 1].module, sub)
            t1 = clock()
            stage_time = t1 - t2
            infer += stage_time
            final = out if index is None else _scatter(final, index, out, n)
            k += 1
        else:  # the last variant ran (on ``rows``)
            m = n if rows is None else len(rows)
            stages.append((rows, stage_time / (m or 1), None, None))
        if self._out_dtype is not None:
            final = _cast(final, self._out_dtype)
        latency = clock() - start
        with self._audit.lock:
            call_id, first_id = self._next_call, self._next_id
            self._next_call, self._next_id = call_id + 1, first_id + n
            self._audit.append_locked(
                n, (call_id, first_id, n, stages, rule[0], rule[1], latency, infer, decide)
            )
            totals = self._totals
            totals[0] += 1
            totals[1] += n
            totals[2] += infer
            totals[3] += decide
        return final

    def _audit_rows(self, record: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The audit rows of one served call (expanded only when the log is read or written)."""
        call_id, first_id, n, stages, threshold, version, latency, infer, decide = record
        served = np.zeros(n, dtype=np.int64)
        cost = np.zeros(n)
        scores = np.full((len(self._names) - 1, n), math.nan)
        for k, (rows, per_row, s, link) in enumerate(stages):
            where = slice(None) if rows is None else rows
            served[where] = k
            cost[where] += per_row * 1e3
            if link is not None:
                s = [link(v) for v in s] if isinstance(s, list) else link(s)
            if s is not None:
                scores[k, where] = np.asarray(s, dtype=np.float64)
        served_list = served.tolist()
        cost_list = cost.tolist()
        score_cols = scores.tolist()
        names = self._names
        tail = (threshold, version, latency * 1e3)
        infer_ms, decide_ms = infer * 1e3, decide * 1e3
        return [
            (
                first_id + i,
                call_id,
                i,
                n,
                served_list[i],
                names[served_list[i]],
                served_list[i] + 1,
                *(col[i] for col in score_cols),
                *tail,
                cost_list[i],
                infer_ms,
                decide_ms,
            )
            for i in range(n)
        ]

    @property
    def audit(self) -> pd.DataFrame:
        """Every decision kept in memory: one row per served input (oldest first).

        Columns: ``input_id`` (global counter), ``call_id``, ``position`` in the batch,
        ``batch_size``, ``variant`` (index) and ``plan`` (its name), ``passes`` run,
        ``score_k`` per stage (NaN where not reached), ``threshold``, ``thresholds_version``,
        ``latency_ms`` (the whole call), ``cost_ms`` (this input's share of the passes),
        ``inference_ms`` and ``decision_ms`` (the whole call's time in the variants and in
        scoring + routing).
        """
        return self._audit.frame()

    @property
    def audit_log(self) -> AuditLog:
        """The underlying ring buffer (``clear()``, ``close()``, ``total``)."""
        return self._audit

    @property
    def overhead(self) -> dict[str, float]:
        """Time spent in inference vs in decisions (scoring + routing) since construction.

        >>> ctrl.overhead["decision_share"]  # doctest: +SKIP
        0.004
        """
        with self._audit.lock:
            s = dict(
                zip(("calls", "samples", "inference_s", "decision_s"), self._totals, strict=True)
            )
        s["decision_share"] = s["decision_s"] / s["inference_s"] if s["inference_s"] else math.nan
        return s

    # -- calibration ----------------------------------------------------------------------------
    def stage_outputs(self, data: Any) -> list[Tensor]:
        """Per-input logits ``[N, C]`` of **every** variant on ``data`` (for calibration only)."""
        batches = as_batches(data, argument="data")
        per_variant: list[list[Tensor]] = [[] for _ in self.variants]
        with torch.inference_mode():
            for batch in batches:
                for k, v in enumerate(self.variants):
                    per_variant[k].append(answer_logits(run_model(v.module, batch)).float())
        return [torch.cat(chunks) for chunks in per_variant]

    def calibrate(
        self,
        data: Any,
        *,
        max_disagreement: float | None = None,
        delta: float = 0.1,
        labels: Sequence[Tensor] | None = None,
        max_quality_drop: float | None = None,
        method: str = "binomial",
        fit_fraction: float | None = None,
        grid: Sequence[float] | None = None,
        seed: int = 0,
        outputs: Sequence[Tensor] | None = None,
        test_size: int | None = None,
    ) -> CalibrationReport:
        """Choose the threshold so that, w.p. ``>= 1 - delta``, the served answers meet the target.

        ``max_disagreement`` (default 0.005 when no other target is given) bounds the rate at
        which the served answer differs from the reference (last) variant's answer;
        ``max_quality_drop`` (needs ``labels``, aligned batch by batch with ``data``) bounds
        the rate of inputs the served variant gets wrong while the reference gets right, which
        bounds the accuracy drop. Both may be given. The guarantee (Learn-then-Test, fixed
        sequence over a fixed grid) assumes future inputs are i.i.d. with ``data`` and bounds
        the rate over the input distribution; ``test_size=m`` bounds instead the empirical rate
        over the next ``m`` inputs served, which must be exchangeable with ``data`` (an exact
        hypergeometric test, slightly stricter: see :mod:`mpsearch.runtime._calibration`).
        Learned or unbounded scorers are fitted on a ``fit_fraction`` share of ``data``
        (default 0.3; 0 for the built-in fixed scorers) and tested on the rest. ``outputs``
        may pass the per-variant logits of :meth:`stage_outputs` on ``data`` to reuse them
        across calls (e.g. a sweep of targets) instead of running every variant again.

        >>> report = ctrl.calibrate(calib, max_disagreement=0.01, delta=0.1)  # doctest: +SKIP
        >>> report.share  # doctest: +SKIP
        {'w8a8': 0.93, 'bf16': 0.07}
        """
        if max_disagreement is None and max_quality_drop is None:
            max_disagreement = 0.005
        targets: dict[str, float] = {}
        if max_disagreement is not None:
            check_fraction("max_disagreement", max_disagreement)
            targets["disagreement"] = float(max_disagreement)
        if max_quality_drop is not None:
            check_fraction("max_quality_drop", max_quality_drop)
            if labels is None:
                raise ValueError(
                    "The 'max_quality_drop' target needs labels: pass labels=[...] aligned batch "
                    "by batch with the calibration data, or use max_disagreement instead."
                )
            targets["quality_drop"] = float(max_quality_drop)
        check_fraction("delta", delta)
        if method not in PVALUES:
            raise unknown("method", method, PVALUES)
        check_test_size(test_size, method)
        learned = self.scorer.learned or not self.scorer.bounded
        if fit_fraction is None:
            fit_fraction = 0.3 if learned else 0.0
        if learned:
            check_fraction("fit_fraction", fit_fraction)
        else:
            check_fraction("fit_fraction", fit_fraction, open_low=False)
        batches = as_batches(data, argument="data")
        label_array = self._labels(labels, batches) if labels is not None else None

        if outputs is None:
            logits = self.stage_outputs(batches)
        else:
            n_data = sum(batch_size(b) for b in batches)
            logits = list(outputs) if isinstance(outputs, (list, tuple)) else []
            if len(logits) != len(self.variants) or any(
                not isinstance(lg, Tensor) or lg.dim() != 2 or lg.shape[0] != n_data
                for lg in logits
            ):
                raise invalid(
                    "outputs",
                    outputs,
                    f"the {len(self.variants)} per-variant logits [N={n_data}, C] returned by "
                    "stage_outputs(data)",
                )
            logits = [lg.float() for lg in logits]
        n = int(logits[0].shape[0])
        answers = np.stack([lg.argmax(-1).numpy() for lg in logits])
        if label_array is not None and label_array.shape[0] != n:
            raise invalid("labels", f"{label_array.shape[0]} labels", f"{n} labels (one per input)")
        order = np.random.default_rng(seed).permutation(n)
        n_fit = round(fit_fraction * n)
        if n - n_fit < 1:
            raise invalid("fit_fraction", fit_fraction, "a share leaving inputs to test")
        fit_idx, test_idx = np.sort(order[:n_fit]), np.sort(order[n_fit:])
        k = len(self.variants)
        if self.scorer.learned:
            if n_fit == 0:
                raise invalid("fit_fraction", fit_fraction, "a share leaving inputs to fit")
            reference = answers[-1]
            self.scorer.fit(
                [logits[s][fit_idx] for s in range(k - 1)],
                [
                    (answers[s][fit_idx] != reference[fit_idx]).astype(np.float64)
                    for s in range(k - 1)
                ],
            )
        stage_scores = (
            np.stack(
                [
                    check_score_array(
                        self.scorer.score_array(logits[s].numpy(), s), n, self.scorer.name
                    ).astype(np.float64)
                    for s in range(k - 1)
                ]
            )
            if k > 1
            else np.zeros((0, n))
        )
        if grid is not None:
            grid_arr = np.concatenate([[-np.inf], np.sort(np.asarray(grid, dtype=np.float64))])
            grid_arr = np.unique(grid_arr)
        elif self.scorer.bounded and not self.scorer.learned:
            grid_arr = default_grid()
        else:  # learned or unbounded scores: thresholds at the fit split's score quantiles
            grid_arr = quantile_grid(stage_scores[:, fit_idx], levels=1000)
        test_labels = None if label_array is None else label_array[test_idx]
        result = learn_then_test(
            stage_scores[:, test_idx],
            answers[:, test_idx],
            targets=targets,
            delta=delta,
            grid=grid_arr,
            labels=test_labels,
            method=method,
            test_size=test_size,
        )
        costs = self._costs(batches[0])
        served = served_stage(stage_scores[:, test_idx], result.threshold)
        share = np.bincount(served, minlength=k) / len(test_idx)
        disagreement = float(losses(answers[:, test_idx], served, None, "disagreement").mean())
        drop = None
        if test_labels is not None:
            ref_acc = float((answers[-1, test_idx] == test_labels).mean())
            got = answers[served, test_idx]
            drop = ref_acc - float((got == test_labels).mean())
        self._rule = self._make_rule(result.threshold, self._rule[1] + 1)
        pv = float(result.table["pvalue"].iloc[result.index - 1]) if result.index > 0 else None
        self.report = CalibrationReport(
            threshold=result.threshold,
            thresholds=(result.threshold,) * (k - 1),
            certified=result.certified,
            targets=targets,
            delta=float(delta),
            method=method,
            scorer=self.scorer.name,
            version=self._rule[1],
            n_calibration=n,
            n_fit=n_fit,
            n_test=len(test_idx),
            variants=tuple(v.name for v in self.variants),
            share={v.name: float(s) for v, s in zip(self.variants, share, strict=True)},
            expected_cost_ms=float(cascade_cost(served, costs).mean()),
            reference_cost_ms=float(costs[-1]),
            variant_costs_ms={v.name: float(c) for v, c in zip(self.variants, costs, strict=True)},
            empirical_disagreement=disagreement,
            empirical_quality_drop=drop,
            pvalue=pv,
            table=result.table,
            test_size=test_size,
        )
        return self.report

    def _labels(self, labels: Sequence[Tensor], batches: list[Any]) -> np.ndarray:
        if isinstance(labels, Tensor) or not isinstance(labels, Sequence):
            raise invalid("labels", labels, "a list of label tensors aligned with the batches")
        if len(labels) != len(batches):
            raise invalid("labels", f"{len(labels)} batches", f"{len(batches)} label batches")
        out = []
        for y in labels:
            y = torch.as_tensor(y)
            out.append((y[:, -1] if y.dim() == 2 else y).reshape(-1).numpy())
        return np.concatenate(out)

    def _costs(self, batch: Any) -> list[float]:
        if any(math.isnan(v.cost_ms) for v in self.variants):
            self.variants = tuple(self._measure(list(self.variants), batch))
        return [v.cost_ms for v in self.variants]

    def __repr__(self) -> str:
        names = ", ".join(v.name for v in self.variants)
        return (
            f"Controller([{names}], backend={self.backend!r}, scorer={self.scorer.name!r}, "
            f"threshold={self._rule[0]:g})"
        )
