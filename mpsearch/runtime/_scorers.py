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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mpsearch._data import output_tensor
from mpsearch._validation import invalid, unknown

ScoreFn = Callable[[Tensor], Tensor]


def answer_logits(output: Any) -> Tensor:
    """Per-input logits ``[B, C]`` of a model output (the last position of ``[B, T, V]``).

    >>> answer_logits(torch.zeros(2, 5, 7)).shape
    torch.Size([2, 7])
    """
    logits = output_tensor(output)
    if logits.dim() == 1:
        return logits.unsqueeze(-1)
    if logits.dim() == 2:
        return logits
    if logits.dim() == 3:
        return logits[:, -1, :]
    raise ValueError(
        "The controller needs per-input logits [B, C] or language-model logits [B, T, V]; "
        f"got an output of shape {tuple(logits.shape)}."
    )


def logits_array(logits: Tensor) -> np.ndarray:
    """Per-input logits ``[B, C]`` as a float32 NumPy array (no copy when already float32).

    >>> logits_array(torch.zeros(2, 3)).shape
    (2, 3)
    """
    try:
        array = logits.numpy()  # one call on the common path: float32, CPU, no grad
    except (TypeError, RuntimeError):  # bf16, another device, or a tensor needing grad
        return logits.detach().float().cpu().numpy()
    return array if array.dtype == np.float32 else array.astype(np.float32)


# The scores are computed in NumPy, in place where possible: on the small per-input arrays of
# a served batch (one row at batch 1) a NumPy ufunc costs about a microsecond where a torch op
# costs several, and the same code scores the calibration data, so served and calibrated
# scores are the same function.


def _shifted_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z, exp(z))`` with ``z = logits - max``; ``exp(z)`` sums to ``>= 1`` per row."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z, np.exp(z)


def _max_softmax(logits: np.ndarray) -> np.ndarray:
    # 1 - p_max = 1 - 1 / sum(exp(l - l_max)) = (t - 1) / t: one exp and one sum.
    t = np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)
    return (t - 1.0) / t


def _margin(logits: np.ndarray) -> np.ndarray:
    c = logits.shape[-1]
    if c < 2:
        return np.zeros(logits.shape[0], dtype=logits.dtype)
    part = np.partition(logits, c - 2, axis=-1)
    first = part[:, -1:]
    # p1 - p2 = (1 - exp(l2 - l1)) / sum(exp(l - l1))
    t = np.exp(logits - first).sum(axis=-1)
    gap = 1.0 - np.exp(part[:, -2] - first[:, 0])
    return 1.0 - gap / t


def _entropy(logits: np.ndarray) -> np.ndarray:
    n = logits.shape[-1]
    if n < 2:
        return np.zeros(logits.shape[0], dtype=logits.dtype)
    z, e = _shifted_exp(logits)
    t = e.sum(axis=-1)
    # H = log t - sum(e z) / t
    h = np.log(t) - np.einsum("ij,ij->i", e, z) / t
    return np.clip(h / math.log(n), 0.0, 1.0)


def max_softmax_score(logits: Tensor) -> Tensor:
    """``1 - max softmax probability`` (0: fully confident).

    >>> max_softmax_score(torch.tensor([[0.0, 0.0]])).tolist()
    [0.5]
    """
    return torch.from_numpy(np.asarray(_max_softmax(logits_array(logits))))


def margin_score(logits: Tensor) -> Tensor:
    """``1 - (p_1 - p_2)``, one minus the gap between the two largest probabilities.

    >>> margin_score(torch.tensor([[0.0, 0.0]])).tolist()
    [1.0]
    """
    return torch.from_numpy(np.asarray(_margin(logits_array(logits))))


def entropy_score(logits: Tensor) -> Tensor:
    """Entropy of the softmax divided by ``log C`` (0: one-hot, 1: uniform).

    >>> [round(v, 4) for v in entropy_score(torch.zeros(1, 4)).tolist()]
    [1.0]
    """
    return torch.from_numpy(np.asarray(_entropy(logits_array(logits))))


