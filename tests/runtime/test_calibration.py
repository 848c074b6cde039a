from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mpsearch.runtime import CalibrateOptions, learn_then_test, min_calibration_size
from mpsearch.runtime._calibration import (
    binomial_pvalue,
    cascade_cost,
    default_grid,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    losses,
    served_stage,
    transductive_pvalues,
)


def test_fixed_sequence_stops_at_first_failure() -> None:
    assert fixed_sequence_test([0.01, 0.02, 0.09, 0.11, 0.0], 0.1) == 2
    assert fixed_sequence_test([0.2, 0.0], 0.1) == -1
    assert fixed_sequence_test([], 0.1) == -1
    assert fixed_sequence_test([0.1], 0.1) == 0  # p <= delta is a rejection


def test_binomial_pvalue_is_the_binomial_tail() -> None:
    assert binomial_pvalue(0, 100, 0.05) == pytest.approx(0.95**100)
    assert binomial_pvalue(3, 50, 0.1) == pytest.approx(stats.binom.cdf(3, 50, 0.1))
    assert binomial_pvalue(0, 0, 0.1) == 1.0


def test_hoeffding_bentkus_is_valid_but_weaker() -> None:
    for k, n, eps in [(0, 100, 0.05), (3, 200, 0.05), (10, 100, 0.05)]:
        hb = hoeffding_bentkus_pvalue(k, n, eps)
        assert binomial_pvalue(k, n, eps) <= hb + 1e-12
        assert 0 <= hb <= 1
    assert hoeffding_bentkus_pvalue(10, 100, 0.05) == 1.0  # observed risk above eps


def test_hoeffding_bentkus_uses_the_exact_loss_count() -> None:
    """The Bentkus term is ``e * P(Binom(n, eps) <= k)`` at the integer ``k``: ``ceil(n * (k /
    n))`` is 8, not 7, for k = 7, n = 25 (a weaker p-value)."""
    k, n, eps = 7, 25, 0.5
    assert math.ceil(n * (k / n)) == 8
    r = k / n
    kl = r * math.log(r / eps) + (1 - r) * math.log((1 - r) / (1 - eps))
    expected = min(1.0, math.exp(-n * kl), math.e * stats.binom.cdf(7, n, eps))
    assert expected == math.e * stats.binom.cdf(7, n, eps)  # the Bentkus term decides here
    assert hoeffding_bentkus_pvalue(k, n, eps) == pytest.approx(expected, rel=1e-12)
    bad = [
        (k, n)
        for n in range(1, 200)
        for k in range(n + 1)
        if hoeffding_bentkus_pvalue(k, n, 0.3) > min(1.0, math.e * stats.binom.cdf(k, n, 0.3))
    ]
    assert bad == []


@pytest.mark.parametrize(
    ("eps", "delta", "method", "test_size", "expected"),
    [
        (0.005, 0.1, "binomial", None, 460),  # the case: 359 inputs are too few
        (0.005, 0.1, "hoeffding_bentkus", None, 460),  # (1 - eps) ** n after zero losses too
        (0.05, 0.1, "binomial", None, 45),
        (0.01, 0.05, "binomial", None, 299),
    ],
)
def test_min_calibration_size_is_the_smallest_certifying_count(
    eps: float, delta: float, method: str, test_size: int | None, expected: int
) -> None:
    n = min_calibration_size(eps, delta, method=method, test_size=test_size)
    assert n == expected
    pvalue = binomial_pvalue if method == "binomial" else hoeffding_bentkus_pvalue
    assert pvalue(0, n, eps) <= delta < pvalue(0, n - 1, eps)


def test_min_calibration_size_with_a_finite_test_size() -> None:
    for m in (50, 400, 3000):
        n = min_calibration_size(0.01, 0.1, test_size=m)
        p = transductive_pvalues([0, 0], 0, m, 0.01)  # n = 0: p-value 1
        assert p.tolist() == [1.0, 1.0]
        assert transductive_pvalues([0], n, m, 0.01)[0] <= 0.1
        assert transductive_pvalues([0], n - 1, m, 0.01)[0] > 0.1


def test_calibrate_options_validate_and_give_targets() -> None:
    assert CalibrateOptions().targets == {"disagreement": 0.005}
    both = CalibrateOptions(max_disagreement=0.01, max_quality_drop=0.02)
    assert both.targets == {"disagreement": 0.01, "quality_drop": 0.02}
    assert CalibrateOptions(max_quality_drop=0.02).targets == {"quality_drop": 0.02}
    assert CalibrateOptions().min_inputs() == 460
    with pytest.raises(ValueError, match="'delta'"):
        CalibrateOptions(delta=1.5)
    with pytest.raises(ValueError, match="'method'"):
        CalibrateOptions(method="magic")
    with pytest.raises(ValueError, match="'test_size'"):
        CalibrateOptions(test_size=0)
    with pytest.raises(ValueError, match="'seed'"):
        CalibrateOptions(seed=1.5)  # type: ignore[arg-type]


