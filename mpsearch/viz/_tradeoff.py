"""The controller's trade-off: quality against average cost per input, vs each static variant.

Every variant is run once on the same inputs; from their answers, the per-stage difficulty
scores and the variants' measured costs, the served variant, answer and cost of any
threshold follow (``served_stage``, ``cascade_cost`` of :mod:`mpsearch.runtime._calibration`).
So a whole curve costs one pass per variant. It is exact for variants whose output on an input
does not depend on the rest of its batch (weight-only, bf16, static activation ranges); with
dynamic per-tensor activation scales (``w8a8`` without calibration data) a later stage, which
serves only the escalated inputs, may score a few inputs slightly differently than on the full
batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mpsearch._validation import invalid
from mpsearch.runtime._calibration import cascade_cost, served_answers, served_stage


def cascade_arrays(controller: Any, data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(answers [K, N], scores [K - 1, N], costs [K])`` of a controller's variants on ``data``.

    Answers are each variant's per-input argmax (dense outputs: whether the input agrees with
    the reference, :meth:`~mpsearch.runtime.Controller.stage_answers`), scores the
    controller's scorer on each stage but the last, costs the variants' measured ms per input
    (the controller needs an ``example_input``, or one call to
    :meth:`~mpsearch.runtime.Controller.calibrate`).

    >>> answers, scores, costs = cascade_arrays(ctrl, wl.test)  # doctest: +SKIP
    """
    costs = np.array([v.cost_ms for v in controller.variants], dtype=np.float64)
    if np.isnan(costs).any():
        raise ValueError(
            "The controller's variants have no measured cost: build it with "
            "example_input=... (or calibrate it once) before computing its trade-off."
        )
    # the answers and scores calibration routes on, so that the curve's thresholds route alike
    answers, scores = controller.stage_arrays(data)
    return answers, np.asarray(scores, dtype=np.float64), costs


def _check_arrays(
    answers: np.ndarray, scores: np.ndarray, costs: np.ndarray, variants: Sequence[str] | None
) -> list[str]:
    if answers.ndim != 2 or answers.shape[0] < 1 or answers.shape[1] < 1:
        raise invalid("answers", answers.shape, "a [K, N] array (K variants, N inputs)")
    k, n = answers.shape
    if scores.shape != (k - 1, n):
        raise invalid("scores", scores.shape, f"a [K - 1, N] = {(k - 1, n)} array")
    if costs.shape != (k,):
        raise invalid("costs", costs.shape, f"one cost per variant ({k})")
    names = list(variants) if variants is not None else [f"variant {i}" for i in range(k)]
    if len(names) != k or len(set(names)) != k:
        raise invalid("variants", variants, f"{k} distinct names, one per variant")
    return names


