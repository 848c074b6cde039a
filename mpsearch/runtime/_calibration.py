"""Threshold calibration with a distribution-free guarantee: Learn-then-Test (Angelopoulos et al.).

The cascade has one shared threshold ``t``: an input leaves stage ``k`` (served by variant
``k``) when its score there is ``<= t`` and is escalated otherwise; the last variant always
serves. The candidate thresholds form a fixed grid ordered from the most conservative
(``-inf``: escalate everything, so the served answer *is* the most precise variant's answer
and the risk is exactly 0) to the most aggressive (``+inf``: never escalate). For each
candidate the null hypothesis "risk(t) > eps" gets a p-value from the binomial tail of the
0/1 losses on the calibration inputs; fixed-sequence testing walks the grid in order and
accepts candidates while their p-value is ``<= delta``, stopping at the first failure. The
most aggressive accepted threshold is chosen. Then, with probability ``>= 1 - delta`` over
the calibration draw, ``risk(chosen) <= eps``, where risk is the probability that the served
answer is wrong in the sense of the loss (differs from the most precise variant, or, with
labels, is wrong where the most precise variant is right).

Assumption: the calibration inputs and the inputs served later are drawn i.i.d. from the
same distribution (exchangeable), and the grid does not depend on the calibration inputs
used for testing (built-in scorers use a fixed grid; learned or unbounded scorers are fitted
on a separate ``fit`` part of the calibration data).

Finite test set (``test_size=m``, "transductive" mode). The guarantee above is about the
population risk; the loss *rate* measured on ``m`` further inputs scatters binomially around
it, so it exceeds ``eps`` in more than a ``delta`` share of draws. With ``test_size`` the
guarantee is instead: for the ``n`` calibration inputs and the next ``m`` inputs, all
``N = n + m`` exchangeable, ``P(#losses among the m inputs > eps * m) <= delta``. Procedure
and proof:

* Envelope losses: ``env_i(t) = max over grid t' <= t of loss_i(t')``, so the set of lossy
  inputs only grows along the grid (for 2 variants this is the plain loss; with more, escalating
  to a middle variant can create a loss that a later threshold removes). ``env >= loss``, so
  bounding the envelope count bounds the loss count.
* Condition on the pool of ``N`` inputs; by exchangeability the calibration set is a uniformly
  random ``n``-subset. Order the pool's lossy inputs by the grid index where their envelope
  loss first becomes 1 (ties in any split-independent order): at every ``t`` the lossy set is a
  prefix of that sequence. Let ``t0`` be the smallest count with ``t0 / m > eps`` (exact
  rational arithmetic on the float ``eps``, so it is never above the count a float comparison
  would call a violation).
* The accepted thresholds are those with calibration envelope count ``k <= c`` (``c`` depends
  only on ``n, m, eps, delta``). A violation at the chosen one is a prefix holding ``<= c``
  calibration and ``>= t0`` test inputs, i.e. the ``t0``-th lossy test input comes within the
  first ``min(L, c + t0)`` lossy inputs. The calibration inputs among the first ``j`` lossy
  ones are hypergeometric, so ``P(violation) <= p(c)`` with
  ``p(k) = max over j in [t0, k + t0] of HypergeomCDF(j - t0; N, n, j)`` (the max equals its
  last term, since the count of test inputs among the first ``j`` can only grow with ``j``; it
  is kept as a running max so that rounding cannot break monotonicity). A candidate is accepted
  iff ``p(k) <= delta``; ``p`` is monotone in ``k`` and ``k`` in ``t``, so fixed-sequence testing
  picks the last such candidate. With several targets each gets ``delta / #targets``
  (Bonferroni: the prefix argument is per target); the table's ``pvalue`` column is then
  ``min(1, #targets * max_kind p_kind)``. As ``m`` grows this approaches the binomial test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mpsearch._validation import check_fraction, invalid, unknown

PValueFn = Callable[[int, int, float], float]


def binomial_pvalue(k: int, n: int, eps: float) -> float:
    """P-value of "risk > eps" after ``k`` losses in ``n`` 0/1 trials: ``P(Binom(n, eps) <= k)``.

    Exact for 0/1 losses (the most powerful valid choice for them).

    >>> round(binomial_pvalue(0, 100, 0.05), 4)
    0.0059
    """
    if n == 0:
        return 1.0
    return float(stats.binom.cdf(k, n, eps))


def hoeffding_bentkus_pvalue(k: int, n: int, eps: float) -> float:
    """Hoeffding-Bentkus p-value of "risk > eps" for losses in ``[0, 1]`` with mean ``k / n``.

    ``min(exp(-n h(min(r, eps), eps)), e * P(Binom(n, eps) <= k))`` with ``r = k / n`` (Bates
    et al. 2021; their ``ceil(n r)`` is ``k`` itself, taken here as the integer it is).

    >>> hoeffding_bentkus_pvalue(0, 100, 0.05) >= binomial_pvalue(0, 100, 0.05)
    True
    """
    if n == 0:
        return 1.0
    r = min(k / n, eps)

    def kl(a: float, b: float) -> float:
        left = 0.0 if a == 0 else a * math.log(a / b)
        right = 0.0 if a == 1 else (1 - a) * math.log((1 - a) / (1 - b))
        return left + right

    hoeffding = math.exp(-n * kl(r, eps))
    bentkus = math.e * float(stats.binom.cdf(k, n, eps))
    return min(1.0, hoeffding, bentkus)


PVALUES: dict[str, PValueFn] = {
    "binomial": binomial_pvalue,
    "hoeffding_bentkus": hoeffding_bentkus_pvalue,
}


def fixed_sequence_test(pvalues: Sequence[float], delta: float) -> int:
    """Index of the last hypothesis accepted by fixed-sequence testing (``-1``: none).

    Hypotheses are tested in the given order at level ``delta`` each; testing stops at the
    first p-value above ``delta`` (this controls the family-wise error at ``delta``).

    >>> fixed_sequence_test([0.01, 0.05, 0.2, 0.01], 0.1)
    1
    """
    check_fraction("delta", delta)
    last = -1
    for i, p in enumerate(pvalues):
        if not p <= delta:
            break
        last = i
    return last


def default_grid(points_per_decade: int = 20, lowest: float = 1e-7) -> np.ndarray:
    """The fixed threshold grid for scores in ``[0, 1]``: ``-inf``, log-spaced near 0 *and*
    near 1, ``+inf``.

    Points are log-spaced in ``s`` from ``lowest`` to 0.5 and in ``1 - s`` from 0.5 down to
    ``lowest``, so scores crowded near 1 (a low-confidence model: ``max_softmax``, ``margin``
    close to 1 for most inputs) get thresholds as fine as scores crowded near 0.

    >>> g = default_grid()
    >>> bool(g[0] == -np.inf and g[-1] == np.inf and np.all(np.diff(g[1:-1]) > 0))
    True
    >>> bool(np.any((g > 0.99) & (g < 0.999)))
    True
    """
    decades = math.log10(0.5 / lowest)
    low = np.logspace(math.log10(lowest), math.log10(0.5), round(decades * points_per_decade) + 1)
    high = 1.0 - low[::-1][1:]
    return np.concatenate([[-np.inf], low, high, [np.inf]])


def quantile_grid(scores: np.ndarray, levels: int = 200) -> np.ndarray:
    """A grid from the quantiles of ``scores`` (held-out ``fit`` scores), with ``-inf``/``+inf``."""
    finite = np.asarray(scores, dtype=np.float64).ravel()
    inner = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, levels))) if finite.size else []
    return np.concatenate([[-np.inf], inner, [np.inf]])


def served_stage(stage_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which variant serves each input: the first stage whose score is ``<= threshold``.

    ``stage_scores`` is ``[K - 1, N]`` (the last variant has no score: it always serves).

    >>> served_stage(np.array([[0.1, 0.9, 0.9], [0.5, 0.1, 0.9]]), 0.3).tolist()
    [0, 1, 2]
    """
    scores = np.asarray(stage_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"stage_scores must be [K - 1, N]; got shape {scores.shape}.")
    stop = np.vstack([scores <= threshold, np.ones((1, scores.shape[1]), dtype=bool)])
    return stop.argmax(axis=0)


