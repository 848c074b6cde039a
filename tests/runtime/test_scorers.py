from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpsearch.runtime import (
    SCORERS,
    FunctionScorer,
    GateScorer,
    answer_logits,
    cut_point,
    entropy_score,
    fit_logistic,
    make_scorer,
    margin_score,
    max_softmax_score,
    ratio_score,
)


def test_builtin_scores_match_their_definitions() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [10.0, -10.0, -10.0]])
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(max_softmax_score(logits), 1 - p.max(-1).values.double())
    top2 = p.topk(2, -1).values.double()
    torch.testing.assert_close(margin_score(logits), 1 - (top2[:, 0] - top2[:, 1]))
    h = -(p * p.log()).sum(-1) / math.log(3)
    torch.testing.assert_close(entropy_score(logits), h)
    torch.testing.assert_close(ratio_score(logits), (top2[:, 1] / top2[:, 0]), rtol=1e-6, atol=0)
    assert ratio_score(logits).tolist() == [math.exp(-1.0), 1.0, math.exp(-20.0)]
    # Higher = harder: the uniform row is the hardest for every built-in score.
    for name in ("max_softmax", "margin", "ratio", "entropy"):
        s = make_scorer(name)(logits)
        assert int(s.argmax()) == 1 and int(s.argmin()) == 2
        assert bool(((s >= 0) & (s <= 1)).all())


@pytest.mark.parametrize("name", ["max_softmax", "margin", "ratio", "entropy", "gate"])
def test_score_one_and_score_list_equal_the_batch_score_exactly(name: str, ratio_path: str) -> None:
    """The serving paths give the very numbers calibration computes in a batch."""
    logits = torch.randn(64, 37, generator=torch.Generator().manual_seed(3)) * 4
    scorer = make_scorer(name)
    if scorer.learned:
        scorer.fit([logits], [(logits.argmax(-1) % 2).numpy().astype(float)])
    batch = scorer.score(logits, 0).tolist()
    rows = [scorer.score_one(row[None], 0) for row in logits]
    small = [v for part in logits.split(5) for v in scorer.score_list(part, 0)]
    if scorer.learned:  # a [1, 6] @ [6] product may round apart from a [64, 6] one
        np.testing.assert_allclose(rows, batch, rtol=1e-12)
        np.testing.assert_allclose(small, batch, rtol=1e-12)
    else:
        assert rows == batch
        assert small == batch


@pytest.mark.parametrize(
    "row",
    [
        [1.0, float("nan"), 0.0],  # NaN after the maximum: the batch score is NaN too
        [float("nan"), 1.0, 0.0],
        [float("inf"), 1.0, 0.0],  # score 0: the top answer is infinitely ahead
        [float("inf"), float("inf"), 0.0],  # inf - inf: NaN
        [float("inf"), float("-inf"), 0.0],
        [2.0, 2.0, 1.0],  # a tie: 1
        [3.0],  # one class: 0
    ],
)
def test_ratio_one_follows_the_batch_path_on_edge_rows(row: list[float], ratio_path: str) -> None:
    """The batch-1 ratio is taken on Python floats; non-finite rows go the tensor way."""
    scorer = make_scorer("ratio")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.tensor([row], dtype=dtype)
        one, batch = scorer.score_one(logits), scorer.score(logits).item()
        assert one == batch or (math.isnan(one) and math.isnan(batch)), (row, dtype)
        (small,) = scorer.score_list(logits.expand(3, -1))[1:2]
        assert small == batch or (math.isnan(small) and math.isnan(batch)), (row, dtype)


def test_ratio_one_on_many_classes_and_low_precision_logits(ratio_path: str) -> None:
    gen = torch.Generator().manual_seed(5)
    scorer = make_scorer("ratio")
    for classes in (2, 96, 192, 193, 5000):  # Python floats up to 192 classes, topk beyond
        logits = torch.randn(8, classes, generator=gen) * 3
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            lg = logits.to(dtype)
            assert [scorer.score_one(r[None]) for r in lg] == scorer.score(lg).tolist()


def test_ratio_keeps_the_logits_precision(ratio_path: str) -> None:
    """float64 logits are compared in float64 on every path (a float32 cast would tie them)."""
    logits = torch.tensor([[1.0, 1.0 + 2**-40, -3.0]], dtype=torch.float64)
    scorer = make_scorer("ratio")
    expected = math.exp(-(2**-40))
    assert expected < 1.0
    assert scorer.score_one(logits) == expected
    assert scorer.score(logits).tolist() == [expected]
    assert scorer.score_list(logits.expand(2, -1)) == [expected, expected]