def controller_tradeoff_data(
    answers: np.ndarray,
    scores: np.ndarray,
    costs: Sequence[float],
    *,
    thresholds: Mapping[str, float],
    variants: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per static variant and per controller setting: quality against average cost.

    ``answers`` is ``[K, N]`` (variant × input, the last variant is the reference),
    ``scores`` ``[K - 1, N]`` (difficulty, higher = harder), ``costs`` the ms per input of each
    variant, ``thresholds`` ``{setting label: threshold}``. A static variant serves every
    input alone (cost: its own); a controller setting serves each input at the first stage
    whose score is ``<=`` the threshold and pays every pass up to it.

    Columns: ``method`` (``static`` / ``controller``), ``setting``, ``threshold``,
    ``agreement`` (with the reference's answers), ``accuracy`` (against ``labels``; NaN
    without), ``cost_ms`` (mean per input), then the share of inputs served by each variant
    (one column per name in ``variants``).

    >>> df = controller_tradeoff_data(np.array([[0, 1], [0, 0]]), np.array([[0.1, 0.9]]),
    ...                               [1.0, 3.0], thresholds={"t": 0.5})
    >>> df[["setting", "agreement", "cost_ms"]].values.tolist()
    [['variant 0', 0.5, 1.0], ['variant 1', 1.0, 3.0], ['t', 1.0, 2.5]]
    """
    answers = np.asarray(answers)
    scores = np.asarray(scores, dtype=np.float64)
    cost_arr = np.asarray(costs, dtype=np.float64)
    names = _check_arrays(answers, scores, cost_arr, variants)
    if not isinstance(thresholds, Mapping) or not thresholds:
        raise invalid("thresholds", thresholds, "a non-empty mapping of setting label to threshold")
    for label, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise invalid(f"thresholds[{label!r}]", value, "a number (-inf and inf allowed)")
    k, n = answers.shape
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != (n,):
            raise invalid("labels", labels.shape, f"one label per input ({n})")
    reference = answers[-1]

    def row(method: str, setting: str, threshold: float, served: np.ndarray) -> dict[str, Any]:
        got = served_answers(answers, served)
        share = np.bincount(served, minlength=k) / n
        return {
            "method": method,
            "setting": setting,
            "threshold": threshold,
            "agreement": float((got == reference).mean()),
            "accuracy": float((got == labels).mean()) if labels is not None else math.nan,
            "cost_ms": float(np.mean(cost_arr[served]))
            if method == "static"
            else float(cascade_cost(served, cost_arr).mean()),
            **{name: float(s) for name, s in zip(names, share, strict=True)},
        }

    rows = [row("static", name, math.nan, np.full(n, i)) for i, name in enumerate(names)]
    for label, threshold in thresholds.items():
        rows.append(
            row("controller", str(label), float(threshold), served_stage(scores, threshold))
        )
    return pd.DataFrame(rows)


def variant_share_data(tradeoff: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """The controller rows of :func:`controller_tradeoff_data` in long form:
    ``setting``, ``variant``, ``share`` (the shares of one setting sum to 1).

    >>> df = controller_tradeoff_data(np.array([[0, 1], [0, 0]]), np.array([[0.1, 0.9]]),
    ...                               [1.0, 3.0], thresholds={"t": 0.5}, variants=["a", "b"])
    >>> variant_share_data(df, ["a", "b"]).values.tolist()
    [['t', 'a', 0.5], ['t', 'b', 0.5]]
    """
    missing = [v for v in variants if v not in tradeoff.columns]
    if missing:
        raise invalid(
            "variants", list(variants), f"column names of the trade-off table (missing {missing})"
        )
    ctrl = tradeoff[tradeoff["method"] == "controller"]
    long = ctrl.melt(
        id_vars=["setting"], value_vars=list(variants), var_name="variant", value_name="share"
    )
    order = {s: i for i, s in enumerate(ctrl["setting"])}
    long["_o"] = long["setting"].map(order)
    return long.sort_values(["_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def difficulty_examples(scores: np.ndarray, *, n: int = 4) -> pd.DataFrame:
    """The ``n`` easiest and ``n`` hardest inputs by first-stage score.

    Columns ``kind`` (``easy`` / ``hard``), ``index`` (input position), ``score``; easy ones
    lowest score first, hard ones highest first (ties by position).

    >>> difficulty_examples(np.array([[0.3, 0.1, 0.9, 0.5]]), n=1).values.tolist()
    [['easy', 1, 0.1], ['hard', 2, 0.9]]
    """
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape[0] < 1:
            raise invalid("scores", arr.shape, "at least one stage of scores ([K - 1, N], K >= 2)")
        arr = arr[0]
    if arr.ndim != 1 or not len(arr):
        raise invalid("scores", arr.shape, "a [N] or [K - 1, N] array of scores")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise invalid("n", n, "a positive integer")
    n = min(n, len(arr))
    up = np.argsort(arr, kind="stable")
    down = np.argsort(-arr, kind="stable")
    rows = [{"kind": "easy", "index": int(i), "score": float(arr[i])} for i in up[:n]]
    rows += [{"kind": "hard", "index": int(i), "score": float(arr[i])} for i in down[:n]]
    return pd.DataFrame(rows)