def cascade_cost(served: np.ndarray, costs: Sequence[float]) -> np.ndarray:
    """Per-input cost of the cascade: every pass up to the serving variant is paid.

    >>> cascade_cost(np.array([0, 1, 2]), [1.0, 2.0, 4.0]).tolist()
    [1.0, 3.0, 7.0]
    """
    return np.cumsum(np.asarray(costs, dtype=np.float64))[np.asarray(served)]


def served_answers(stage_answers: np.ndarray, served: np.ndarray) -> np.ndarray:
    """The answer each input gets: ``stage_answers[served[i], i]``."""
    answers = np.asarray(stage_answers)
    return answers[np.asarray(served), np.arange(answers.shape[1])]


def losses(
    stage_answers: np.ndarray, served: np.ndarray, labels: np.ndarray | None, kind: str
) -> np.ndarray:
    """0/1 loss per input: ``disagreement`` with the last variant, or ``quality_drop``.

    ``quality_drop`` counts inputs the served variant gets wrong while the most precise one
    gets right; its mean bounds the accuracy drop from above (so controlling it controls
    the drop).
    """
    answers = served_answers(stage_answers, served)
    reference = np.asarray(stage_answers)[-1]
    if kind == "disagreement":
        return (answers != reference).astype(np.int64)
    if labels is None:
        raise ValueError("The 'quality_drop' loss needs labels.")
    return ((answers != labels) & (reference == labels)).astype(np.int64)


