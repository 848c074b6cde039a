"""``Controller``: serve each input with the cheapest variant that is good enough for it.

The variants (quantized copies of one model, one per plan) form a cascade: the cheaper stages
ordered by measured cost, then the reference the user names (by default the full-precision
model). An input runs through the cheapest stage; its difficulty score decides whether it is
served there or escalated to the next one (an escalated input pays both passes). Inside a
batch only the hard inputs are re-run. Thresholds are calibrated with Learn-then-Test (see
:mod:`mpsearch.runtime._calibration`) against the reference's answers, and every decision is
audited.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from mpsearch._data import as_batches, batch_size, is_multi_label, output_tensor, run_model
from mpsearch._validation import InvalidTypeError, check_fraction, invalid, unknown
from mpsearch.backends import get_backend, quantize
from mpsearch.backends._quantize import as_plan, check_assignment
from mpsearch.backends._registry import Backend
from mpsearch.cost._timing import clock, median_ms
from mpsearch.plan import PrecisionPlan
from mpsearch.rounding import Rounder
from mpsearch.runtime._audit import AuditLog
from mpsearch.runtime._calibration import (
    CalibrateOptions,
    CalibrationReport,
    LTTResult,
    cascade_cost,
    default_grid,
    learn_then_test,
    losses,
    quantile_grid,
    served_stage,
)
from mpsearch.runtime._scorers import (
    POSITION_REDUCTIONS,
    Scorer,
    answer_logits,
    checked_scores,
    input_scores,
    log_cut,
    make_scorer,
    score_stages,
    stage_answers,
)

ScorerLike = str | Scorer | Callable[[Tensor], Tensor]
PlanLike = PrecisionPlan | Mapping[str, str] | str


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


def time_module(module: nn.Module, batch: Any, *, repeats: int = 3) -> float:
    """Median wall time (ms) of ``module`` on ``batch`` after one warm-up call.

    >>> time_module(nn.Linear(4, 4), torch.zeros(2, 4)) >= 0
    True
    """
    return median_ms(lambda: run_model(module, batch), repeats=repeats, warmup=1, timer="wall")


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
    """Write ``part`` (outputs for rows ``index``) into ``full`` (outputs for all ``n`` rows),
    keeping the output's own type (dicts, tuples, ``ModelOutput``: any pytree). Per-row
    tensors take the escalated rows; whatever has no row per input (a cache object, a scalar)
    cannot hold a mix of two variants and is dropped (``None``)."""

    def write(f: Any, p: Any) -> Any:
        if isinstance(f, Tensor) and f.ndim and f.shape[0] == n and isinstance(p, Tensor):
            f[index] = p.to(f.dtype)
            return f
        return None

    # a bare tensor skips pytree's ~1.7 us walk: this runs on every partly escalated call
    return write(full, part) if isinstance(full, Tensor) else pytree.tree_map(write, full, part)


def _cast(output: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of ``output`` in ``dtype``, keeping the output's own type."""
    if dtype is None:
        return output

    def cast(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    # every served call ends here: a bare tensor skips pytree's walk
    return cast(output) if isinstance(output, Tensor) else pytree.tree_map(cast, output)


class _Rule(NamedTuple):
    """The thresholds in force, read once per call: at stage ``k`` an input is escalated when
    its entry of ``values[k](logits)`` is not ``<= cut`` (the scores, or their logarithms with
    ``cut = log_cut(threshold)``; ``to_score`` maps them back for the audit)."""

    threshold: float
    version: int
    cut: float
    values: tuple[Callable[[Tensor], list[float]], ...]
    to_score: Callable[[float], float] | None


class _Stage(NamedTuple):
    """One stage of one call: the rows that ran it (``None``: all), their time per row, and
    the values the decision read (``None`` at the last stage)."""

    rows: np.ndarray | None
    seconds_per_row: float
    values: list[float] | None
    to_score: Callable[[float], float] | None


class _Call(NamedTuple):
    """What the audit keeps of one served call (expanded into rows only when read)."""

    call_id: int
    first_id: int
    size: int
    stages: list[_Stage]
    threshold: float
    version: int
    latency_s: float
    inference_s: float
    decision_s: float


@dataclass(slots=True)
class _Totals:
    calls: int = 0
    samples: int = 0
    inference_s: float = 0.0
    decision_s: float = 0.0


def _hard_rows(values: list[float], m: int, cut: float, scorer: str) -> list[int]:
    """Positions whose value is above ``cut``; refuses values that are not ``m`` numbers."""
    if len(values) != m:
        raise ValueError(
            f"The scorer {scorer!r} must return a tensor of shape [{m}] (one score per input, "
            f"higher = harder). Got {len(values)} values instead."
        )
    if m == 1:
        hard = [] if values[0] <= cut else [0]  # NaN lands in hard (as below)
    else:
        hard = [i for i, v in enumerate(values) if not v <= cut]
    if hard and any(values[i] != values[i] for i in hard):
        raise ValueError(
            f"The scorer {scorer!r} returned NaN scores; a scorer must return numbers "
            "(higher = harder; +inf always escalates)."
        )
    return hard


def _audit_columns(stages: int) -> list[str]:
    return [
        "input_id",
        "call_id",
        "position",
        "batch_size",
        "variant",
        "plan",
        "passes",
        *[f"score_{i}" for i in range(stages - 1)],
        "threshold",
        "thresholds_version",
        "latency_ms",
        "cost_ms",
        "inference_ms",
        "decision_ms",
    ]


def _check_arguments(model: Any, plans: Any, order: str) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    if isinstance(plans, (str, PrecisionPlan, Mapping)) or not isinstance(plans, Sequence):
        raise invalid("plans", plans, "a non-empty list of PrecisionPlans (or scheme names)")
    if not plans:
        raise invalid("plans", plans, "a non-empty list of PrecisionPlans")
    if order not in ("cost", "given"):
        raise invalid("order", order, "'cost' or 'given'")


class Controller:
    """Per-input precision switching: a cascade of quantized variants with calibrated thresholds.

    ``plans`` are the cheaper stages, quantized once on ``backend`` (identical plans share one
    variant); ``reference`` is the model the served answers are certified against: a plan
    (default: the full-precision model itself, ``model`` unchanged), always the last stage,
    never chosen by timing. A plan equal to the reference is the reference. With an
    ``example_input`` every stage is timed; ``order="cost"`` (the default) sorts the cheaper
    stages by that cost and drops, with a warning, any measured slower than the reference
    (``order="given"`` keeps the given order and only warns). Plans with calibrated roundings
    (``"w4a16+gptq"``) take their weights from ``rounder`` (e.g. the profile's), or from one
    built on ``calib``, shared by the variants.

    An input runs through the cheapest stage; ``scorer`` turns its per-input logits into a
    difficulty score (**higher = harder**: ``ratio`` (the default) is ``p2 / p1``,
    ``max_softmax`` ``1 - p_max``, ``margin`` ``1 - (p1 - p2)``, ``entropy`` the normalised
    entropy, ``gate`` a logistic regression fitted during calibration, or any callable
    ``logits [B, C] -> scores [B]`` following the same convention); when the score is above
    the threshold the input is re-run on the next stage. Until :meth:`calibrate` is called the
    threshold is ``-inf``: every input is escalated, so the served answer is the reference's.

    For language-model outputs ``[B, T, V]`` the per-input answer is the next-token
    prediction at the last position, and scores see the last-position logits; the whole
    ``[B, T, V]`` output of the serving variant is returned. For dense outputs (a
    segmentation model's per-pixel ``logits`` / ``out`` ``[B, C, H, W]``) an input's score is
    the mean of the scorer's per-pixel scores, and it agrees with the reference when at least
    ``min_agreement`` of its pixels take the reference's arg-max (the rate calibration bounds
    is then the share of inputs below that); so are the tokens of a token classifier's
    ``[B, T, C]`` (Hugging Face ``TokenClassifierOutput``), padding included, and the labels
    of a multi-label classifier's ``[B, L]`` logits (``multi_label``: ``None`` reads it from
    a Hugging Face ``config.problem_type``, :func:`~mpsearch._data.is_multi_label`), each a
    position whose answer is ``logit > 0`` and whose two-class scores are its sigmoid: with
    fewer than 100 labels the default ``min_agreement`` asks for the reference's very label set,
    and the input's score is its least certain label's. ``reduce`` sets how a dense input's
    score comes from its positions' (``"mean"`` or ``"max"``,
    :data:`~mpsearch.runtime._scorers.POSITION_REDUCTIONS`; ``None``: the max for a multi-label
    classifier, else the mean).

    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> ctrl = Controller(net, ["w8a8"], backend="simulate", order="given")
    >>> [v.name for v in ctrl.variants]  # the reference, fp32, comes last
    ['w8a8', 'fp32']
    >>> ctrl(torch.randn(3, 16)).shape
    torch.Size([3, 4])
    >>> ctrl.audit["variant"].tolist()  # uncalibrated: everything escalated to the reference
    [1, 1, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        plans: Sequence[PlanLike],
        *,
        backend: str | Backend = "cpu",
        scorer: ScorerLike = "ratio",
        reference: PlanLike | None = None,
        example_input: Any = None,
        calib: Sequence[Any] | None = None,
        order: str = "cost",
        audit_size: int = 100_000,
        audit_sink: str | Path | None = None,
        rounder: Rounder | None = None,
        min_agreement: float = 0.99,
        multi_label: bool | None = None,
        reduce: str | None = None,
    ) -> None:
        _check_arguments(model, plans, order)
        check_fraction("min_agreement", min_agreement, open_high=False)
        if multi_label not in (None, True, False):
            raise invalid(
                "multi_label", multi_label, "None (from the model's config), True or False"
            )
        self.min_agreement = float(min_agreement)
        if reduce is not None and reduce not in POSITION_REDUCTIONS:
            raise unknown("reduce", reduce, ["None", *POSITION_REDUCTIONS])
        self.multi_label = is_multi_label(model) if multi_label is None else multi_label
        self.reduce = reduce or ("max" if self.multi_label else "mean")
        self.scorer = make_scorer(scorer)
        impl = get_backend(backend)
        self.backend = impl.name
        model.eval()
        variants = self._build_variants(model, plans, reference, impl, calib, rounder)
        self._out_dtype: torch.dtype | None = None
        if example_input is not None:
            variants = self._measure(variants, example_input)
            variants = _order_stages(variants, drop_slower=order == "cost")
            with torch.inference_mode():
                ref = output_tensor(run_model(model, example_input))
            self._out_dtype = ref.dtype if ref.is_floating_point() else None
        self.variants: tuple[Variant, ...] = tuple(variants)
        self._names = tuple(v.name for v in self.variants)
        self._rule = self._make_rule(-math.inf, 0)
        self.report: CalibrationReport | None = None
        self._audit = AuditLog(
            _audit_columns(len(self.variants)),
            max_rows=audit_size,
            sink=audit_sink,
            expand=self._audit_rows,
        )
        self._next_id = 0
        self._next_call = 0
        self._totals = _Totals()
        self._clock = clock("wall")  # waits for an accelerator's queued work before each read

    # -- set-up ---------------------------------------------------------------------------------
    @staticmethod
    def _build_variants(
        model: nn.Module,
        plans: Sequence[PlanLike],
        reference: PlanLike | None,
        impl: Backend,
        calib: Sequence[Any] | None,
        rounder: Rounder | None,
    ) -> list[Variant]:
        """Validate every plan (and the reference) before quantizing any, then build the
        cheaper stages in the given order and the reference last."""
        parsed = [as_plan(p, argument=f"plans[{i}]") for i, p in enumerate(plans)]
        ref_plan = (
            PrecisionPlan.uniform("fp32")
            if reference is None
            else as_plan(reference, argument="reference")
        )
        arguments = [f"plans[{i}]" for i in range(len(parsed))] + ["reference"]
        assignments = [p.resolve_choices(model) for p in [*parsed, ref_plan]]
        for argument, plan in zip(arguments, [*parsed, ref_plan], strict=True):
            try:
                check_assignment(model, plan.resolve(model), impl)
            except ValueError as exc:
                raise ValueError(f"{argument}: {exc}") from None
        if rounder is None and calib is not None and any(p.rounds for p in [*parsed, ref_plan]):
            rounder = Rounder(model, calib)  # shared: each layer rounded once
        ref_key = tuple(sorted(assignments[-1].items()))
        seen: set[tuple[tuple[str, str], ...]] = {ref_key}
        stages: list[tuple[PrecisionPlan, dict[str, str]]] = []
        for plan, assignment in zip(parsed, assignments, strict=False):
            key = tuple(sorted(assignment.items()))
            if key not in seen:
                seen.add(key)
                stages.append((plan, assignment))
        stages.append((ref_plan, assignments[-1]))
        names: Counter[str] = Counter()
        variants = []
        for plan, assignment in stages:
            shared = all(s == "fp32" for s in assignment.values())
            module = (
                model
                if shared
                else quantize(model, plan, backend=impl, calib=calib, rounder=rounder)
            )
            module.eval()
            label = str(plan.metadata.get("name") or plan_label(assignment))
            names[label] += 1
            if names[label] > 1:
                label = f"{label}#{names[label]}"
            variants.append(Variant(label, plan, assignment, module, math.nan, shared))
        return variants

    @staticmethod
    def _measure(variants: Sequence[Variant], batch: Any) -> list[Variant]:
        n = max(1, batch_size(batch))
        return [dataclasses.replace(v, cost_ms=time_module(v.module, batch) / n) for v in variants]

    def _make_rule(self, threshold: float, version: int) -> _Rule:
        scorer, stages = self.scorer, range(len(self.variants) - 1)
        cut = log_cut(threshold) if scorer.fast_is_log else threshold
        if cut is None:  # a negative threshold: decide on the scores themselves
            values = tuple(partial(_checked_floats, scorer, stage=k) for k in stages)
            return _Rule(threshold, version, threshold, values, None)
        fast = getattr(scorer, "fast_fn", None)  # a function scorer's: the same at every stage
        values = tuple(fast or partial(scorer.fast, stage=k) for k in stages)
        return _Rule(threshold, version, cut, values, math.exp if scorer.fast_is_log else None)

    @property
    def threshold(self) -> float:
        """The escalation threshold in force (an input is escalated when its score is above it)."""
        return self._rule.threshold

    @property
    def thresholds_version(self) -> int:
        """Incremented each time the thresholds change (recorded in every audit row)."""
        return self._rule.version

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
        self._rule = self._make_rule(float(threshold), self._rule.version + 1)

    # -- serving --------------------------------------------------------------------------------
    def __call__(self, x: Any) -> Any:
        """Serve one batch: cheapest variant first, escalating only the hard inputs.

        Returns the same type and shape as ``model(x)``. Runs under ``torch.inference_mode``
        (entering it only when the caller has not).
        """
        if torch.is_inference_mode_enabled():
            return self._serve(x)
        with torch.inference_mode():
            return self._serve(x)

    def _serve(self, x: Any) -> Any:
        clock = self._clock
        start = clock()
        rule, variants = self._rule, self.variants
        n = batch_size(x)
        out = run_model(variants[0].module, x)
        t1 = clock()
        inference = stage_time = t1 - start
        decision = 0.0
        final, rows, stages, served = out, None, [], x
        for k in range(len(variants) - 1):
            m = n if rows is None else len(rows)
            plain = type(out) is Tensor and out.ndim == 2 and not self.multi_label
            logits = (
                out if plain else answer_logits(out, multi_label=self.multi_label, batch=served)
            )
            if logits.ndim == 2:
                values, cut, to_score = rule.values[k](logits), rule.cut, rule.to_score
            else:  # dense: the mean per-position scores against the threshold itself
                values, cut, to_score = self._dense_scores(logits, k), rule.threshold, None
            hard = _hard_rows(values, m, cut, self.scorer.name)
            if not hard:
                decision += clock() - t1
                stages.append(_Stage(rows, stage_time / max(m, 1), values, to_score))
                break
            stages.append(_Stage(rows, stage_time / m, values, to_score))
            if len(hard) < m:
                picked = np.asarray(hard, dtype=np.int64)
                rows = picked if rows is None else rows[picked]
            index = None if rows is None else torch.from_numpy(rows)
            t2 = clock()
            decision += t2 - t1
            served = x if index is None else _take(x, index, n)
            out = run_model(variants[k + 1].module, served)
            t1 = clock()
            stage_time = t1 - t2
            inference += stage_time
            final = out if index is None else _scatter(final, index, out, n)
        else:  # the last stage ran (on ``rows``)
            m = n if rows is None else len(rows)
            stages.append(_Stage(rows, stage_time / max(m, 1), None, None))
        if self._out_dtype is not None:
            final = _cast(final, self._out_dtype)
        self._record(n, stages, rule, clock() - start, inference, decision)
        return final

    def _record(
        self,
        n: int,
        stages: list[_Stage],
        rule: _Rule,
        latency: float,
        inference: float,
        decision: float,
    ) -> None:
        with self._audit.lock:
            call_id, first_id = self._next_call, self._next_id
            self._next_call, self._next_id = call_id + 1, first_id + n
            call = _Call(
                call_id,
                first_id,
                n,
                stages,
                rule.threshold,
                rule.version,
                latency,
                inference,
                decision,
            )
            self._audit.append_locked(n, call)
            totals = self._totals
            totals.calls += 1
            totals.samples += n
            totals.inference_s += inference
            totals.decision_s += decision

    def _audit_rows(self, call: _Call) -> list[tuple[Any, ...]]:
        """The audit rows of one served call (expanded only when the log is read or written)."""
        n = call.size
        served = np.zeros(n, dtype=np.int64)
        cost = np.zeros(n)
        scores = np.full((len(self._names) - 1, n), math.nan)
        for k, stage in enumerate(call.stages):
            where = slice(None) if stage.rows is None else stage.rows
            served[where] = k
            cost[where] += stage.seconds_per_row * 1e3
            if stage.values is not None:
                values = stage.values
                if stage.to_score is not None:
                    values = [stage.to_score(v) for v in values]
                scores[k, where] = np.asarray(values, dtype=np.float64)
        served_list, cost_list, score_cols = served.tolist(), cost.tolist(), scores.tolist()
        tail = (call.threshold, call.version, call.latency_s * 1e3)
        inference_ms, decision_ms = call.inference_s * 1e3, call.decision_s * 1e3
        return [
            (
                call.first_id + i,
                call.call_id,
                i,
                n,
                served_list[i],
                self._names[served_list[i]],
                served_list[i] + 1,
                *(col[i] for col in score_cols),
                *tail,
                cost_list[i],
                inference_ms,
                decision_ms,
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
            s: dict[str, float] = dataclasses.asdict(self._totals)
        s["decision_share"] = s["decision_s"] / s["inference_s"] if s["inference_s"] else math.nan
        return s

    def _answer_logits(self, variant: Variant, batch: Any) -> Tensor:
        """:func:`~mpsearch.runtime._scorers.answer_logits` of ``variant`` on ``batch``."""
        output = run_model(variant.module, batch)
        return answer_logits(output, multi_label=self.multi_label, batch=batch)

    def _dense_scores(self, logits: Tensor, stage: int) -> list[float]:
        """The scores of dense logits ``[B, C, P]`` at ``stage``, from the per-position ones
        (checked there: their mean or max holds no NaN)."""
        return input_scores(self.scorer, logits, stage, reduce=self.reduce).tolist()

    # -- calibration ----------------------------------------------------------------------------
    def stage_outputs(self, data: Any) -> list[Tensor]:
        """Per-input logits ``[N, C]`` (dense outputs: ``[N, C, P]``, every position kept) of
        **every** variant on ``data`` (for calibration only), as float32 CPU tensors."""
        batches = as_batches(data, argument="data")
        per_variant: list[list[Tensor]] = [[] for _ in self.variants]
        with torch.inference_mode():
            for batch in batches:
                for k, v in enumerate(self.variants):
                    logits = self._answer_logits(v, batch)
                    per_variant[k].append(logits.detach().float().cpu())
        sizes = sorted({tuple(chunk.shape[1:]) for chunk in per_variant[-1]})
        if len(sizes) > 1:
            raise invalid(
                "data",
                f"batches whose outputs differ in size after the batch dimension ({sizes})",
                "batches of one output size (dense outputs are compared position by position: "
                "resize the images, or pad the sequences to one length)",
            )
        return [torch.cat(chunks) for chunks in per_variant]

    def stage_answers(self, stage_logits: Sequence[Tensor]) -> np.ndarray:
        """Per-input answers ``[K, N]`` from :meth:`stage_outputs`, each differing from the
        reference's (the last row) exactly where the input disagrees with the reference (dense
        outputs: fewer than ``min_agreement`` of its positions agree; see
        :func:`~mpsearch.runtime._scorers.stage_answers`)."""
        return stage_answers(stage_logits, min_agreement=self.min_agreement)

    def stage_arrays(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`stage_answers` and :meth:`stage_scores` of every variant on ``data``, computed
        batch by batch: only these ``[K, N]`` and ``[K - 1, N]`` arrays are kept, never the
        logits (a segmentation model's are ``C x H x W`` floats per input and variant), and
        dense outputs may differ in size between batches. What :meth:`calibrate` computes
        when it is given no ``outputs`` and its scorer is not learned.

        >>> answers, scores = ctrl.stage_arrays(calib)  # doctest: +SKIP
        """
        answers, scores, _ = self._stream(as_batches(data, argument="data"))
        return answers, scores

    def _stream(self, batches: list[Any]) -> tuple[np.ndarray, np.ndarray, bool]:
        answers, scores, dense = [], [], False
        with torch.inference_mode():
            for batch in batches:
                logits = [
                    self._answer_logits(v, batch).detach().float().cpu() for v in self.variants
                ]
                dense = logits[0].ndim == 3
                answers.append(self.stage_answers(logits))
                scores.append(self.stage_scores(logits))
        return np.concatenate(answers, axis=1), np.concatenate(scores, axis=1), dense

    def stage_scores(self, stage_logits: Sequence[Tensor]) -> np.ndarray:
        """The scorer's checked scores ``[K - 1, N]`` (float64) of the stages but the last,
        from :meth:`stage_outputs`: what calibration and the trade-off curves route on.

        >>> ctrl.stage_scores(ctrl.stage_outputs(calib)).shape  # doctest: +SKIP
        (1, 359)
        """
        n = int(stage_logits[0].shape[0]) if len(stage_logits) else 0
        if len(stage_logits) < 2:
            return np.zeros((0, n))
        return score_stages(self.scorer, stage_logits[:-1], reduce=self.reduce)

    def calibrate(
        self,
        data: Any,
        *,
        max_disagreement: float | None = None,
        delta: float | None = None,
        labels: Sequence[Tensor] | None = None,
        max_quality_drop: float | None = None,
        method: str | None = None,
        fit_fraction: float | None = None,
        grid: Sequence[float] | None = None,
        seed: int | None = None,
        outputs: Sequence[Tensor] | None = None,
        test_size: int | None = None,
        options: CalibrateOptions | None = None,
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
        across calls (e.g. a sweep of targets) instead of running every variant again; without
        them a fixed scorer's answers and scores are computed batch by batch
        (:meth:`stage_arrays`), no logits kept.
        ``options`` (a :class:`CalibrateOptions`) carries the same settings; keywords given
        here override its fields. When the test inputs are too few to certify the target even
        with no loss at all, the report's ``note`` says so and how many it needs.

        >>> report = ctrl.calibrate(calib, max_disagreement=0.01, delta=0.1)  # doctest: +SKIP
        >>> report.share  # doctest: +SKIP
        {'w8a8': 0.93, 'bf16': 0.07}
        """
        given = dict(
            max_disagreement=max_disagreement,
            delta=delta,
            max_quality_drop=max_quality_drop,
            method=method,
            fit_fraction=fit_fraction,
            grid=None if grid is None else tuple(grid),
            seed=seed,
            test_size=test_size,
        )
        opts = dataclasses.replace(
            options or CalibrateOptions(), **{k: v for k, v in given.items() if v is not None}
        )
        fit_share = self._fit_share(opts, labels)
        batches = as_batches(data, argument="data")
        logits: list[Tensor] = []
        if outputs is None and not self.scorer.learned:  # batch by batch: no logits kept
            answers, scores, dense = self._stream(batches)
        else:
            logits = self._calibration_logits(batches, outputs)
            answers, dense = self.stage_answers(logits), logits[0].ndim == 3
        if dense:
            self._check_dense(labels)
        n = answers.shape[1]
        label_array = None if labels is None else self._labels(labels, batches, n)
        fit_idx, test_idx = _split(n, fit_share, opts.seed)
        if logits:
            if self.scorer.learned:
                self._fit_scorer(logits, answers, fit_idx, fit_share)
            scores = self.stage_scores(logits)
        result = learn_then_test(
            scores[:, test_idx],
            answers[:, test_idx],
            targets=opts.targets,
            delta=opts.delta,
            grid=self._grid(opts, scores[:, fit_idx]),
            labels=None if label_array is None else label_array[test_idx],
            method=opts.method,
            test_size=opts.test_size,
        )
        self._rule = self._make_rule(result.threshold, self._rule.version + 1)
        self.report = self._report(opts, result, scores, answers, label_array, test_idx, batches)
        return self.report

    def _fit_share(self, opts: CalibrateOptions, labels: Any) -> float:
        """The share of the data that fits the scorer (after the checks that need the scorer)."""
        if opts.max_quality_drop is not None and labels is None:
            raise ValueError(
                "The 'max_quality_drop' target needs labels: pass labels=[...] aligned batch "
                "by batch with the calibration data, or use max_disagreement instead."
            )
        learned = self.scorer.learned or not self.scorer.bounded
        share = opts.fit_fraction if opts.fit_fraction is not None else 0.3 * learned
        if learned:
            check_fraction("fit_fraction", share)
        return share

    def _calibration_logits(self, batches: list[Any], outputs: Any) -> list[Tensor]:
        if outputs is None:
            return self.stage_outputs(batches)
        n_data = sum(batch_size(b) for b in batches)
        logits = list(outputs) if isinstance(outputs, (list, tuple)) else []
        if len(logits) != len(self.variants) or any(
            not isinstance(lg, Tensor)
            or lg.dim() not in (2, 3)
            or lg.shape[0] != n_data
            or lg.shape != logits[-1].shape
            for lg in logits
        ):
            raise invalid(
                "outputs",
                outputs,
                f"the {len(self.variants)} per-variant logits [N={n_data}, C] (dense: "
                "[N, C, P]) returned by stage_outputs(data)",
            )
        return [lg.detach().float().cpu() for lg in logits]

    def _check_dense(self, labels: Any) -> None:
        """Refuse what dense outputs do not support, naming what to use instead."""
        if labels is not None:
            raise invalid(
                "labels",
                "per-input labels",
                "none for a dense output (its answers are per-position maps): bound "
                "max_disagreement, the share of inputs below min_agreement, instead",
            )
        if self.scorer.learned:
            raise invalid(
                "scorer",
                self.scorer.name,
                "a fixed scorer for a dense output (ratio, max_softmax, margin, entropy or a "
                "callable): the learned gate reads per-input logits [N, C]",
            )

    def _fit_scorer(
        self, logits: list[Tensor], answers: np.ndarray, fit_idx: np.ndarray, fit_share: float
    ) -> None:
        if len(fit_idx) == 0:
            raise invalid("fit_fraction", fit_share, "a share leaving inputs to fit")
        reference = answers[-1, fit_idx]
        self.scorer.fit(
            [lg[fit_idx] for lg in logits[:-1]],
            [(a[fit_idx] != reference).astype(np.float64) for a in answers[:-1]],
        )

    def _grid(self, opts: CalibrateOptions, fit_scores: np.ndarray) -> np.ndarray:
        if opts.grid is not None:
            return np.unique(np.concatenate([[-np.inf], np.asarray(opts.grid, dtype=np.float64)]))
        if self.scorer.bounded and not self.scorer.learned:
            return default_grid()
        return quantile_grid(fit_scores, levels=1000)  # learned or unbounded scores

    def _report(
        self,
        opts: CalibrateOptions,
        result: LTTResult,
        scores: np.ndarray,
        answers: np.ndarray,
        label_array: np.ndarray | None,
        test_idx: np.ndarray,
        batches: list[Any],
    ) -> CalibrationReport:
        costs = self._costs(batches[0])
        k, n_test = len(self.variants), len(test_idx)
        served = served_stage(scores[:, test_idx], result.threshold)
        share = np.bincount(served, minlength=k) / n_test
        test_answers = answers[:, test_idx]
        drop = None
        if label_array is not None:
            test_labels = label_array[test_idx]
            ref_acc = float((test_answers[-1] == test_labels).mean())
            drop = ref_acc - float((test_answers[served, np.arange(n_test)] == test_labels).mean())
        needed = opts.min_inputs()
        pv = float(result.table["pvalue"].iloc[result.index - 1]) if result.index > 0 else None
        names = [v.name for v in self.variants]
        return CalibrationReport(
            threshold=result.threshold,
            thresholds=(result.threshold,) * (k - 1),
            certified=result.certified,
            targets=opts.targets,
            delta=float(opts.delta),
            method=opts.method,
            scorer=self.scorer.name,
            version=self._rule.version,
            n_calibration=answers.shape[1],
            n_fit=answers.shape[1] - n_test,
            n_test=n_test,
            variants=tuple(names),
            share={name: float(s) for name, s in zip(names, share, strict=True)},
            expected_cost_ms=float(cascade_cost(served, costs).mean()),
            reference_cost_ms=float(costs[-1]),
            variant_costs_ms={name: float(c) for name, c in zip(names, costs, strict=True)},
            empirical_disagreement=float(losses(test_answers, served, None, "disagreement").mean()),
            empirical_quality_drop=drop,
            pvalue=pv,
            table=result.table,
            test_size=opts.test_size,
            min_inputs=needed,
            note=_calibration_note(result.certified, n_test, needed, k),
        )

    def _labels(self, labels: Sequence[Tensor], batches: list[Any], n: int) -> np.ndarray:
        if isinstance(labels, Tensor) or not isinstance(labels, Sequence):
            raise invalid("labels", labels, "a list of label tensors aligned with the batches")
        if len(labels) != len(batches):
            raise invalid("labels", f"{len(labels)} batches", f"{len(batches)} label batches")
        out = []
        for y in labels:
            y = torch.as_tensor(y)
            out.append((y[:, -1] if y.dim() == 2 else y).reshape(-1).detach().cpu().numpy())
        array = np.concatenate(out)
        if array.shape[0] != n:
            raise invalid("labels", f"{array.shape[0]} labels", f"{n} labels (one per input)")
        return array

    def _costs(self, batch: Any) -> list[float]:
        if any(math.isnan(v.cost_ms) for v in self.variants):
            self.variants = tuple(self._measure(self.variants, batch))
        return [v.cost_ms for v in self.variants]

    def __repr__(self) -> str:
        names = ", ".join(v.name for v in self.variants)
        return (
            f"Controller([{names}], backend={self.backend!r}, scorer={self.scorer.name!r}, "
            f"threshold={self._rule.threshold:g})"
        )


def _checked_floats(scorer: Scorer, logits: Tensor, *, stage: int) -> list[float]:
    """The scores themselves as floats, for a scorer whose fast path gives logarithms."""
    return checked_scores(scorer.score(logits, stage), logits.shape[0], scorer.name).tolist()


def _order_stages(variants: list[Variant], *, drop_slower: bool) -> list[Variant]:
    """The cheaper stages by measured cost (stable: ties keep the given order) when
    ``drop_slower``, each measured slower than the reference dropped with a warning; the
    reference (last) stays last."""
    *cheaper, reference = variants
    kept = []
    for v in cheaper:
        if v.cost_ms > reference.cost_ms:
            action = "dropped" if drop_slower else "kept (order='given')"
            warnings.warn(
                f"The variant {v.name!r} measured {v.cost_ms:.4g} ms per input, slower than the "
                f"reference {reference.name!r} ({reference.cost_ms:.4g} ms): {action}; it "
                "cannot make the cascade cheaper than the reference alone.",
                stacklevel=3,
            )
            if drop_slower:
                continue
        kept.append(v)
    if drop_slower:
        kept.sort(key=lambda v: v.cost_ms)
    return [*kept, reference]


def _split(n: int, fit_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded fit / test split of ``n`` inputs (sorted indices)."""
    order = np.random.default_rng(seed).permutation(n)
    n_fit = round(fit_share * n)
    if n - n_fit < 1:
        raise invalid("fit_fraction", fit_share, "a share leaving inputs to test")
    return np.sort(order[:n_fit]), np.sort(order[n_fit:])


def _calibration_note(certified: bool, n_test: int, needed: int, stages: int) -> str | None:
    """Why the calibration escalates every input, when it does."""
    if certified or stages < 2:
        return None
    if n_test < needed:
        return (
            f"not certifiable with {n_test} inputs (needs ≥ {needed}): every input is "
            "escalated to the reference"
        )
    return "no threshold certified on these inputs: every input is escalated to the reference"