@pytest.mark.parametrize(
    "row",
    [
        [0.0, 1.0],
        [1.0, 0.0],
        [1.0, 1.0],
        [0.0, 0.0, 1.0],
        [0.0, 2.0, 1.0],
        [3.0, 3.0, 3.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
        [5.0, 4.0, 3.0, 2.0, 1.0],
        [-1.0, -3.0, -1.0, -2.0],
    ],
)
def test_ratio_one_takes_the_runner_up_from_the_heap(row: list[float], ratio_path: str) -> None:
    """The batch-1 gap comes from a heapified row: the runner-up is one of the top's children."""
    top = sorted(row, reverse=True)
    assert make_scorer("ratio").score_one(torch.tensor([row])) == math.exp(top[1] - top[0])


def test_unsorted_top2_pairs_give_the_sorted_gap() -> None:
    from mpsearch.runtime._scorers import _gaps

    inf, nan = math.inf, math.nan
    pairs = [[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [inf, 1.0], [1.0, inf], [-inf, 5.0], [inf, inf]]
    assert _gaps(pairs)[:6] == [-2.0, -2.0, 0.0, -inf, -inf, -inf]
    assert math.isnan(_gaps(pairs)[6]) and math.isnan(_gaps([[nan, 1.0]])[0])
    assert math.isnan(_gaps([[1.0, nan]])[0])


def test_cut_point_splits_raw_values_exactly() -> None:
    """``link(v) > t`` exactly when ``v > cut_point(link, t)``: checked at the cut and its
    neighbours for ``exp`` (overflowing far up) and a step link."""
    rng = np.random.default_rng(0)
    thresholds = [0.0, 1e-300, 5e-324, 0.25, 0.5, 1.0 - 1e-16, 1.0, 2.0, 1e308, math.inf]
    for t in thresholds + rng.uniform(0, 1, 50).tolist():
        x = cut_point(math.exp, t)
        assert x is not None and math.exp(x) <= t
        if x != math.inf:
            up = math.nextafter(x, math.inf)
            assert up == math.inf or math.exp(up) > t
    for t in (-1e-300, -1.0, -math.inf):  # exp(-inf) = 0 is already above t: no cut
        assert cut_point(math.exp, t) is None

    def step(v: float) -> float:
        return float(v >= 1.0)

    assert cut_point(step, 0.5) == math.nextafter(1.0, -math.inf)
    assert cut_point(step, 1.0) == math.inf
    assert cut_point(step, -0.5) is None


def test_function_scorer_link_needs_its_raw_functions() -> None:
    def gap(lg: torch.Tensor) -> float:
        return 0.0

    with pytest.raises(ValueError, match="'link'"):
        FunctionScorer(ratio_score, link=math.exp)
    with pytest.raises(ValueError, match="'link'"):
        FunctionScorer(ratio_score, one_fn=gap, list_fn=lambda lg: [0.0], link=3.0)
    scorer = FunctionScorer(ratio_score, one_fn=gap, list_fn=lambda lg: [0.0, -1.0], link=math.exp)
    assert scorer.score_one(torch.zeros(1, 2)) == 1.0 and scorer.raw_one(torch.zeros(1, 2)) == 0.0
    assert scorer.score_list(torch.zeros(2, 2)) == [1.0, math.exp(-1.0)]
    assert scorer.raw_list(torch.zeros(2, 2)) == [0.0, -1.0]


def test_answer_logits_takes_the_last_position_of_a_language_model() -> None:
    out = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    torch.testing.assert_close(answer_logits(out), out[:, -1])
    torch.testing.assert_close(answer_logits({"logits": out[:, 0]}), out[:, 0])
    with pytest.raises(ValueError, match="shape"):
        answer_logits(torch.zeros(1, 2, 3, 4))


def test_registry_and_errors() -> None:
    assert set(SCORERS) == {"max_softmax", "margin", "ratio", "entropy", "gate"}
    assert isinstance(make_scorer("gate"), GateScorer)
    with pytest.raises(ValueError, match="'scorer'.*'entropy'"):
        make_scorer("nope")
    with pytest.raises(ValueError, match="'scorer'"):
        make_scorer(3)
    with pytest.raises(RuntimeError, match="not fitted"):
        GateScorer()(torch.zeros(1, 3))


def test_logistic_regression_matches_a_separable_rule() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).astype(float)
    w = fit_logistic(x, y, l2=1e-4)
    pred = (np.hstack([x, np.ones((400, 1))]) @ w > 0).astype(float)
    assert (pred == y).mean() > 0.97
    # One class only: still finite and predicting that class.
    w1 = fit_logistic(x, np.zeros(400))
    assert np.all(np.isfinite(w1)) and (np.hstack([x, np.ones((400, 1))]) @ w1 < 0).all()


def test_builtin_scores_match_their_definitions_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 37, generator=g) * 4
    p = torch.softmax(logits.double(), -1)
    top2 = p.topk(2, -1).values
    expected = {
        "max_softmax": 1 - p.max(-1).values,
        "margin": 1 - (top2[:, 0] - top2[:, 1]),
        "entropy": -(p * p.log()).sum(-1) / math.log(37),
    }
    for name, want in expected.items():
        got = make_scorer(name).score_array(logits.numpy(), 0)
        assert got.shape == (200,)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-6)
        # one row at a time gives the same scores as the whole batch
        rows = np.concatenate(
            [make_scorer(name).score_array(r, 0) for r in logits.numpy()[:20, None]]
        )
        np.testing.assert_array_equal(rows, got[:20])


def test_callable_scorer_goes_through_score_array_with_checks() -> None:
    scorer = make_scorer(lambda logits: logits[:, 0])
    out = scorer.score_array(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), 0)
    np.testing.assert_array_equal(out, [1.0, 3.0])
    bad = make_scorer(lambda logits: logits)
    with pytest.raises(ValueError, match="shape"):
        bad.score_array(np.zeros((2, 2), dtype=np.float32), 0)