def first_violating_count(eps: float, test_size: int) -> int:
    """The smallest loss count ``T`` with ``T / test_size > eps`` (exact, on the float ``eps``).

    Exact rational arithmetic: never above the count a float comparison (``T / m > eps`` or
    ``T > eps * m``) would call a violation, so the guarantee holds for those too.

    >>> first_violating_count(0.005, 3000), first_violating_count(0.5, 4)
    (16, 3)
    """
    return math.floor(Fraction(eps) * test_size) + 1


def transductive_pvalues(
    counts: np.ndarray | Sequence[int], n: int, test_size: int, eps: float
) -> np.ndarray:
    """P-values of "more than ``eps * test_size`` losses among the next ``test_size`` inputs".

    ``counts`` are calibration (envelope) loss counts out of ``n``; for each,
    ``p(k) = max over j in [t0, k + t0] of HypergeomCDF(j - t0; n + m, n, j)`` with ``m =
    test_size`` and ``t0 = first_violating_count(eps, m)``: the chance that among the first ``j``
    lossy inputs of the pool at most ``j - t0`` are calibration inputs. Vectorised over the
    distinct counts; the running max is taken over them (the max over ``j`` is its last term).

    >>> round(float(transductive_pvalues([0], 8, 4, 0.5)[0]), 4)  # C(4, 3) / C(12, 3)
    0.0182
    """
    k = np.asarray(counts, dtype=np.int64)
    if k.size == 0:
        return np.zeros(0)
    if n == 0:
        return np.ones(k.shape)
    t0 = first_violating_count(eps, test_size)
    distinct, where = np.unique(k, return_inverse=True)
    cdf = stats.hypergeom.cdf(distinct, n + test_size, n, distinct + t0)
    pvalues = np.clip(np.maximum.accumulate(np.nan_to_num(cdf, nan=1.0)), 0.0, 1.0)
    return pvalues[where].reshape(k.shape)