def test_served_stage_and_cost() -> None:
    scores = np.array([[0.1, 0.5, 0.9, 0.9], [0.0, 0.2, 0.3, 0.9]])
    assert served_stage(scores, 0.4).tolist() == [0, 1, 1, 2]
    assert served_stage(scores, -math.inf).tolist() == [2, 2, 2, 2]
    assert served_stage(scores, math.inf).tolist() == [0, 0, 0, 0]
    assert cascade_cost(np.array([0, 1, 2]), [1.0, 10.0, 100.0]).tolist() == [1.0, 11.0, 111.0]


def test_losses_disagreement_and_quality_drop() -> None:
    answers = np.array([[0, 1, 2, 3], [0, 0, 0, 3]])  # stage 0 vs reference (stage 1)
    served = np.array([0, 0, 0, 0])
    labels = np.array([0, 1, 0, 0])
    assert losses(answers, served, None, "disagreement").tolist() == [0, 1, 1, 0]
    # wrong where the reference is right: input 2 only (input 1: reference wrong).
    assert losses(answers, served, labels, "quality_drop").tolist() == [0, 0, 1, 0]


def test_ltt_chooses_the_known_threshold() -> None:
    """Constructed example: n = 100 inputs, grid [-inf, 0.1, 0.2, 0.3, 0.4, inf].

    The cheap answer is wrong on inputs whose score is >= 0.25 (10 of them, scores 0.25) and
    on one more input with score 0.15; all the rest have score 0.05. Losses at each
    threshold: 0.1 -> 0, 0.2 -> 1, 0.3 -> 11, 0.4 -> 11, inf -> 11. With eps = 0.05 and
    delta = 0.1: p(0) = 0.95^100 = 0.0059, p(1) = P(Bin <= 1) = 0.037, p(11) ~ 0.99. So
    fixed-sequence testing accepts 0.1 and 0.2 and stops at 0.3: the chosen threshold is 0.2.
    """
    n = 100
    scores = np.full(n, 0.05)
    answers_cheap = np.zeros(n, dtype=int)
    scores[:10] = 0.25
    answers_cheap[:10] = 1
    scores[10] = 0.15
    answers_cheap[10] = 1
    answers = np.stack([answers_cheap, np.zeros(n, dtype=int)])
    grid = np.array([-np.inf, 0.1, 0.2, 0.3, 0.4, np.inf])
    result = learn_then_test(
        scores[None], answers, targets={"disagreement": 0.05}, delta=0.1, grid=grid
    )
    assert result.table["disagreement"].tolist() == [0.0, 0.01, 0.11, 0.11, 0.11]
    expected_p = [stats.binom.cdf(k, n, 0.05) for k in (0, 1, 11, 11, 11)]
    np.testing.assert_allclose(result.table["pvalue"], expected_p)
    assert result.table["accepted"].tolist() == [True, True, False, False, False]
    assert result.threshold == 0.2 and result.index == 2 and result.certified
    # A stricter delta rejects only the zero-loss candidate: threshold 0.1.
    strict = learn_then_test(
        scores[None], answers, targets={"disagreement": 0.05}, delta=0.02, grid=grid
    )
    assert strict.threshold == 0.1
    # Too few samples for eps: nothing certified, the fallback always escalates.
    tiny = learn_then_test(
        scores[None, :20], answers[:, :20], targets={"disagreement": 0.05}, delta=0.1, grid=grid
    )
    assert tiny.threshold == -np.inf and not tiny.certified


def test_ltt_with_two_targets_takes_the_larger_pvalue() -> None:
    n = 100
    scores = np.full((1, n), 0.05)
    scores[0, :2] = 0.5
    answers = np.zeros((2, n), dtype=int)
    answers[0, :2] = 1  # two disagreements at thresholds >= 0.5
    labels = np.zeros(n, dtype=int)
    labels[0] = 1  # reference wrong on input 0: only input 1 counts as a quality drop
    grid = np.array([-np.inf, 0.1, 1.0])
    result = learn_then_test(
        scores,
        answers,
        targets={"disagreement": 0.05, "quality_drop": 0.05},
        delta=0.1,
        grid=grid,
        labels=labels,
    )
    row = result.table.iloc[1]
    assert row["pvalue_disagreement"] == pytest.approx(stats.binom.cdf(2, n, 0.05))
    assert row["pvalue_quality_drop"] == pytest.approx(stats.binom.cdf(1, n, 0.05))
    assert row["pvalue"] == row["pvalue_disagreement"]


