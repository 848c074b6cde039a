"""The finite-test-set ("transductive") mode of Learn-then-Test: ``learn_then_test(test_size=m)``.

Its claim: for ``n`` calibration inputs and the next ``m``, all exchangeable, the number of
losses among the ``m`` exceeds ``eps * m`` with probability ``<= delta``. Conditioning on the
pool, the calibration set is a uniformly random ``n``-subset, so on a small pool the claim can
be checked exactly by enumerating every split.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from mpsearch.runtime import learn_then_test
from mpsearch.runtime._calibration import (
    check_test_size,
    first_violating_count,
    losses,
    served_stage,
    transductive_pvalues,
)


def _exact_pvalue(k: int, n: int, m: int, eps: float) -> Fraction:
    """``max over j in [t0, k + t0]`` of P(at most ``j - t0`` calibration inputs among ``j``
    drawn from ``n + m``), in exact integer arithmetic (independent of scipy)."""
    t0 = first_violating_count(eps, m)
    total = n + m
    best = Fraction(0)
    for j in range(t0, k + t0 + 1):
        cdf = sum(
            Fraction(math.comb(n, x) * math.comb(m, j - x), math.comb(total, j))
            for x in range(0, j - t0 + 1)
        )
        best = max(best, cdf)
    return best


def _critical_count(n: int, m: int, eps: float, delta: float) -> int:
    """The largest calibration count accepted (``-1``: none), from the exact p-values."""
    return max((k for k in range(n + 1) if _exact_pvalue(k, n, m, eps) <= delta), default=-1)


def _violation_probability(j: int, n: int, m: int, t0: int) -> Fraction:
    """P(at least ``t0`` of the first ``j`` lossy inputs of the pool are test inputs)."""
    return sum(
        (
            Fraction(math.comb(m, x) * math.comb(n, j - x), math.comb(n + m, j))
            for x in range(t0, min(m, j) + 1)
        ),
        Fraction(0),
    )


def test_first_violating_count_is_exact() -> None:
    assert first_violating_count(0.005, 3000) == 16
    assert first_violating_count(0.25, 4) == 2  # 1 / 4 is not above 0.25
    assert first_violating_count(0.5, 4) == 3
    # The float 0.3 lies below 3/10, so 3 losses in 10 is (exactly) above it; a float comparison
    # says 3 / 10 > 0.3 is False. The exact count is never above the float one: conservative.
    assert first_violating_count(0.3, 10) == 3
    rng = np.random.default_rng(0)
    for _ in range(500):
        eps = float(rng.choice([rng.random(), round(rng.random(), 3)]))
        m = int(rng.integers(1, 5000))
        if not 0 < eps < 1:
            continue
        t0 = first_violating_count(eps, m)
        assert Fraction(t0, m) > Fraction(eps) >= Fraction(t0 - 1, m)
        assert t0 <= min(t for t in range(m + 2) if t / m > eps)


def test_pvalues_match_exact_combinatorics() -> None:
    for n, m, eps in [(8, 4, 0.5), (8, 4, 0.25), (30, 10, 0.1), (50, 120, 0.05)]:
        counts = np.arange(min(n, 12) + 1)
        got = transductive_pvalues(counts, n, m, eps)
        want = [float(_exact_pvalue(int(k), n, m, eps)) for k in counts]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
        assert np.all(np.diff(got) >= 0)
    # Any order and repeats: looked up per count.
    got = transductive_pvalues([3, 0, 3, 1], 8, 4, 0.5)
    assert got.tolist() == transductive_pvalues([0, 1, 3], 8, 4, 0.5)[[2, 0, 2, 1]].tolist()
    assert transductive_pvalues([0, 2], 0, 5, 0.1).tolist() == [1.0, 1.0]  # no calibration


def test_critical_count_for_the_benchmark_sizes() -> None:
    """n = 8000 calibration inputs, m = 3000 test inputs, eps = 0.005 (t0 = 16), delta = 0.1:
    the finite mode accepts calibration counts up to 26, the population binomial test up to
    31; as m grows the finite test approaches the binomial one."""
    n, m, eps, delta = 8000, 3000, 0.005, 0.1
    p = transductive_pvalues(np.arange(60), n, m, eps)
    assert int(np.nonzero(p <= delta)[0].max()) == 26
    assert float(_exact_pvalue(26, n, m, eps)) == pytest.approx(p[26], rel=1e-9)
    assert float(_exact_pvalue(27, n, m, eps)) == pytest.approx(p[27], rel=1e-9)
    assert p[26] <= delta < p[27]
    binomial = stats.binom.cdf(np.arange(60), n, eps)
    assert int(np.nonzero(binomial <= delta)[0].max()) == 31
    large = transductive_pvalues(np.arange(60), n, 300_000, eps)
    assert int(np.nonzero(large <= delta)[0].max()) == 31


def _tiny_pool(seed: int, lossy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12 inputs, 2 variants, distinct random scores, ``lossy`` random inputs where the cheap
    answer differs from the reference; the grid has a threshold at every score."""
    rng = np.random.default_rng(seed)
    size = 12
    scores = (rng.permutation(size) + 0.5) / size
    reference = rng.integers(0, 3, size)
    cheap = reference.copy()
    bad = rng.choice(size, lossy, replace=False)
    cheap[bad] = (reference[bad] + rng.integers(1, 3, lossy)) % 3
    answers = np.stack([cheap, reference])
    grid = np.concatenate([[-np.inf], np.sort(scores), [np.inf]])
    return scores[None], answers, grid