def check_test_size(test_size: Any, method: str) -> None:
    """Raise unless ``test_size`` is ``None`` or a positive integer used with ``"binomial"``.

    Cheap: callers run it before any long work (``Controller.calibrate`` before the models).

    >>> check_test_size(3000, "binomial")
    >>> check_test_size(None, "hoeffding_bentkus")
    """
    if test_size is None:
        return
    if (
        isinstance(test_size, (bool, np.bool_))
        or not isinstance(test_size, (int, np.integer))
        or test_size < 1
    ):
        raise invalid("test_size", test_size, "a positive integer (or None)")
    if method != "binomial":
        raise ValueError(
            f"The 'method' argument must be 'binomial' when 'test_size' is given (the "
            f"finite-test-set mode uses exact hypergeometric p-values). Got method={method!r} "
            f"with test_size={test_size!r} instead."
        )


def min_calibration_size(
    eps: float, delta: float, *, method: str = "binomial", test_size: int | None = None
) -> int:
    """The fewest test inputs that can certify risk ``<= eps`` at level ``delta``: the
    smallest ``n`` whose p-value after **zero** losses is ``<= delta`` (with fewer, not even a
    loss-free calibration set certifies anything, and every input is escalated).

    ``method`` is one of :data:`PVALUES`; ``test_size`` switches to the finite-test-set
    p-values (:func:`transductive_pvalues`).

    >>> min_calibration_size(0.005, 0.1)  # 0.995 ** 460 <= 0.1 < 0.995 ** 459
    460
    """
    check_fraction("max_disagreement", eps)
    check_fraction("delta", delta)
    if method not in PVALUES:
        raise unknown("method", method, PVALUES)
    check_test_size(test_size, method)

    def certifies(n: int) -> bool:
        if test_size is not None:
            return bool(transductive_pvalues([0], n, int(test_size), eps)[0] <= delta)
        return PVALUES[method](0, n, eps) <= delta

    # both p-values fall as n grows: (1 - eps) ** n without a test size; gallop, then bisect
    high = max(1, math.ceil(math.log(delta) / math.log1p(-eps)))
    while not certifies(high):
        high *= 2
    low = 0  # certifies(0) is False: no inputs, p-value 1
    while high - low > 1:
        mid = (low + high) // 2
        if certifies(mid):
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class CalibrateOptions:
    """How :meth:`Controller.calibrate` certifies its threshold (every field validated).

    ``max_disagreement`` (default 0.005 when no other target is given) bounds the rate at
    which the served answer differs from the reference's; ``max_quality_drop`` (needs labels)
    the rate of inputs the served variant gets wrong while the reference gets right. ``method``
    is a p-value of :data:`PVALUES`; ``fit_fraction`` the share of the data that fits learned or
    unbounded scorers (default 0.3 for them, 0 otherwise); ``grid`` the candidate thresholds
    (default: a fixed grid for bounded scorers, the fit split's score quantiles otherwise);
    ``seed`` the fit / test split; ``test_size`` the finite-test-set guarantee's ``m``.

    >>> CalibrateOptions(max_disagreement=0.01).targets
    {'disagreement': 0.01}
    """

    max_disagreement: float | None = None
    delta: float = 0.1
    max_quality_drop: float | None = None
    method: str = "binomial"
    fit_fraction: float | None = None
    grid: tuple[float, ...] | None = None
    seed: int = 0
    test_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_disagreement is not None:
            check_fraction("max_disagreement", self.max_disagreement)
        if self.max_quality_drop is not None:
            check_fraction("max_quality_drop", self.max_quality_drop)
        check_fraction("delta", self.delta)
        if self.method not in PVALUES:
            raise unknown("method", self.method, PVALUES)
        check_test_size(self.test_size, self.method)
        if self.fit_fraction is not None:
            check_fraction("fit_fraction", self.fit_fraction, open_low=False)
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(float(t) for t in self.grid))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise invalid("seed", self.seed, "an integer")

    @property
    def targets(self) -> dict[str, float]:
        """Loss kind -> its bound (``disagreement`` 0.005 when no target is set)."""
        out: dict[str, float] = {}
        if self.max_disagreement is not None or self.max_quality_drop is None:
            out["disagreement"] = float(self.max_disagreement or 0.005)
        if self.max_quality_drop is not None:
            out["quality_drop"] = float(self.max_quality_drop)
        return out

    def min_inputs(self) -> int:
        """The fewest test inputs that can certify every target (:func:`min_calibration_size`;
        with a ``test_size`` each target is tested at ``delta / #targets``)."""
        targets = self.targets
        delta = self.delta / len(targets) if self.test_size is not None else self.delta
        return max(
            min_calibration_size(eps, delta, method=self.method, test_size=self.test_size)
            for eps in targets.values()
        )


