from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from mpsearch.runtime import SCORERS, FunctionScorer, make_scorer
from mpsearch.runtime._scorers import (
    GateScorer,
    answer_logits,
    entropy_score,
    fit_logistic,
    input_scores,
    log_cut,
    margin_score,
    max_softmax_score,
    ratio_score,
    score_stages,
    stage_answers,
    top2_gaps,
)


def _fast_scores(scorer, logits: torch.Tensor) -> list[float]:
    """The serving path's values, as scores."""
    values = scorer.fast(logits, 0)
    return [math.exp(v) for v in values] if scorer.fast_is_log else values


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
def test_fast_path_equals_the_batch_score_exactly(name: str, ratio_path: str) -> None:
    """The serving path gives the very numbers calibration computes in a batch."""
    logits = torch.randn(64, 37, generator=torch.Generator().manual_seed(3)) * 4
    scorer = make_scorer(name)
    if scorer.learned:
        scorer.fit([logits], [(logits.argmax(-1) % 2).numpy().astype(float)])
    batch = scorer.score(logits, 0).tolist()
    rows = [v for row in logits for v in _fast_scores(scorer, row[None])]
    small = [v for part in logits.split(5) for v in _fast_scores(scorer, part)]
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
def test_ratio_fast_path_follows_the_batch_path_on_edge_rows(
    row: list[float], ratio_path: str
) -> None:
    """A batch-1 row is taken on Python floats; non-finite rows go the tensor way."""
    scorer = make_scorer("ratio")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.tensor([row], dtype=dtype)
        (one,), batch = _fast_scores(scorer, logits), scorer.score(logits).item()
        assert one == batch or (math.isnan(one) and math.isnan(batch)), (row, dtype)
        (small,) = _fast_scores(scorer, logits.expand(3, -1))[1:2]
        assert small == batch or (math.isnan(small) and math.isnan(batch)), (row, dtype)


def test_ratio_fast_path_on_many_classes_and_low_precision_logits(ratio_path: str) -> None:
    gen = torch.Generator().manual_seed(5)
    scorer = make_scorer("ratio")
    for classes in (2, 96, 192, 193, 5000):  # Python floats up to 192 classes, topk beyond
        logits = torch.randn(8, classes, generator=gen) * 3
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            lg = logits.to(dtype)
            rows = [v for r in lg for v in _fast_scores(scorer, r[None])]
            assert rows == scorer.score(lg).tolist()


def test_ratio_keeps_the_logits_precision(ratio_path: str) -> None:
    """float64 logits are compared in float64 on every path (a float32 cast would tie them)."""
    logits = torch.tensor([[1.0, 1.0 + 2**-40, -3.0]], dtype=torch.float64)
    scorer = make_scorer("ratio")
    expected = math.exp(-(2**-40))
    assert expected < 1.0
    assert _fast_scores(scorer, logits) == [expected]
    assert scorer.score(logits).tolist() == [expected]
    assert _fast_scores(scorer, logits.expand(2, -1)) == [expected, expected]


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
def test_ratio_fast_path_finds_the_runner_up(row: list[float], ratio_path: str) -> None:
    """The batch-1 gap: the top value, then the largest of the others (ties included)."""
    top = sorted(row, reverse=True)
    assert top2_gaps(torch.tensor([row])) == [top[1] - top[0]]
    assert _fast_scores(make_scorer("ratio"), torch.tensor([row])) == [math.exp(top[1] - top[0])]


def _bisection_cut_point(link, threshold: float) -> float | None:
    """The cut point as it was found before: bisection over the floats' bit order."""
    sign = 1 << 63

    def ordered(x: float) -> int:
        (bits,) = struct.unpack("<q", struct.pack("<d", x))
        return bits if bits >= 0 else -(bits + sign)

    def from_ordered(k: int) -> float:
        (x,) = struct.unpack("<d", struct.pack("<q", k if k >= 0 else -k - sign))
        return x

    def value(v: float) -> float:
        try:
            return link(v)
        except OverflowError:
            return math.inf

    if not value(-math.inf) <= threshold:
        return None
    if value(math.inf) <= threshold:
        return math.inf
    lo, hi = ordered(-math.inf), ordered(math.inf)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value(from_ordered(mid)) <= threshold:
            lo = mid
        else:
            hi = mid
    return from_ordered(lo)


