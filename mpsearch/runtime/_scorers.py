"""Difficulty scorers: from a variant's per-input logits to one score per input (higher = harder).

Convention: a scorer maps per-input logits ``[B, C]`` to a score ``[B]`` where a **higher
score means a harder input**; the controller escalates an input to the next variant when its
score is above the stage's threshold. The built-in scores lie in ``[0, 1]``.

Per-input answer: for classifier outputs ``[B, C]`` the answer is ``argmax`` over ``C``;
for language-model outputs ``[B, T, V]`` the answer is the **next-token prediction at the
last position** (``logits[:, -1].argmax(-1)``), and the scores see those last-position logits.
Dense outputs (a segmentation map's per-pixel logits ``[B, C, H, W]``: class dimension 1) have
an answer per position: an input agrees with the reference when at least ``min_agreement`` of
its positions take the reference's arg-max (:func:`stage_answers`), and its score is the mean
of the scorer's per-position scores (:func:`input_scores`). A multi-label classifier's labels
are such positions, each with two classes (:func:`answer_logits`).

A scorer has one definition, :meth:`Scorer.score` (a tensor in, a tensor out: what
calibration uses), and at most one fast path, :meth:`Scorer.fast` (Python floats for the
serving path, the very same numbers, or their logarithms when ``fast_is_log``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mpsearch._data import main_output, token_mask
from mpsearch._validation import invalid, unknown
from mpsearch.profile._metrics import class_dim, label_pairs, may_hold_scores

try:  # the optional C helper (setup.py): top-2 gaps read where the logits lie
    from mpsearch.runtime import _topgap
except ImportError:  # installed without a C compiler: the portable path, the same numbers
    _topgap = None  # type: ignore[assignment]

ScoreFn = Callable[[Tensor], Tensor]
FastFn = Callable[[Tensor], list[float]]
_F32 = torch.float32


PER_TOKEN_OUTPUTS = frozenset({"TokenClassifierOutput"})
"""Output types whose ``[B, T, C]`` logits answer at every position (Hugging Face token
classification, audio frame classification), not at the last one as a language model does."""


def answer_logits(output: Any, *, multi_label: bool = False, batch: Any = None) -> Tensor:
    """Per-input logits ``[B, C]`` of a model output (the last position of ``[B, T, V]``: of
    each row's last real token where ``batch``'s ``attention_mask`` marks right padding,
    :func:`~mpsearch._data.token_mask`), or
    the per-position logits ``[B, C, P]`` of a dense output: ``[B, C, H, W]`` named ``logits``
    or ``out`` (positions flattened: the outputs :func:`~mpsearch.profile.auto_metric` compares
    by ``kl_channels``), a :data:`PER_TOKEN_OUTPUTS` output's ``[B, T, C]`` (as ``[B, C, T]``),
    or a multi-label classifier's ``[B, L]`` (``multi_label``) as ``[B, 2, L]``: each label a
    position with the two classes ``(0, logit)`` (:func:`~mpsearch.profile._metrics.label_pairs`:
    softmax = the label's sigmoid, arg-max = ``logit > 0``).

    A field that holds no logits (``last_hidden_state``, ``waveform``: named so in the model's
    dict or ``ModelOutput``, :func:`~mpsearch.profile.auto_metric`) is refused: its arg-max
    is no answer.

    >>> answer_logits(torch.zeros(2, 5, 7)).shape
    torch.Size([2, 7])
    >>> answer_logits({"logits": torch.zeros(2, 3, 4, 4)}).shape
    torch.Size([2, 3, 16])
    >>> answer_logits(torch.tensor([[2.0, -1.0, 0.5]]), multi_label=True).argmax(1).tolist()
    [[1, 0, 1]]
    """
    logits, name = main_output(output)
    if not may_hold_scores(name):
        raise ValueError(
            f"The controller needs class logits; the model's output {name!r} (shape "
            f"{tuple(logits.shape)}) holds none. Serve a model whose output is its logits (a "
            "task head, or a wrapper that returns them)."
        )
    if logits.ndim == 1:
        return logits.unsqueeze(-1)
    if logits.ndim == 2:
        return label_pairs(logits).transpose(1, 2) if multi_label else logits
    if logits.ndim == 3:
        if type(output).__name__ in PER_TOKEN_OUTPUTS:
            return logits.transpose(1, 2)
        mask = token_mask(batch, logits) if batch is not None else None
        if mask is None:
            return logits.select(1, -1)
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return logits[torch.arange(len(logits), device=logits.device), last]
    if class_dim(logits, name) == 1:
        return logits.flatten(2)
    raise ValueError(
        "The controller needs per-input logits [B, C], language-model logits [B, T, V] or "
        "per-pixel logits [B, C, H, W] in a field named 'logits' or 'out'; got an unnamed "
        f"output of shape {tuple(logits.shape)} (return it as {{'logits': ...}} if dimension 1 "
        "holds its classes)."
    )


POSITION_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda scores: scores.mean(1),
    "max": lambda scores: scores.amax(1),
}
"""How an input's score comes from its positions' scores ``[B, P]``: ``"mean"`` (a segmentation
map or a token sequence, which agrees when most positions do) or ``"max"`` (a multi-label
classifier's labels: one flipped label changes the answer, so its least certain label
decides)."""


def input_scores(scorer: Scorer, logits: Tensor, stage: int = 0, *, reduce: str = "mean") -> Tensor:
    """Scores ``[B]`` of :func:`answer_logits`' logits at ``stage``: the scorer's own for
    ``[B, C]``; for dense logits ``[B, C, P]`` the ``reduce`` (:data:`POSITION_REDUCTIONS`,
    float64) of its scores of the ``B * P`` positions (the built-in scorers score them all
    along dimension 1 at once, ``Scorer.positions``; other scorers see them as ``B * P`` rows
    of ``C`` logits).

    >>> input_scores(make_scorer("margin"), torch.zeros(2, 3, 4)).tolist()
    [1.0, 1.0]
    """
    if logits.ndim == 2:
        return scorer.score(logits, stage)
    b, c, p = logits.shape
    if scorer.positions is not None:
        per_position = scorer.positions(logits).reshape(b * p)
    else:
        per_position = scorer.score(logits.transpose(1, 2).reshape(b * p, c), stage)
    scores = torch.from_numpy(checked_scores(per_position, b * p, scorer.name)).view(b, p)
    return POSITION_REDUCTIONS[reduce](scores)


def stage_answers(stage_logits: Sequence[Tensor], *, min_agreement: float) -> np.ndarray:
    """Per-input answers ``[K, N]`` of each variant's :func:`answer_logits` (the last: the
    reference's), which differ from the reference's exactly where the input disagrees with it.

    ``[N, C]``: the arg-max. Dense ``[N, C, P]``: 0 where at least ``min_agreement`` of the
    input's positions take the reference's arg-max (the reference's own: all 0), else 1.

    >>> ref = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # one input, 2 classes, 2 positions
    >>> stage_answers([torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), ref], min_agreement=0.5)
    array([[0],
           [0]])
    """
    if stage_logits[-1].ndim == 2:
        return np.stack([lg.argmax(-1).cpu().numpy() for lg in stage_logits])
    reference = stage_logits[-1].argmax(1)
    return np.stack(
        [
            (~agrees(lg.argmax(1), reference, min_agreement=min_agreement)).long().cpu().numpy()
            for lg in stage_logits
        ]
    )


def agrees(answer: Tensor, reference: Tensor, *, min_agreement: float) -> Tensor:
    """Whether each input's answer is the reference's: per-input answers ``[N]`` equal, or
    per-position answers ``[N, P]`` equal at ``min_agreement`` of the positions at least.

    >>> agrees(torch.tensor([[0, 1], [1, 1]]), torch.ones(2, 2), min_agreement=0.5).tolist()
    [True, True]
    """
    same = answer == reference
    return same if same.ndim == 1 else same.double().mean(1) >= min_agreement


def _as_float(logits: Tensor) -> Tensor:
    return logits if logits.dtype is _F32 else logits.float()


def max_softmax_score(logits: Tensor, dim: int = -1) -> Tensor:
    """``1 - max softmax probability`` over the classes in ``dim`` (0: fully confident), in
    float64 from float32 probabilities.

    >>> max_softmax_score(torch.tensor([[0.0, 0.0]])).tolist()
    [0.5]
    """
    return 1.0 - torch.softmax(_as_float(logits), dim).amax(dim).double()


def _max_softmax_fast(logits: Tensor) -> list[float]:
    return [1.0 - p for p in torch.softmax(_as_float(logits), -1).amax(-1).tolist()]


def _top2(values: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The largest and the second largest of ``values`` along ``dim`` (``topk(2)``'s values,
    found by a max and a masked max: several times faster along a dimension that is not the
    last)."""
    first, index = values.max(dim, keepdim=True)
    second = values.scatter(dim, index, -math.inf).amax(dim)
    return first.squeeze(dim), second


def margin_score(logits: Tensor, dim: int = -1) -> Tensor:
    """``1 - (p_1 - p_2)``, one minus the gap between the two largest probabilities over the
    classes in ``dim``, in float64 from float32 probabilities.

    >>> margin_score(torch.tensor([[0.0, 0.0]])).tolist()
    [1.0]
    """
    if logits.shape[dim] < 2:
        return torch.zeros(logits.select(dim, 0).shape, dtype=torch.float64)
    p1, p2 = _top2(torch.softmax(_as_float(logits), dim), dim)
    return 1.0 - (p1.double() - p2.double())


def _margin_fast(logits: Tensor) -> list[float]:
    if logits.shape[-1] < 2:
        return [0.0] * logits.shape[0]
    top = torch.softmax(_as_float(logits), -1).topk(2, -1).values.tolist()
    return [1.0 - (p1 - p2) for p1, p2 in top]


def ratio_score(logits: Tensor) -> Tensor:
    """``p_2 / p_1 = exp(l_2 - l_1)``: the runner-up's probability relative to the answer's (0:
    the top logit is far ahead, 1: a tie), in float64 from the logits' own values.

    It needs only the two largest logits, not the softmax. The serving path compares the
    gaps ``l_2 - l_1`` themselves with the threshold's logarithm (see :func:`log_cut`).

    >>> [round(v, 4) for v in ratio_score(torch.tensor([[0.0, 0.0], [2.0, 0.0]])).tolist()]
    [1.0, 0.1353]
    """
    return torch.tensor([math.exp(g) for g in top2_gaps(logits)], dtype=torch.float64)


def _ratio_positions(logits: Tensor) -> Tensor:
    """:func:`ratio_score` of every position of dense logits ``[B, C, P]`` at once: ``[B, P]``."""
    if logits.shape[1] < 2:
        return torch.zeros(logits.select(1, 0).shape, dtype=torch.float64)
    l1, l2 = _top2(logits, 1)
    return (l2.double() - l1.double()).exp_()


_ROW_MAX_CLASSES = 192
"""A single row with up to this many classes has its top two found on Python floats; wider
rows and batches take one ``topk``."""


def _c_readable(logits: Tensor) -> bool:
    """Whether the C helper may read ``logits`` where they lie: a contiguous ``[B, C]`` float32
    CPU tensor, not a lazily negated view (whose memory holds the values' negatives)."""
    return (
        _topgap is not None
        and type(logits) is Tensor
        and logits.dtype is _F32
        and logits.ndim == 2
        and logits.is_cpu
        and logits.is_contiguous()
        and not logits.is_neg()
    )


def top2_gaps(logits: Tensor) -> list[float]:
    """``l_2 - l_1`` per row of ``[B, C]`` logits: the log of the ratio score (``-inf`` for a
    single class, NaN where a row holds NaN or two infinities of the same sign on top).

    >>> top2_gaps(torch.tensor([[1.0, 3.0, 2.0]]))
    [-1.0]
    """
    if _c_readable(logits):
        rows, cols = logits.shape
        return _topgap.gaps(logits.data_ptr(), rows, cols)
    if logits.shape[0] == 1 and 1 < logits.shape[-1] <= _ROW_MAX_CLASSES:
        row = logits.tolist()[0]
        total = sum(row)
        if total - total == 0.0:  # every value finite (else the topk path's NaN / inf semantics)
            first = max(row)
            row[row.index(first)] = -math.inf
            return [max(row) - first]
    if logits.shape[-1] < 2:
        return [-math.inf] * logits.shape[0]
    top = logits.topk(2, -1).values.tolist()
    return [second - first for first, second in top]


def entropy_score(logits: Tensor, dim: int = -1) -> Tensor:
    """Entropy of the softmax over the classes in ``dim`` divided by ``log C`` (0: one-hot, 1:
    uniform).

    >>> [round(v, 4) for v in entropy_score(torch.zeros(1, 4)).tolist()]
    [1.0]
    """
    c = logits.shape[dim]
    if c < 2:
        return torch.zeros(logits.select(dim, 0).shape)
    h = torch.special.entr(torch.softmax(_as_float(logits), dim)).sum(dim)
    return h.div_(math.log(c)).clamp_(0.0, 1.0)


class Scorer:
    """A difficulty score, per stage of the cascade; higher = harder.

    :meth:`score` is the definition. :meth:`fast` is the serving path's equal on Python
    floats (by default ``score(...).tolist()``); a scorer with ``fast_is_log`` returns the
    scores' natural logarithms there (the ratio scorer: logit gaps), which the controller
    compares with the threshold's :func:`log_cut`. ``bounded`` scorers return values in
    ``[0, 1]`` (their thresholds come from a fixed grid); ``learned`` ones are fitted during
    calibration on a held-out part of the data.

    >>> make_scorer("margin").score(torch.zeros(1, 2)).tolist()
    [1.0]
    """

    name: str = "scorer"
    bounded: bool = True
    learned: bool = False
    fast_is_log: bool = False
    positions: ScoreFn | None = None
    """Optional: :meth:`score` of every position of dense logits ``[B, C, P]`` at once,
    ``[B, P]`` (:func:`input_scores`)."""

    def score(self, logits: Tensor, stage: int = 0) -> Tensor:
        """Scores ``[B]`` of per-input logits ``[B, C]`` at ``stage`` of the cascade."""
        raise NotImplementedError

    def fast(self, logits: Tensor, stage: int = 0) -> list[float]:
        """:meth:`score` as Python floats (their logarithms when ``fast_is_log``); NaNs unchecked."""
        scores = self.score(logits, stage)
        n = logits.shape[0]
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (n,):
            checked_scores(scores, n, self.name)  # raises with the shape it got
        return scores.tolist()

    def fit(self, stage_logits: Sequence[Tensor], stage_targets: Sequence[np.ndarray]) -> None:
        """Learn from per-stage logits and "escalation would change the answer" targets."""

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        return self.score(logits, stage)


class FunctionScorer(Scorer):
    """A scorer from a plain function ``logits [B, C] -> scores [B]`` (same for every stage).

    ``fast`` (logits -> floats, kept as ``fast_fn``) is an optional equal of ``fn`` for
    serving; with ``fast_is_log`` it returns the scores' natural logarithms. ``positions``
    (dense logits ``[B, C, P]`` -> scores ``[B, P]``) is an optional equal of ``fn`` at every
    position at once, for :func:`input_scores`.

    >>> FunctionScorer(max_softmax_score, name="max_softmax")(torch.zeros(1, 2)).tolist()
    [0.5]
    """

    def __init__(
        self,
        fn: ScoreFn,
        *,
        name: str | None = None,
        bounded: bool = False,
        fast: FastFn | None = None,
        fast_is_log: bool = False,
        positions: ScoreFn | None = None,
    ) -> None:
        if not callable(fn):
            raise invalid("scorer", fn, "a scorer name or a callable logits -> scores")
        if fast is not None and not callable(fast):
            raise invalid("fast", fast, "a callable logits -> list of floats, or None")
        if fast_is_log and fast is None:
            raise invalid("fast_is_log", fast_is_log, "False unless a 'fast' function is given")
        if positions is not None and not callable(positions):
            raise invalid("positions", positions, "a callable logits [B, C, P] -> [B, P], or None")
        self.fn = fn
        self.positions = positions
        self.fast_fn = fast
        self.fast_is_log = fast_is_log
        self.name = name or getattr(fn, "__name__", "callable")
        self.bounded = bounded

    def score(self, logits: Tensor, stage: int = 0) -> Tensor:
        return self.fn(logits)

    def fast(self, logits: Tensor, stage: int = 0) -> list[float]:
        if self.fast_fn is None:
            return super().fast(logits, stage)
        return self.fast_fn(logits)


def gate_features(logits: Tensor, *, k: int = 4) -> Tensor:
    """Features of the learned gate: sorted top-``k`` softmax probabilities, entropy, margin.

    >>> gate_features(torch.zeros(3, 10)).shape
    torch.Size([3, 6])
    """
    probs = torch.softmax(_as_float(logits), -1)
    n, c = probs.shape
    top = probs.topk(min(k, c), -1).values
    if c < k:
        top = torch.cat([top, torch.zeros(n, k - c)], -1)
    if c >= 2:
        entropy = (torch.special.entr(probs).sum(-1) / math.log(c)).clamp_(0.0, 1.0)
        margin = 1.0 - (top[:, 0] - top[:, 1])
    else:
        entropy = margin = torch.zeros(n)
    return torch.cat([top, entropy[:, None], margin[:, None]], -1)


def fit_logistic(features: np.ndarray, targets: np.ndarray, *, l2: float = 1e-2) -> np.ndarray:
    """L2-regularised logistic regression (scikit-learn); returns ``[weights..., bias]``.

    Minimises the mean log-loss plus ``l2 / 2 * |weights|^2`` (the bias is not penalised).
    With a single class in ``targets`` the weights are 0 and the bias is the smoothed log-odds
    ``log((k + 0.5) / (n - k + 0.5))``: finite, and predicting that class.

    >>> w = fit_logistic(np.array([[0.0], [1.0]]), np.array([0.0, 1.0]))
    >>> bool(w[0] > 0)
    True
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if np.unique(y).size < 2:
        k = float(y.sum())
        bias = math.log((k + 0.5) / (len(y) - k + 0.5))
        return np.concatenate([np.zeros(x.shape[1]), [bias]])
    model = LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-10, max_iter=10_000)
    model.fit(x, y.astype(np.int64))
    return np.concatenate([model.coef_[0], model.intercept_])


class GateScorer(Scorer):
    """A small learned gate per stage: logistic regression on :func:`gate_features`.

    It predicts the probability that escalating from this stage would change the answer
    (the stage's answer differs from the most precise variant's); that probability is the score.
    The features lie in ``[0, 1]`` and escalations are rare, so the L2 penalty is light (a
    heavy one shrinks the gate to a near-constant that escalates most inputs).

    >>> gate = GateScorer()
    >>> gate.fit([torch.tensor([[3.0, 0.0], [0.1, 0.0]])], [np.array([0, 1])])
    >>> bool(gate(torch.tensor([[0.1, 0.0]]))[0] > gate(torch.tensor([[3.0, 0.0]]))[0])
    True
    """

    name = "gate"
    bounded = True
    learned = True

    def __init__(self, *, l2: float = 1e-6) -> None:
        self.l2 = l2
        self.weights: list[tuple[np.ndarray, float]] = []
        self._linear: list[tuple[Tensor, float]] = []

    def fit(self, stage_logits: Sequence[Tensor], stage_targets: Sequence[np.ndarray]) -> None:
        self.weights = []
        for logits, targets in zip(stage_logits, stage_targets, strict=True):
            if len(targets) == 0:
                raise invalid("data", "0 samples", "calibration data with samples to fit the gate")
            features = gate_features(torch.as_tensor(logits)).double().cpu().numpy()
            w = fit_logistic(features, targets, l2=self.l2)
            self.weights.append((w[:-1].copy(), float(w[-1])))
        self._linear = [(torch.from_numpy(w), b) for w, b in self.weights]  # float64

    def score(self, logits: Tensor, stage: int = 0) -> Tensor:
        if not self._linear:
            raise RuntimeError(
                "The 'gate' scorer is not fitted yet: call Controller.calibrate(...) first."
            )
        w, b = self._linear[min(stage, len(self._linear) - 1)]
        return torch.sigmoid(gate_features(logits).double().cpu() @ w + b)


SCORERS: dict[str, Callable[[], Scorer]] = {
    "max_softmax": lambda: FunctionScorer(
        max_softmax_score,
        name="max_softmax",
        bounded=True,
        fast=_max_softmax_fast,
        positions=partial(max_softmax_score, dim=1),
    ),
    "margin": lambda: FunctionScorer(
        margin_score,
        name="margin",
        bounded=True,
        fast=_margin_fast,
        positions=partial(margin_score, dim=1),
    ),
    "ratio": lambda: FunctionScorer(
        ratio_score,
        name="ratio",
        bounded=True,
        fast=top2_gaps,
        fast_is_log=True,
        positions=_ratio_positions,
    ),
    "entropy": lambda: FunctionScorer(
        entropy_score, name="entropy", bounded=True, positions=partial(entropy_score, dim=1)
    ),
    "gate": GateScorer,
}


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def log_cut(threshold: float) -> float | None:
    """The largest float ``x`` with ``math.exp(x) <= threshold`` (``None`` when even
    ``exp(-inf) = 0`` is above it; ``inf`` when ``threshold`` is ``inf``).

    Then ``exp(v) > threshold`` exactly when ``v > x``: a decision on logarithms of scores
    needs no ``exp``. ``exp`` rounds to ``threshold`` up to about the midpoint between it and
    the next float, so ``x`` starts at that midpoint's logarithm and ``nextafter`` steps fix
    the last ulps.

    >>> x = log_cut(0.25)
    >>> math.exp(x) <= 0.25 < math.exp(math.nextafter(x, math.inf))
    True
    """
    if not threshold >= 0.0:
        return None
    if threshold == math.inf:
        return math.inf
    if threshold == 0.0:  # exp(x) rounds to 0 below half the smallest subnormal
        x = math.log(5e-324) - math.log(2.0)
    else:
        x = math.log(threshold)
        above = math.nextafter(threshold, math.inf)
        if above < math.inf:
            x += math.log1p((above - threshold) / (2.0 * threshold))
    while _exp(x) > threshold:
        x = math.nextafter(x, -math.inf)
    while _exp(up := math.nextafter(x, math.inf)) <= threshold:
        x = up
    return x


def make_scorer(scorer: str | Scorer | ScoreFn) -> Scorer:
    """A :class:`Scorer` from a name in ``SCORERS``, a ``Scorer`` or a callable.

    >>> make_scorer("entropy").name
    'entropy'
    """
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise unknown("scorer", scorer, SCORERS)
        return SCORERS[scorer]()
    if callable(scorer):
        return FunctionScorer(scorer)
    raise invalid("scorer", scorer, f"one of {sorted(SCORERS)}, a Scorer or a callable")


def checked_scores(scores: Any, n: int, name: str) -> np.ndarray:
    """``scores`` as a float64 NumPy array, refused unless a NaN-free tensor of shape ``[n]``
    (``+inf`` always escalates, ``-inf`` never).

    >>> checked_scores(torch.tensor([0.1, 0.5]), 2, "margin").tolist()
    [0.10000000149011612, 0.5]
    """
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (n,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"The scorer {name!r} must return a tensor of shape [{n}] (one score per input, "
            f"higher = harder). Got {shape} instead."
        )
    array = scores.detach().cpu().double().numpy()
    if np.isnan(array).any():
        raise ValueError(
            f"The scorer {name!r} returned NaN scores; a scorer must return numbers "
            "(higher = harder; +inf always escalates)."
        )
    return array


def score_stages(
    scorer: Scorer, stage_logits: Sequence[Tensor], *, reduce: str = "mean"
) -> np.ndarray:
    """Checked scores ``[S, N]`` (float64) of ``S`` stages' float32 logits ``[N, C]`` (or
    dense ``[N, C, P]``: :func:`input_scores` with ``reduce``).

    >>> score_stages(make_scorer("margin"), [torch.zeros(3, 2)]).shape
    (1, 3)
    """
    if not stage_logits:
        return np.zeros((0, 0))
    rows = []
    for stage, logits in enumerate(stage_logits):
        logits = _as_float(logits.detach().cpu())
        scores = input_scores(scorer, logits, stage, reduce=reduce)
        rows.append(checked_scores(scores, len(logits), scorer.name))
    return np.stack(rows)