@dataclass
class LTTResult:
    """What Learn-then-Test chose: the index into the grid, the threshold, the per-grid table."""

    index: int
    threshold: float
    certified: bool
    table: pd.DataFrame


def learn_then_test(
    stage_scores: np.ndarray,
    stage_answers: np.ndarray,
    *,
    targets: Mapping[str, float],
    delta: float,
    grid: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    method: str = "binomial",
    test_size: int | None = None,
) -> LTTResult:
    """Choose the most aggressive threshold of ``grid`` certified for every target in ``targets``.

    ``targets`` maps a loss kind (``"disagreement"``, ``"quality_drop"``) to its ``eps``; with
    several, a candidate's p-value is the largest of its per-target p-values (valid for the
    intersection of the targets). ``grid[0]`` must be ``-inf`` (always escalate, risk 0): it
    is never tested and is the fallback when nothing else is certified.

    ``test_size=m`` switches to the finite-test-set guarantee (module docstring): the loss
    count among the next ``m`` inputs exceeds ``eps * m`` with probability ``<= delta``. It
    needs ``method="binomial"``; p-values are hypergeometric on envelope loss counts (table
    column ``envelope_<kind>``: their rate), each target tested at ``delta / #targets``.

    >>> scores = np.array([[0.0, 0.0, 0.9, 0.9]])
    >>> answers = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    >>> r = learn_then_test(scores, answers, targets={"disagreement": 0.5}, delta=0.5,
    ...                     grid=np.array([-np.inf, 0.5, np.inf]))
    >>> r.threshold
    0.5
    """
    check_fraction("delta", delta)
    if method not in PVALUES:
        raise unknown("method", method, PVALUES)
    check_test_size(test_size, method)
    for kind, eps in targets.items():
        check_fraction(f"max_{kind}", eps)
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.size == 0 or grid[0] != -np.inf:
        raise ValueError("The threshold grid must start with -inf (always escalate).")
    if test_size is not None:
        return _learn_then_test_finite(
            stage_scores, stage_answers, targets, delta, grid, labels, int(test_size)
        )
    pvalue = PVALUES[method]
    n = int(np.asarray(stage_answers).shape[1])
    rows: list[dict[str, Any]] = []
    pvalues: list[float] = []
    for t in grid[1:]:
        served = served_stage(stage_scores, float(t))
        row: dict[str, Any] = {"threshold": float(t)}
        worst = 0.0
        for kind, eps in targets.items():
            k = int(losses(stage_answers, served, labels, kind).sum())
            row[kind] = k / n if n else float("nan")
            p = pvalue(k, n, eps)
            row[f"pvalue_{kind}"] = p
            worst = max(worst, p)
        row["pvalue"] = worst
        pvalues.append(worst)
        rows.append(row)
    last = fixed_sequence_test(pvalues, delta)
    table = pd.DataFrame(rows)
    table["accepted"] = np.arange(len(rows)) <= last
    index = last + 1  # position in grid (grid[0] = -inf is the untested fallback)
    return LTTResult(index=index, threshold=float(grid[index]), certified=last >= 0, table=table)