def test_log_cut_equals_the_bisection_cut_point() -> None:
    """``log`` plus ``nextafter`` steps give the old 64-step bisection's cut point on edge cases
    (0, subnormals, values next to 1, the largest float, infinities, negatives), the default
    grid, scores of random gaps and random thresholds over every decade."""
    from mpsearch.runtime._calibration import default_grid

    rng = np.random.default_rng(0)
    edge = [0.0, 5e-324, 1e-320, 2.2250738585072014e-308, 1e-300, 1e-7, 0.25, 0.5, 1.0, 2.0]
    edge += [1.0 - 2.0**-53, 1.0 - 2.0**-52, 1.0 + 2.0**-52, 1e308, 1.7976931348623157e308]
    edge += [math.inf, -0.0, -5e-324, -1.0, -math.inf]
    gaps = -rng.exponential(size=500) * 10.0 ** rng.uniform(-20, 2.5, size=500)
    values = [
        *edge,
        *default_grid()[1:-1].tolist(),
        *np.exp(gaps).tolist(),
        *rng.uniform(0, 1, 500).tolist(),
        *(1.0 - rng.uniform(0, 1, 300) * 10.0 ** rng.uniform(-16, -1, 300)).tolist(),
        *(10.0 ** rng.uniform(-323, 308, 300)).tolist(),
    ]
    for t in values:
        assert log_cut(t) == _bisection_cut_point(math.exp, t), t


def test_log_cut_splits_raw_values_exactly() -> None:
    """``exp(v) > t`` exactly when ``v > log_cut(t)``: checked at the cut and its neighbours."""
    rng = np.random.default_rng(0)
    thresholds = [0.0, 1e-300, 5e-324, 0.25, 0.5, 1.0 - 1e-16, 1.0, 2.0, 1e308, math.inf]
    for t in thresholds + rng.uniform(0, 1, 50).tolist():
        x = log_cut(t)
        assert x is not None and math.exp(x) <= t
        if x != math.inf:
            up = math.nextafter(x, math.inf)
            assert up == math.inf or up > 709.8 or math.exp(up) > t
    for t in (-1e-300, -1.0, -math.inf):  # exp(-inf) = 0 is already above t: no cut
        assert log_cut(t) is None


def test_function_scorer_fast_path_options() -> None:
    def gaps(lg: torch.Tensor) -> list[float]:
        return [0.0, -1.0][: lg.shape[0]]

    with pytest.raises(ValueError, match="'fast_is_log'"):
        FunctionScorer(ratio_score, fast_is_log=True)
    with pytest.raises(ValueError, match="'fast'"):
        FunctionScorer(ratio_score, fast=3.0)  # type: ignore[arg-type]
    scorer = FunctionScorer(ratio_score, fast=gaps, fast_is_log=True)
    assert scorer.fast(torch.zeros(2, 2)) == [0.0, -1.0]
    assert FunctionScorer(ratio_score).fast(torch.zeros(2, 2)) == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        FunctionScorer(lambda lg: lg).fast(torch.zeros(2, 2))


def test_answer_logits_takes_the_last_position_of_a_language_model() -> None:
    out = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    torch.testing.assert_close(answer_logits(out), out[:, -1])
    torch.testing.assert_close(answer_logits({"logits": out[:, 0]}), out[:, 0])
    with pytest.raises(ValueError, match="shape"):
        answer_logits(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="holds none"):  # a 4-D field that holds no scores
        answer_logits({"pixel_values": torch.zeros(1, 2, 3, 4)})
    with pytest.raises(
        ValueError, match="output 'last_hidden_state' \\(shape \\(1, 2, 3\\)\\) holds none"
    ):
        answer_logits({"loss": torch.tensor(0.5), "last_hidden_state": torch.zeros(1, 2, 3)})
    torch.testing.assert_close(answer_logits({"start_logits": out[:, 0]}), out[:, 0])