def _split_violation_rate(
    scores: np.ndarray,
    answers: np.ndarray,
    grid: np.ndarray,
    n: int,
    targets: dict[str, float],
    delta: float,
    test_size: int | None,
    labels: np.ndarray | None = None,
) -> Fraction:
    """The exact fraction of all n-subsets (as calibration) after which the chosen threshold
    has more than eps * m losses on the other m inputs, for any target."""
    size = answers.shape[1]
    m = size - n
    bad = total = 0
    for cal in itertools.combinations(range(size), n):
        cal_idx = np.array(cal)
        test_idx = np.setdiff1d(np.arange(size), cal_idx)
        result = learn_then_test(
            scores[:, cal_idx],
            answers[:, cal_idx],
            targets=targets,
            delta=delta,
            grid=grid,
            labels=None if labels is None else labels[cal_idx],
            test_size=test_size,
        )
        served = served_stage(scores[:, test_idx], result.threshold)
        test_labels = None if labels is None else labels[test_idx]
        violated = any(
            Fraction(int(losses(answers[:, test_idx], served, test_labels, kind).sum()), m)
            > Fraction(eps)
            for kind, eps in targets.items()
        )
        bad += violated
        total += 1
    return Fraction(bad, total)


@pytest.mark.parametrize(
    ("eps", "delta"), [(0.25, 0.1), (0.4, 0.15), (0.5, 0.1), (0.5, 0.2), (0.6, 0.1)]
)
def test_all_splits_of_a_tiny_pool(eps: float, delta: float) -> None:
    """N = 12, n = 8, m = 4, seven lossy inputs at distinct grid entries: over all 495 splits the
    violation fraction is exactly P(>= t0 of the first min(L, c + t0) lossy inputs are test
    inputs), and it is <= delta."""
    n, m, lossy = 8, 4, 7
    scores, answers, grid = _tiny_pool(seed=1, lossy=lossy)
    rate = _split_violation_rate(scores, answers, grid, n, {"disagreement": eps}, delta, m)
    t0 = first_violating_count(eps, m)
    c = _critical_count(n, m, eps, delta)
    assert c >= 0  # something is certified: the check is not vacuous
    assert rate == _violation_probability(min(lossy, c + t0), n, m, t0)
    assert rate <= delta
    assert rate > 0