def _learn_then_test_finite(
    stage_scores: np.ndarray,
    stage_answers: np.ndarray,
    targets: Mapping[str, float],
    delta: float,
    grid: np.ndarray,
    labels: np.ndarray | None,
    test_size: int,
) -> LTTResult:
    """``learn_then_test`` with ``test_size``: envelope losses, hypergeometric p-values."""
    n = int(np.asarray(stage_answers).shape[1])
    kinds = list(targets)
    first = served_stage(stage_scores, float(grid[0]))
    envelope = {kind: losses(stage_answers, first, labels, kind) for kind in kinds}
    plain = {kind: np.zeros(grid.size - 1, dtype=np.int64) for kind in kinds}
    counts = {kind: np.zeros(grid.size - 1, dtype=np.int64) for kind in kinds}
    for g, t in enumerate(grid[1:]):
        served = served_stage(stage_scores, float(t))
        for kind in kinds:
            loss = losses(stage_answers, served, labels, kind)
            np.maximum(envelope[kind], loss, out=envelope[kind])
            plain[kind][g] = int(loss.sum())
            counts[kind][g] = int(envelope[kind].sum())
    columns: dict[str, Any] = {"threshold": grid[1:].astype(np.float64)}
    worst = np.zeros(grid.size - 1)
    for kind in kinds:
        p = transductive_pvalues(counts[kind], n, test_size, targets[kind])
        columns[kind] = plain[kind] / n if n else np.full(grid.size - 1, np.nan)
        columns[f"envelope_{kind}"] = counts[kind] / n if n else np.full(grid.size - 1, np.nan)
        columns[f"pvalue_{kind}"] = p
        worst = np.maximum(worst, p)
    # Bonferroni over targets: each is tested at delta / len(kinds).
    combined = np.minimum(1.0, len(kinds) * worst) if len(kinds) > 1 else worst
    columns["pvalue"] = combined
    last = fixed_sequence_test(combined.tolist(), delta)
    table = pd.DataFrame(columns)
    table["accepted"] = np.arange(grid.size - 1) <= last
    index = last + 1
    return LTTResult(index=index, threshold=float(grid[index]), certified=last >= 0, table=table)


@dataclass
class CalibrationReport:
    """The outcome of ``Controller.calibrate``: thresholds, expected routing, cost, risk.

    ``share`` is the expected fraction of inputs served by each variant and
    ``expected_cost_ms`` the expected cost per input (every pass an escalated input runs is
    paid), both measured on the held-out calibration inputs used for testing. ``test_size``
    is ``None`` for the population guarantee, else the ``m`` of the finite-test-set guarantee.
    ``min_inputs`` is the fewest test inputs that could certify the targets at all
    (:func:`min_calibration_size`); ``note`` says why nothing was certified when nothing was
    (``"not certifiable with n inputs (needs ≥ N)"`` when ``n_test < min_inputs``), else is
    ``None``. ``str(report)`` is a one-paragraph summary including the note.
    """

    threshold: float
    thresholds: tuple[float, ...]
    certified: bool
    targets: dict[str, float]
    delta: float
    method: str
    scorer: str
    version: int
    n_calibration: int
    n_fit: int
    n_test: int
    variants: tuple[str, ...]
    share: dict[str, float]
    expected_cost_ms: float
    reference_cost_ms: float
    variant_costs_ms: dict[str, float]
    empirical_disagreement: float
    empirical_quality_drop: float | None
    pvalue: float | None
    table: pd.DataFrame = field(repr=False)
    test_size: int | None = None
    min_inputs: int | None = None
    note: str | None = None

    def summary(self) -> dict[str, Any]:
        """The report as a flat dict (no table), e.g. for a results row."""
        out = {k: v for k, v in self.__dict__.items() if k != "table"}
        return out

    def __str__(self) -> str:
        targets = ", ".join(f"{k} <= {v:g}" for k, v in self.targets.items())
        state = "certified" if self.certified else "not certified"
        share = ", ".join(f"{k} {v:.1%}" for k, v in self.share.items())
        text = (
            f"{targets} at delta = {self.delta:g} ({self.method}, {self.scorer}): {state}, "
            f"threshold {self.threshold:g} on {self.n_test} test inputs; served {share}; "
            f"{self.expected_cost_ms:.4g} ms per input vs {self.reference_cost_ms:.4g} ms "
            "for the reference alone"
        )
        return text + (f". {self.note}" if self.note else "")