def test_ltt_refuses_bad_arguments() -> None:
    s, a = np.zeros((1, 5)), np.zeros((2, 5), dtype=int)
    with pytest.raises(ValueError, match="'delta'"):
        learn_then_test(s, a, targets={"disagreement": 0.1}, delta=1.0)
    with pytest.raises(ValueError, match="'max_disagreement'"):
        learn_then_test(s, a, targets={"disagreement": 0.0}, delta=0.1)
    with pytest.raises(ValueError, match="'method'"):
        learn_then_test(s, a, targets={"disagreement": 0.1}, delta=0.1, method="magic")
    with pytest.raises(ValueError, match="-inf"):
        learn_then_test(s, a, targets={"disagreement": 0.1}, delta=0.1, grid=np.array([0.5]))


def test_default_grid_shape() -> None:
    g = default_grid()
    assert g[0] == -np.inf and g[-1] == np.inf
    assert g[1] == pytest.approx(1e-7) and g[-2] == pytest.approx(1.0)
    assert np.all(np.diff(g) > 0)


def _cubic_draw(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform on [0, 1]; the cheap answer is wrong with probability score**3."""
    score = rng.random(m)
    wrong = rng.random(m) < score**3
    return score[None], np.stack([wrong.astype(int), np.zeros(m, dtype=int)])


def test_guarantee_holds_over_random_draws() -> None:
    """Monte Carlo: the cheap answer is wrong w.p. rising with the score; the violation rate of
    the target over 200 calibration draws stays below delta."""
    rng = np.random.default_rng(0)
    eps, delta, n = 0.05, 0.1, 400
    grid = np.concatenate([[-np.inf], np.linspace(0.01, 1.0, 100), [np.inf]])

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        return _cubic_draw(rng, m)

    big_s, big_a = draw(50_000)
    violations = 0
    for _ in range(200):
        s, a = draw(n)
        t = learn_then_test(s, a, targets={"disagreement": eps}, delta=delta, grid=grid).threshold
        risk = losses(big_a, served_stage(big_s, t), None, "disagreement").mean()
        violations += risk > eps
    assert violations / 200 <= delta


def test_guarantee_bounds_the_true_risk_not_the_test_split_rate() -> None:
    """Scores uniform on [0, 1], the cheap answer wrong w.p. score**3: the risk of threshold t
    is exactly t**4 / 4. Over 300 calibration draws the chosen threshold's true risk exceeds
    eps at most delta of the time; an independent test split of the same size, on which the
    served disagreement scatters binomially around the true risk, exceeds eps more often."""
    rng = np.random.default_rng(3)
    eps, delta, n = 0.05, 0.1, 400
    grid = np.concatenate([[-np.inf], np.linspace(0.01, 1.0, 100), [np.inf]])

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        return _cubic_draw(rng, m)

    # Here the bound is tight (3000 draws give 0.0997: the binomial p-value at the first
    # threshold whose risk exceeds eps is 0.099), so the 300-draw rate is checked against delta
    # plus three Monte Carlo standard errors.
    tolerance = 3 * (delta * (1 - delta) / 300) ** 0.5
    true_viol = split_viol = 0
    draws = 300
    for _ in range(draws):
        s, a = draw(n)
        t = learn_then_test(s, a, targets={"disagreement": eps}, delta=delta, grid=grid).threshold
        true_risk = min(t, 1.0) ** 4 / 4 if t > 0 else 0.0
        true_viol += true_risk > eps
        ts, ta = draw(n)
        split_viol += losses(ta, served_stage(ts, t), None, "disagreement").mean() > eps
    assert true_viol / draws <= delta + tolerance
    assert split_viol > true_viol


def test_default_grid_resolves_scores_crowded_near_one() -> None:
    """A low-confidence model's scores sit near 1. The old grid (log-spaced near 0 only) had
    nothing between 0.89 and 1, so it escalated every input; the grid is now as fine near 1."""
    rng = np.random.default_rng(0)
    n = 4000
    score = 1.0 - 1e-3 * rng.random(n)  # all in (0.999, 1]
    wrong = score > 1.0 - 1e-4  # the hardest 10% are wrong
    answers = np.stack([wrong.astype(int), np.zeros(n, dtype=int)])
    res = learn_then_test(score[None], answers, targets={"disagreement": 0.01}, delta=0.1)
    served = served_stage(score[None], res.threshold)
    assert res.certified
    assert 0.99 < res.threshold < 1.0
    assert (served == 1).mean() < 0.2  # escalates the hard tenth, not everything
    assert losses(answers, served, None, "disagreement").mean() <= 0.01