def test_answer_logits_keeps_every_position_of_a_dense_output() -> None:
    """Per-pixel logits named like class scores ([B, C, H, W], classes on dim 1) keep their
    positions, flattened; an unnamed 4-D output is refused, saying how to name it."""
    seg = torch.randn(2, 3, 4, 5)
    for output in ({"logits": seg}, {"out": seg, "aux": seg}):
        got = answer_logits(output)
        assert got.shape == (2, 3, 20)
        assert torch.equal(got[1, :, 7], seg[1, :, 1, 2])
    with pytest.raises(ValueError, match=r"return it as \{'logits': \.\.\.\}"):
        answer_logits(seg)


def test_a_language_model_answers_at_each_rows_last_real_token() -> None:
    """Right padding (an ``attention_mask`` of the output's ``[B, T]``): the answer is the
    logits at each row's last real token, not at the padding after it; left padding, a
    tensor batch or no padding: the last position."""
    logits = torch.randn(3, 5, 7)
    right = {"attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])}
    got = answer_logits({"logits": logits}, batch=right)
    assert torch.equal(got, torch.stack([logits[0, 2], logits[1, 4], logits[2, 0]]))
    left = {"attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])}
    assert torch.equal(answer_logits({"logits": logits}, batch=left), logits[:, -1])
    assert torch.equal(answer_logits(logits, batch=torch.zeros(3, 5)), logits[:, -1])


def test_answer_logits_keeps_every_token_of_a_token_classifier() -> None:
    """A token classifier's [B, T, C] answers at every token (as [B, C, T]); a language
    model's [B, T, V] at the last position."""
    outputs = pytest.importorskip("transformers.modeling_outputs")
    logits = torch.randn(2, 5, 3)
    got = answer_logits(outputs.TokenClassifierOutput(logits=logits))
    assert got.shape == (2, 3, 5) and torch.equal(got, logits.transpose(1, 2))
    assert torch.equal(answer_logits(outputs.CausalLMOutput(logits=logits)), logits[:, -1])


@pytest.mark.parametrize("name", ["max_softmax", "margin", "ratio", "entropy"])
def test_a_dense_input_scores_the_mean_of_its_positions(name: str) -> None:
    scorer = make_scorer(name)
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    expected = [scorer.score(logits[i].T.contiguous()).double().mean().item() for i in range(3)]
    got = input_scores(scorer, logits)
    assert got.dtype == torch.float64
    # every position at once along dimension 1: the per-row definition to float32 rounding
    assert got.tolist() == pytest.approx(expected, rel=1e-6, abs=0)
    rows = FunctionScorer(scorer.score)  # a scorer without `positions`: rows of C logits
    assert input_scores(rows, logits).tolist() == pytest.approx(expected, rel=1e-15, abs=0)
    assert score_stages(scorer, [logits])[0].tolist() == got.tolist()
    with pytest.raises(ValueError, match="'positions'"):
        FunctionScorer(scorer.score, positions="mean")
    flat = logits[:, :, 0]  # a classifier's logits go to the scorer as they are
    assert input_scores(scorer, flat).tolist() == scorer.score(flat).tolist()


def test_a_multi_label_classifier_answers_per_label_and_scores_its_least_certain_label() -> None:
    """``[B, L]`` logits of a multi-label classifier become ``[B, 2, L]``: each label a position
    of two classes ``(0, logit)``, whose softmax is the label's sigmoid and whose arg-max is
    ``logit > 0``. ``reduce="max"`` scores an input by its least certain label."""
    logits = torch.tensor([[3.0, -2.0, 0.1], [4.0, -4.0, -5.0]])
    pairs = answer_logits({"logits": logits}, multi_label=True)
    assert pairs.shape == (2, 2, 3) and torch.equal(pairs[:, 1], logits)
    assert pairs.argmax(1).tolist() == (logits > 0).long().tolist()
    torch.testing.assert_close(pairs.softmax(1)[:, 1], logits.sigmoid())
    assert torch.equal(answer_logits(logits), logits)  # not multi-label: a softmax classifier
    scorer = make_scorer("ratio")  # p2 / p1 of (0, x): exp(-|x|)
    per_label = torch.exp(-logits.double().abs())
    got = input_scores(scorer, pairs, reduce="max")
    assert got.tolist() == pytest.approx(per_label.amax(1).tolist(), rel=1e-6)
    assert input_scores(scorer, pairs).tolist() == pytest.approx(
        per_label.mean(1).tolist(), rel=1e-6
    )
    assert score_stages(scorer, [pairs], reduce="max")[0].tolist() == got.tolist()


def test_dense_answers_differ_from_the_reference_below_min_agreement() -> None:
    """A dense input agrees when at least ``min_agreement`` of its positions take the
    reference's arg-max: 7 of 10 agreeing is agreement at 0.7, not at 0.71."""
    reference = torch.zeros(3, 2, 10)
    reference[:, 0] = 1.0  # class 0 everywhere
    variant = reference.clone()
    for i, wrong in enumerate((0, 3, 4)):  # input i has `wrong` positions on class 1
        variant[i, 1, :wrong] = 2.0
    assert stage_answers([variant, reference], min_agreement=0.7).tolist() == [
        [0, 0, 1],
        [0, 0, 0],
    ]
    assert stage_answers([variant, reference], min_agreement=0.71)[0].tolist() == [0, 1, 1]
    assert stage_answers([variant, reference], min_agreement=1.0)[0].tolist() == [0, 1, 1]
    classes = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # a classifier's answers: the arg-max
    assert stage_answers([classes, classes], min_agreement=0.5).tolist() == [[1, 0], [1, 0]]


def test_registry_and_errors() -> None:
    assert set(SCORERS) == {"max_softmax", "margin", "ratio", "entropy", "gate"}
    assert isinstance(make_scorer("gate"), GateScorer)
    with pytest.raises(ValueError, match="'scorer'.*'entropy'"):
        make_scorer("nope")
    with pytest.raises(ValueError, match="'scorer'"):
        make_scorer(3)
    with pytest.raises(RuntimeError, match="not fitted"):
        GateScorer()(torch.zeros(1, 3))


def _newton_logistic(features: np.ndarray, targets: np.ndarray, l2: float) -> np.ndarray:
    """The gate's former solver (Newton's method, bias almost unpenalised), as a reference."""
    x = np.hstack([features, np.ones((len(features), 1))])
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    reg[-1] = 1e-8
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - targets) / len(targets) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(targets) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


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


@pytest.mark.parametrize("l2", [1e-2, 1e-4, 1e-6])
def test_logistic_regression_fits_what_the_newton_solver_fitted(l2: float) -> None:
    """scikit-learn's solver reaches the former Newton solver's weights (same objective)."""
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(600, 6))
    y = (rng.uniform(size=600) < 1 / (1 + np.exp(-(4 * x[:, 0] - 3 * x[:, 5] - 1)))).astype(float)
    np.testing.assert_allclose(fit_logistic(x, y, l2=l2), _newton_logistic(x, y, l2), atol=1e-4)


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
        got = score_stages(make_scorer(name), [logits])[0]
        assert got.shape == (200,)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-6)
        # one row at a time gives the same scores as the whole batch
        rows = np.concatenate([score_stages(make_scorer(name), [r[None]])[0] for r in logits[:20]])
        np.testing.assert_array_equal(rows, got[:20])


def test_callable_scorer_goes_through_score_stages_with_checks() -> None:
    scorer = make_scorer(lambda logits: logits[:, 0])
    out = score_stages(scorer, [torch.tensor([[1.0, 2.0], [3.0, 4.0]])])
    np.testing.assert_array_equal(out, [[1.0, 3.0]])
    bad = make_scorer(lambda logits: logits)
    with pytest.raises(ValueError, match="shape"):
        score_stages(bad, [torch.zeros(2, 2)])
    nan = make_scorer(lambda logits: torch.full((logits.shape[0],), math.nan))
    with pytest.raises(ValueError, match="NaN"):
        score_stages(nan, [torch.zeros(2, 2)])