class Scorer:
    """A difficulty score, per stage of the cascade; higher = harder.

    ``bounded`` scorers return values in ``[0, 1]`` (their thresholds come from a fixed
    grid); ``learned`` ones are fitted during calibration on a held-out part of the data.
    """

    name: str = "scorer"
    bounded: bool = True
    learned: bool = False

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        raise NotImplementedError

    def score_array(self, logits: np.ndarray, stage: int = 0) -> np.ndarray:
        """Scores ``[B]`` of float32 logits ``[B, C]`` as a NumPy array (the serving fast path).

        The default calls :meth:`__call__` on a tensor view and checks its result; the
        built-in scorers compute directly in NumPy.
        """
        n = logits.shape[0]
        return check_scores(self(torch.from_numpy(logits), stage), n, self.name).double().numpy()

    def fit(self, stage_logits: Sequence[Tensor], stage_targets: Sequence[np.ndarray]) -> None:
        """Learn from per-stage logits and "escalation would change the answer" targets."""


class FunctionScorer(Scorer):
    """A scorer from a plain function ``logits [B, C] -> scores [B]`` (same for every stage).

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
    ) -> None:
        if not callable(fn):
            raise invalid("scorer", fn, "a scorer name or a callable logits -> scores")
        self.fn = fn
        self.array_fn = array_fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.bounded = bounded

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        return self.fn(logits)

    def score_array(self, logits: np.ndarray, stage: int = 0) -> np.ndarray:
        if self.array_fn is None:
            return super().score_array(logits, stage)
        return self.array_fn(logits)


def _gate_features(logits: np.ndarray, k: int = 4) -> np.ndarray:
    z, e = _shifted_exp(logits)
    t = e.sum(axis=-1, keepdims=True)
    probs = e / t
    c = probs.shape[-1]
    kk = min(k, c)
    top = -np.sort(-np.partition(probs, c - kk, axis=-1)[:, c - kk :], axis=-1)
    if kk < k:
        top = np.hstack([top, np.zeros((probs.shape[0], k - kk), dtype=probs.dtype)])
    if c >= 2:
        h = np.log(t[:, 0]) - np.einsum("ij,ij->i", e, z) / t[:, 0]
        entropy = np.clip(h / math.log(c), 0.0, 1.0)
        margin = 1.0 - (top[:, 0] - top[:, 1])
    else:
        entropy = margin = np.zeros(probs.shape[0], dtype=probs.dtype)
    return np.hstack([top, entropy[:, None], margin[:, None]])


def gate_features(logits: Tensor, *, k: int = 4) -> Tensor:
    """Features of the learned gate: sorted top-``k`` softmax probabilities, entropy, margin.

    >>> gate_features(torch.zeros(3, 10)).shape
    torch.Size([3, 6])
    """
    return torch.from_numpy(_gate_features(logits_array(logits), k))


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

    >>> gate = GateScorer()
    >>> gate.fit([torch.tensor([[3.0, 0.0], [0.1, 0.0]])], [np.array([0, 1])])
    >>> bool(gate(torch.tensor([[0.1, 0.0]]))[0] > gate(torch.tensor([[3.0, 0.0]]))[0])
    True
    """

    name = "gate"
    bounded = True
    learned = True

    def __init__(self, *, l2: float = 1e-2) -> None:
        self.l2 = l2
        self.weights: list[tuple[np.ndarray, float]] = []

    def fit(self, stage_logits: Sequence[Tensor], stage_targets: Sequence[np.ndarray]) -> None:
        self.weights = []
        for logits, targets in zip(stage_logits, stage_targets, strict=True):
            if len(targets) == 0:
                raise invalid("data", "0 samples", "calibration data with samples to fit the gate")
            features = _gate_features(logits_array(logits)).astype(np.float64)
            w = fit_logistic(features, targets, l2=self.l2)
            self.weights.append((w[:-1].copy(), float(w[-1])))

    def score_array(self, logits: np.ndarray, stage: int = 0) -> np.ndarray:
        if not self.weights:
            raise RuntimeError(
                "The 'gate' scorer is not fitted yet: call Controller.calibrate(...) first."
            )
        w, b = self.weights[min(stage, len(self.weights) - 1)]
        z = _gate_features(logits) @ w + b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))

    def __call__(self, logits: Tensor, stage: int = 0) -> Tensor:
        return torch.from_numpy(self.score_array(logits_array(logits), stage))


SCORERS: dict[str, Callable[[], Scorer]] = {
    "max_softmax": lambda: FunctionScorer(
        max_softmax_score, name="max_softmax", bounded=True, array_fn=_max_softmax
    ),
    "margin": lambda: FunctionScorer(margin_score, name="margin", bounded=True, array_fn=_margin),
    "entropy": lambda: FunctionScorer(
        entropy_score, name="entropy", bounded=True, array_fn=_entropy
    ),
    "gate": GateScorer,
}


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