@pytest.mark.parametrize(("eps", "delta"), [(0.4, 0.15), (0.6, 0.1)])
def test_population_mode_violates_on_the_test_split(eps: float, delta: float) -> None:
    """The same pool with the population (binomial) p-values: they bound the risk, not the rate
    on 4 test inputs, and more than delta of the splits violate (0.236 > 0.15, 0.152 > 0.1)."""
    n, m, lossy = 8, 4, 7
    scores, answers, grid = _tiny_pool(seed=1, lossy=lossy)
    rate = _split_violation_rate(scores, answers, grid, n, {"disagreement": eps}, delta, None)
    t0 = first_violating_count(eps, m)
    c_binomial = max(k for k in range(n + 1) if stats.binom.cdf(k, n, eps) <= delta)
    assert rate == _violation_probability(min(lossy, c_binomial + t0), n, m, t0)
    assert rate > delta


def test_all_splits_with_ties_on_a_coarse_grid() -> None:
    """Several lossy inputs enter at the same grid entry: the bound still holds (<= delta) and
    is no larger than with a threshold at every score."""
    n, m, lossy, eps, delta = 8, 4, 9, 0.5, 0.2
    scores, answers, _ = _tiny_pool(seed=2, lossy=lossy)
    grid = np.array([-np.inf, 0.2, 0.45, 0.7, np.inf])
    rate = _split_violation_rate(scores, answers, grid, n, {"disagreement": eps}, delta, m)
    t0 = first_violating_count(eps, m)
    c = _critical_count(n, m, eps, delta)
    assert 0 < rate <= _violation_probability(min(lossy, c + t0), n, m, t0) <= delta


def test_all_splits_with_two_targets() -> None:
    """Two targets, each tested at delta / 2 (Bonferroni): the fraction of splits where either
    is violated on the test part is <= delta; the table's pvalue is 2 x the larger one."""
    n, m, delta = 8, 4, 0.3
    targets = {"disagreement": 0.5, "quality_drop": 0.25}
    scores, answers, grid = _tiny_pool(seed=3, lossy=8)
    rng = np.random.default_rng(3)
    labels = np.where(rng.random(12) < 0.8, answers[1], answers[0])
    rate = _split_violation_rate(scores, answers, grid, n, targets, delta, m, labels)
    assert 0 < rate <= delta
    result = learn_then_test(
        scores[:, :n],
        answers[:, :n],
        targets=targets,
        delta=delta,
        grid=grid,
        labels=labels[:n],
        test_size=m,
    )
    table = result.table
    worst = np.maximum(table["pvalue_disagreement"], table["pvalue_quality_drop"])
    np.testing.assert_allclose(table["pvalue"], np.minimum(1.0, 2 * worst))
    assert table["accepted"].tolist() == [
        i < result.index for i in range(len(table))
    ] and result.index == int(table["accepted"].sum())
    if result.index < len(table):
        assert table["pvalue"].iloc[result.index] > delta


