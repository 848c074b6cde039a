"""Difficulty scorers: from a variant's per-input logits to one score per input (higher = harder).

Convention: a scorer maps per-input logits ``[B, C]`` to a score ``[B]`` where a **higher
score means a harder input**; the controller escalates an input to the next variant when its
score is above the stage's threshold. The built-in scores lie in ``[0, 1]``.

Per-input answer: for classifier outputs ``[B, C]`` the answer is ``argmax`` over ``C``;
for language-model outputs ``[B, T, V]`` the answer is the **next-token prediction at the
last position** (``logits[:, -1].argmax(-1)``), and the scores see those last-position logits.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mpsearch._data import output_tensor
from mpsearch._validation import invalid, unknown

try:
    from heapq import heapify_max as _heapify_max  # Python >= 3.14
except ImportError:  # the same C function, private before 3.14
    from heapq import _heapify_max

try:  # the optional C helper (setup.py): top-2 gaps read where the logits lie
    from mpsearch.runtime import _topgap
except ImportError:  # installed without a C compiler: the portable path, the same numbers
    _topgap = None  # type: ignore[assignment]

ScoreFn = Callable[[Tensor], Tensor]


def answer_logits(output: Any) -> Tensor:
    """Per-input logits ``[B, C]`` of a model output (the last position of ``[B, T, V]``).

    >>> answer_logits(torch.zeros(2, 5, 7)).shape
    torch.Size([2, 7])
    """
    logits = output_tensor(output)
    ndim = logits.ndim  # a property: cheaper than the dim() method on the serving path
    if ndim == 1:
        return logits.unsqueeze(-1)
    if ndim == 2:
        return logits
    if ndim == 3:
        return logits.select(1, -1)  # one op (a [:, -1, :] index takes several)
    raise ValueError(
        "The controller needs per-input logits [B, C] or language-model logits [B, T, V]; "
        f"got an output of shape {tuple(logits.shape)}."
    )


# The scores are computed with a few torch ops on the logits tensor. Right after a pass of
# the model every op and conversion runs with cold caches (on the char-MLP at batch 1, ~10 us
# per torch op), so the cost of a batch-1 decision is counted in calls, not elements:
# ``score_one`` takes the fewest calls that give the batch path's very number (``ratio``: one
# call of the optional C helper ``_topgap`` on the logits where they lie, else one ``tolist``
# and Python arithmetic). Calibration and serving call the same functions, so served and
# calibrated scores are equal.


_F32 = torch.float32


def _as_float(logits: Tensor) -> Tensor:
    return logits if logits.dtype is _F32 else logits.float()


def max_softmax_score(logits: Tensor) -> Tensor:
    """``1 - max softmax probability`` (0: fully confident), in float64 from float32
    probabilities.

    >>> max_softmax_score(torch.tensor([[0.0, 0.0]])).tolist()
    [0.5]
    """
    return 1.0 - torch.softmax(_as_float(logits), -1).amax(-1).double()


def _max_softmax_one(logits: Tensor) -> float:
    # the same float64 arithmetic on the same float32 probability as max_softmax_score
    return 1.0 - torch.softmax(_as_float(logits), -1).max().item()


def _max_softmax_list(logits: Tensor) -> list[float]:
    return [1.0 - p for p in torch.softmax(_as_float(logits), -1).amax(-1).tolist()]


def margin_score(logits: Tensor) -> Tensor:
    """``1 - (p_1 - p_2)``, one minus the gap between the two largest probabilities, in
    float64 from float32 probabilities.

    >>> margin_score(torch.tensor([[0.0, 0.0]])).tolist()
    [1.0]
    """
    if logits.shape[-1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.float64)
    top = torch.softmax(_as_float(logits), -1).topk(2, -1).values.double()
    return 1.0 - (top[:, 0] - top[:, 1])


def _margin_one(logits: Tensor) -> float:
    if logits.shape[-1] < 2:
        return 0.0
    p1, p2 = torch.softmax(_as_float(logits), -1).topk(2, -1)[0].tolist()[0]
    return 1.0 - (p1 - p2)


def _margin_list(logits: Tensor) -> list[float]:
    if logits.shape[-1] < 2:
        return [0.0] * logits.shape[0]
    top = torch.softmax(_as_float(logits), -1).topk(2, -1)[0].tolist()
    return [1.0 - (p1 - p2) for p1, p2 in top]


_exp = math.exp


def ratio_score(logits: Tensor) -> Tensor:
    """``p_2 / p_1 = exp(l_2 - l_1)``: the runner-up's probability relative to the answer's (0:
    the top logit is far ahead, 1: a tie), in float64 from the logits' own values.

    It needs only the two largest logits, not the softmax, so its batch-1 decision is the
    cheapest of the built-ins; on the char-MLP cascade at 0.5% disagreement it escalated 2.7%
    of the calibration inputs (margin 3.9%, max_softmax 31%).

    >>> [round(v, 4) for v in ratio_score(torch.tensor([[0.0, 0.0], [2.0, 0.0]])).tolist()]
    [1.0, 0.1353]
    """
    # the serving paths' gaps and math.exp, so their scores are the very same numbers
    return torch.tensor([_exp(g) for g in _ratio_gap_list(logits)], dtype=torch.float64)


_PY_TOP2_MAX_CLASSES = 192
"""Without the C helper, up to this many classes the batch-1 ratio is taken on Python floats
(one ``tolist`` and one heapify); beyond, one ``topk`` is cheaper (measured after a 16 MB cache
flush: 20 vs 36 us at 96 classes, 24 vs 32 at 192, 23 vs 21 at 256, 50 vs 35 at 512)."""


def _in_memory(logits: Tensor) -> bool:
    """Whether the C helper may read ``logits`` where they lie: contiguous float32 on the CPU,
    not a lazily negated view (whose memory holds the values' negatives)."""
    return (
        _topgap is not None
        and type(logits) is Tensor
        and logits.dtype is _F32
        and logits.is_cpu
        and logits.is_contiguous()
        and not logits.is_neg()
    )


def _ratio_gap_one(logits: Tensor) -> float:
    """``l_2 - l_1`` of one input: the log of its ratio score (``-inf`` for a single class)."""
    if _in_memory(logits):  # one C call over the row (numel() is the class count of [1, C])
        return _topgap.gap(logits.data_ptr(), logits.numel())
    # Portable: numel() is the class count of a [1, C] row. The checks after tolist are
    # Python's (a torch getter costs ~1 us right after a pass): floats of any floating dtype
    # equal the values topk takes, so the result is the batch path's in every dtype.
    if logits.numel() <= _PY_TOP2_MAX_CLASSES:
        row = logits.tolist()[0]
        if len(row) > 1 and type(row[0]) is float:
            total = sum(row)
            if total - total == 0.0:  # all finite; else the tensor path's NaN / inf semantics
                _heapify_max(row)  # the largest first, the runner-up one of its two children
                b = row[1]
                if len(row) > 2 and row[2] > b:
                    b = row[2]
                return b - row[0]
    return _topk_gaps(logits)[0]  # (the C helper was ruled out above)


def _ratio_gap_list(logits: Tensor) -> list[float]:
    if _in_memory(logits) and logits.ndim == 2:  # one C call over the rows
        rows, cols = logits.shape
        return _topgap.gaps(logits.data_ptr(), rows, cols)
    return _topk_gaps(logits)


def _topk_gaps(logits: Tensor) -> list[float]:
    """The portable batch path: one ``topk`` (exact in any dtype) and one ``tolist``."""
    try:  # the class-count check only when topk fails: a getter less on the serving path
        # positional arguments: torch parses keywords on a slower path (3 us more at batch
        # 32 right after a char-MLP pass)
        top = logits.topk(2, -1, True, False)[0]
    except RuntimeError:
        if logits.shape[-1] >= 2:
            raise
        return [-math.inf] * logits.shape[0]
    return _gaps(top.tolist())


def _gaps(pairs: list[list[float]]) -> list[float]:
    """``smaller - larger`` of each pair of top-2 logits in either order (``topk(sorted=False)``
    skips its final sort: 8% less decision time at batch 32 on the char MLP): exactly the sorted
    path's ``second - first``, NaN where that is NaN."""
    return [a - b if a < b else b - a for a, b in pairs]


def entropy_score(logits: Tensor) -> Tensor:
    """Entropy of the softmax divided by ``log C`` (0: one-hot, 1: uniform).

    >>> [round(v, 4) for v in entropy_score(torch.zeros(1, 4)).tolist()]
    [1.0]
    """
    c = logits.shape[-1]
    if c < 2:
        return torch.zeros(logits.shape[0])
    h = torch.special.entr(torch.softmax(_as_float(logits), -1)).sum(-1)
    return h.div_(math.log(c)).clamp_(0.0, 1.0)


class Scorer:
    """A difficulty score, per stage of the cascade; higher = harder.

    ``bounded`` scorers return values in ``[0, 1]`` (their thresholds come from a fixed
    grid); ``learned`` ones are fitted during calibration on a held-out part of the data.

    A scorer with a ``link`` (a non-decreasing ``float -> float``) serves *raw* values from
    :meth:`raw_one` / :meth:`raw_list` (a subclass that sets ``link`` overrides both) whose
    scores are their ``link``: the controller compares them with the threshold's
    :func:`cut_point` (the same decisions) and applies ``link`` only when the audit is read
    (``ratio``: raw values are logit gaps, ``link`` is ``math.exp``).
    """

    name: str = "scorer"
    bounded: bool = True
    learned: bool = False
    link: Callable[[float], float] | None = None

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        raise NotImplementedError

    def score(self, logits: Tensor, stage: int = 0) -> Tensor:
        """Scores ``[B]`` of per-input logits ``[B, C]``, unchecked (the serving path; the
        controller checks shape and NaNs)."""
        return self(logits, stage)

    def score_one(self, logits: Tensor, stage: int = 0) -> float:
        """The score of one input (logits ``[1, C]``) as a float, equal to :meth:`score`'s (the
        batch-1 serving path: built-in scorers take two tensor ops here)."""
        scores = self.score(logits, stage)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (1,):
            check_scores(scores, 1, self.name)  # raises with the shape it got
        return scores.item()

    def score_list(self, logits: Tensor, stage: int = 0) -> list[float]:
        """The scores of a small batch as Python floats, equal to :meth:`score`'s (the serving
        path for small batches: built-in scorers take fewer tensor ops here). NaNs unchecked."""
        scores = self.score(logits, stage)
        n = logits.shape[0]
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (n,):
            check_scores(scores, n, self.name)  # raises with the shape it got
        return scores.tolist()

    def raw_one(self, logits: Tensor, stage: int = 0) -> float:
        """:meth:`score_one` before ``link`` (the score itself when there is no link)."""
        return self.score_one(logits, stage)

    def raw_list(self, logits: Tensor, stage: int = 0) -> list[float]:
        """:meth:`score_list` before ``link`` (the scores themselves when there is no link)."""
        return self.score_list(logits, stage)

    def score_array(self, logits: np.ndarray, stage: int = 0) -> np.ndarray:
        """Checked scores ``[B]`` (float64) of float32 logits ``[B, C]`` as a NumPy array.

        >>> make_scorer("margin").score_array(np.zeros((1, 2), dtype=np.float32))
        array([1.])
        """
        n = logits.shape[0]
        scores = self.score(torch.from_numpy(logits), stage)
        return check_scores(scores, n, self.name).double().numpy()

    def fit(self, stage_logits: Sequence[Tensor], stage_targets: Sequence[np.ndarray]) -> None:
        """Learn from per-stage logits and "escalation would change the answer" targets."""


class FunctionScorer(Scorer):
    """A scorer from a plain function ``logits [B, C] -> scores [B]`` (same for every stage).

    ``one_fn`` (logits ``[1, C]`` -> float) and ``list_fn`` (logits ``[B, C]`` -> floats) are
    optional faster equals of ``fn`` for serving; with a ``link`` both are required and return
    raw values (the score is ``link(value)``, see :class:`Scorer`).

    >>> FunctionScorer(max_softmax_score, name="max_softmax")(torch.zeros(1, 2)).tolist()
    [0.5]
    """

    def __init__(
        self,
        fn: ScoreFn,
        *,
        name: str | None = None,
        bounded: bool = False,
        array_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        one_fn: Callable[[Tensor], float] | None = None,
        list_fn: Callable[[Tensor], list[float]] | None = None,
        link: Callable[[float], float] | None = None,
    ) -> None:
        if not callable(fn):
            raise invalid("scorer", fn, "a scorer name or a callable logits -> scores")
        if link is not None and (not callable(link) or one_fn is None or list_fn is None):
            raise invalid("link", link, "a callable, given with one_fn and list_fn")
        self.fn = fn
        self.link = link
        self.array_fn = array_fn
        self.one_fn = one_fn
        self.list_fn = list_fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.bounded = bounded

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        return self.fn(logits)

    def score_one(self, logits: Tensor, stage: int = 0) -> float:
        if self.one_fn is None:
            return super().score_one(logits, stage)
        value = self.one_fn(logits)
        return value if self.link is None else self.link(value)

    def score_list(self, logits: Tensor, stage: int = 0) -> list[float]:
        if self.list_fn is None:
            return super().score_list(logits, stage)
        values = self.list_fn(logits)
        return values if self.link is None else [self.link(v) for v in values]

    def raw_one(self, logits: Tensor, stage: int = 0) -> float:
        return self.score_one(logits, stage) if self.link is None else self.one_fn(logits)

    def raw_list(self, logits: Tensor, stage: int = 0) -> list[float]:
        return self.score_list(logits, stage) if self.link is None else self.list_fn(logits)

    def score_array(self, logits: np.ndarray, stage: int = 0) -> np.ndarray:
        if self.array_fn is None:
            return super().score_array(logits, stage)
        return check_score_array(np.asarray(self.array_fn(logits)), logits.shape[0], self.name)


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


def fit_logistic(
    features: np.ndarray, targets: np.ndarray, *, l2: float = 1e-2, steps: int = 50
) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns ``[weights..., bias]``.

    Deterministic and well defined even when ``targets`` has a single class.

    >>> w = fit_logistic(np.array([[0.0], [1.0]]), np.array([0.0, 1.0]))
    >>> bool(w[0] > 0)
    True
    """
    x = np.hstack([np.asarray(features, dtype=np.float64), np.ones((len(features), 1))])
    y = np.asarray(targets, dtype=np.float64)
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    reg[-1] = 1e-8
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) / len(y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


class GateScorer(Scorer):
    """A small learned gate per stage: logistic regression on :func:`gate_features`.

    It predicts the probability that escalating from this stage would change the answer
    (the stage's answer differs from the most precise variant's); that probability is the score.
    The features lie in ``[0, 1]`` and escalations are rare, so the L2 penalty is light: on the
    char-MLP cascade at 0.5% disagreement, ``l2=1e-2`` shrank the gate to a near-constant and
    escalated 59% of inputs, ``l2=1e-6`` 3.5% (the margin score alone: 3.9%).

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
            features = gate_features(torch.as_tensor(logits)).double().numpy()
            w = fit_logistic(features, targets, l2=self.l2)
            self.weights.append((w[:-1].copy(), float(w[-1])))
        self._linear = [(torch.from_numpy(w), b) for w, b in self.weights]  # float64

    def score(self, logits: Tensor, stage: int = 0) -> Tensor:
        if not self._linear:
            raise RuntimeError(
                "The 'gate' scorer is not fitted yet: call Controller.calibrate(...) first."
            )
        w, b = self._linear[min(stage, len(self._linear) - 1)]
        return torch.sigmoid(gate_features(logits).double() @ w + b)

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        return self.score(logits, stage)


SCORERS: dict[str, Callable[[], Scorer]] = {
    "max_softmax": lambda: FunctionScorer(
        max_softmax_score,
        name="max_softmax",
        bounded=True,
        one_fn=_max_softmax_one,
        list_fn=_max_softmax_list,
    ),
    "margin": lambda: FunctionScorer(
        margin_score, name="margin", bounded=True, one_fn=_margin_one, list_fn=_margin_list
    ),
    "ratio": lambda: FunctionScorer(
        ratio_score,
        name="ratio",
        bounded=True,
        one_fn=_ratio_gap_one,
        list_fn=_ratio_gap_list,
        link=_exp,
    ),
    "entropy": lambda: FunctionScorer(entropy_score, name="entropy", bounded=True),
    "gate": GateScorer,
}


_SIGN = 1 << 63


def _ordered(x: float) -> int:
    """An integer per float, in the floats' order (``-0.0`` and ``0.0`` both 0)."""
    (bits,) = struct.unpack("<q", struct.pack("<d", x))
    return bits if bits >= 0 else -(bits + _SIGN)


def _from_ordered(k: int) -> float:
    (x,) = struct.unpack("<d", struct.pack("<q", k if k >= 0 else -k - _SIGN))
    return x


def cut_point(link: Callable[[float], float], threshold: float) -> float | None:
    """The largest float ``x`` with ``link(x) <= threshold``, for a non-decreasing ``link``
    (``None`` when ``link(-inf)`` is already above it; ``inf`` when ``link(inf)`` is not).

    Then ``link(v) > threshold`` exactly when ``v > x``: a decision on raw values needs no
    ``link`` call. Found by bisection over the floats' order (64 steps); a ``link`` that
    overflows counts as ``inf``.

    >>> x = cut_point(math.exp, 0.25)
    >>> math.exp(x) <= 0.25 < math.exp(math.nextafter(x, math.inf))
    True
    """

    def value(v: float) -> float:
        try:
            return link(v)
        except OverflowError:
            return math.inf

    if not value(-math.inf) <= threshold:
        return None
    if value(math.inf) <= threshold:
        return math.inf
    lo, hi = _ordered(-math.inf), _ordered(math.inf)  # value(lo) <= threshold < value(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value(_from_ordered(mid)) <= threshold:
            lo = mid
        else:
            hi = mid
    return _from_ordered(lo)


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


def check_score_array(scores: Any, n: int, name: str) -> np.ndarray:
    """Refuse scores that are not a NaN-free array of shape ``[n]`` (the serving fast path;
    ``+inf`` always escalates, ``-inf`` never).

    >>> check_score_array(np.array([0.1, 0.9]), 2, "margin")
    array([0.1, 0.9])
    """
    if not isinstance(scores, np.ndarray) or scores.shape != (n,):
        shape = scores.shape if isinstance(scores, np.ndarray) else type(scores).__name__
        raise ValueError(
            f"The scorer {name!r} must return one score per input, shape [{n}] (higher = "
            f"harder). Got {shape} instead."
        )
    if np.isnan(scores).any():
        raise ValueError(
            f"The scorer {name!r} returned NaN scores; a scorer must return numbers "
            "(higher = harder; +inf always escalates)."
        )
    return scores


def check_scores(scores: Any, n: int, name: str) -> Tensor:
    """Refuse scores that are not a NaN-free float tensor of shape ``[n]``."""
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (n,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"The scorer {name!r} must return a tensor of shape [{n}] (one score per input, "
            f"higher = harder). Got {shape} instead."
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError(
            f"The scorer {name!r} returned NaN scores; a scorer must return numbers "
            "(higher = harder; +inf always escalates)."
        )
    return scores