def test_envelope_on_three_variants() -> None:
    """Three variants, grid [-inf, 0.1, 0.2, 0.3, inf]. Type A (2 inputs): variant 1 wrong,
    served by it for t in [0.05, 0.25), by the right variant 0 from 0.25: lossy at 0.1 and 0.2
    only. Type B (3): variant 0 wrong, served by it from 0.15 on: lossy from 0.2. Type C (4):
    variant 1 wrong, served by it for t in [0.15, 0.95), by the right variant 0 at inf: lossy
    at 0.2 and 0.3. Plain counts 2, 9, 7, 3 are not nested; envelope counts are 2, 9, 9, 9."""
    n = 40
    s0 = np.full(n, 0.01)
    s1 = np.full(n, 0.01)
    a0 = np.zeros(n, dtype=int)
    a1 = np.zeros(n, dtype=int)
    a_type, b_type, c_type = slice(0, 2), slice(2, 5), slice(5, 9)
    s1[a_type], s0[a_type], a1[a_type] = 0.05, 0.25, 1
    s0[b_type], s1[b_type], a0[b_type] = 0.15, 0.9, 1
    s1[c_type], s0[c_type], a1[c_type] = 0.15, 0.95, 1
    scores = np.stack([s0, s1])
    answers = np.stack([a0, a1, np.zeros(n, dtype=int)])
    grid = np.array([-np.inf, 0.1, 0.2, 0.3, np.inf])
    plain = [2, 9, 7, 3]
    for t, k in zip(grid[1:], plain, strict=True):
        assert losses(answers, served_stage(scores, t), None, "disagreement").sum() == k
    m, eps = 400, 0.02
    finite = learn_then_test(
        scores, answers, targets={"disagreement": eps}, delta=0.1, grid=grid, test_size=m
    )
    assert np.rint(finite.table["disagreement"] * n).astype(int).tolist() == plain
    assert np.rint(finite.table["envelope_disagreement"] * n).astype(int).tolist() == [2, 9, 9, 9]
    np.testing.assert_allclose(
        finite.table["pvalue_disagreement"],
        [float(_exact_pvalue(k, n, m, eps)) for k in (2, 9, 9, 9)],
        rtol=1e-9,
    )
    population = learn_then_test(
        scores, answers, targets={"disagreement": eps}, delta=0.1, grid=grid
    )
    assert np.rint(population.table["disagreement"] * n).astype(int).tolist() == plain
    assert "envelope_disagreement" not in population.table


def test_random_splits_of_a_larger_pool() -> None:
    """2000 inputs (score uniform, the cheap answer wrong w.p. score**3), 300 random splits into
    1500 calibration and 500 test inputs, eps = 0.02, delta = 0.1: the finite mode's violation
    rate on the test split is <= delta + 3 standard errors, the population mode's is higher
    (its exact value on a pool with a threshold per score is 0.179, the finite mode's 0.084)."""
    rng = np.random.default_rng(0)
    size, n, eps, delta, draws = 2000, 1500, 0.02, 0.1, 300
    m = size - n
    score = rng.random(size)
    wrong = rng.random(size) < score**3
    scores = score[None]
    answers = np.stack([wrong.astype(int), np.zeros(size, dtype=int)])
    grid = np.concatenate([[-np.inf], np.linspace(0.3, 0.8, 101), [np.inf]])
    violations = {"finite": 0, "population": 0}
    for _ in range(draws):
        order = rng.permutation(size)
        cal, test = order[:n], order[n:]
        for mode, test_size in (("finite", m), ("population", None)):
            result = learn_then_test(
                scores[:, cal],
                answers[:, cal],
                targets={"disagreement": eps},
                delta=delta,
                grid=grid,
                test_size=test_size,
            )
            served = served_stage(scores[:, test], result.threshold)
            k = int(losses(answers[:, test], served, None, "disagreement").sum())
            violations[mode] += k / m > eps
    finite, population = violations["finite"] / draws, violations["population"] / draws
    assert finite <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert population > delta
    assert population > finite


def test_finite_mode_refuses_bad_arguments() -> None:
    s, a = np.zeros((1, 5)), np.zeros((2, 5), dtype=int)
    args = {"targets": {"disagreement": 0.1}, "delta": 0.1}
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(ValueError, match="'test_size'"):
            learn_then_test(s, a, **args, test_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'method'.*test_size"):
        learn_then_test(s, a, **args, method="hoeffding_bentkus", test_size=10)
    with pytest.raises(ValueError, match="'test_size'"):
        check_test_size(2.5, "binomial")
    with pytest.raises(ValueError, match="'method'.*test_size"):
        check_test_size(10, "hoeffding_bentkus")
    check_test_size(None, "hoeffding_bentkus")
    with pytest.raises(ValueError, match="'method'"):
        learn_then_test(s, a, **args, method="magic", test_size=10)
    s, a = np.zeros((1, 200)), np.zeros((2, 200), dtype=int)
    result = learn_then_test(s, a, **args, test_size=np.int64(10))
    assert result.index == len(result.table)  # no losses at all: every candidate accepted
