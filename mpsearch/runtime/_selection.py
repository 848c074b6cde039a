"""Which variant or cascade to serve: predicted cost per input of each choice at a target.

A cascade only pays off when its cheap variant is much cheaper than the reference *and* its
scores single out the inputs it gets wrong; a variant that meets the target on its own needs
no cascade at all. Both are weighed: the candidates' per-input logits on calibration data
give, through the same Learn-then-Test calibration the controller runs, the share of inputs
each cascade would escalate at the target and whether a variant alone is certified to meet
it; measured costs turn that into a predicted cost per input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from mpsearch._validation import check_fraction, invalid, unknown
from mpsearch.runtime._calibration import default_grid, learn_then_test, losses, served_stage
from mpsearch.runtime._scorers import (
    POSITION_REDUCTIONS,
    Scorer,
    make_scorer,
    score_stages,
    stage_answers,
)

COLUMNS = (
    "candidate",
    "kind",
    "stages",
    "disagreement_alone",
    "threshold",
    "certified",
    "meets_target",
    "share_escalated",
    "served_disagreement",
    "cost_ms",
    "predicted_ms",
    "alone_ms",
    "saving",
)


def _check_cost(
    argument: str, value: object, accepted: str = "a finite, non-negative cost in ms per input"
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):  # type: ignore[arg-type]
        raise invalid(argument, value, accepted)


def _check_logits(candidates: Any, reference: Any) -> None:
    if not isinstance(candidates, Mapping) or not candidates:
        raise invalid("candidates", candidates, "a non-empty mapping name -> logits [N, C]")
    if not isinstance(reference, Tensor) or reference.dim() not in (2, 3):
        raise invalid(
            "reference", reference, "the reference's per-input logits [N, C] (dense: [N, C, P])"
        )
    for name, logits in candidates.items():
        if not isinstance(logits, Tensor) or tuple(logits.shape) != tuple(reference.shape):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise invalid(
                f"candidates[{name!r}]",
                shape,
                f"logits shaped like the reference, {tuple(reference.shape)}",
            )


def _check_costs(names: list[str], costs: Any, extra: Mapping[str, Any]) -> None:
    if not isinstance(costs, Mapping) or any(name not in costs for name in names):
        raise invalid("costs", costs, f"a mapping with a cost (ms per input) for each of {names}")
    for name in names:
        _check_cost(f"costs[{name!r}]", costs[name])
    for argument, value in extra.items():
        _check_cost(argument, value)


def _cascade_row(
    scorer: Scorer,
    logits: Tensor,
    answers: np.ndarray,
    eps: float,
    delta: float,
    *,
    reduce: str,
) -> dict[str, Any]:
    """Calibrate the two-variant cascade ``candidate -> reference`` at ``eps`` (``answers``:
    the candidate's and the reference's, :func:`stage_answers`)."""
    scores = score_stages(scorer, [logits.float()], reduce=reduce)
    ref_answer = answers[1]
    res = learn_then_test(
        scores, answers, targets={"disagreement": eps}, delta=delta, grid=default_grid()
    )
    served = served_stage(scores, res.threshold)
    n = len(ref_answer)
    return {
        "kind": "cascade",
        "disagreement_alone": float((answers[0] != ref_answer).mean()),
        "threshold": res.threshold,
        "certified": res.certified,
        "meets_target": True,  # the uncertified fallback escalates everything
        "share_escalated": float((served == 1).mean()) if n else math.nan,
        "served_disagreement": float(losses(answers, served, None, "disagreement").mean()),
    }


def _alone_row(answers: np.ndarray | None, eps: float, delta: float) -> dict[str, Any]:
    """Serve one variant to every input (``answers``: its and the reference's; ``None``: the
    reference itself, risk 0)."""
    if answers is None:
        disagreement, certified = 0.0, True
    else:
        grid = np.array([-np.inf, np.inf])  # the one candidate: never escalate
        res = learn_then_test(
            np.zeros((1, answers.shape[1])), answers, targets={"disagreement": eps}, delta=delta,
            grid=grid,
        )  # fmt: skip
        disagreement, certified = float((answers[0] != answers[1]).mean()), res.certified
    return {
        "kind": "alone",
        "disagreement_alone": disagreement,
        "threshold": math.inf,
        "certified": certified,
        "meets_target": certified,
        "share_escalated": 0.0,
        "served_disagreement": disagreement,
    }


def _rank(table: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Choices meeting the target first; among them, predicted costs within ``tolerance`` of
    the cheapest tie (``tied``) and fewer escalations rank first, a variant alone before a
    cascade; the rest follow cheapest first (a variant alone first at equal cost)."""
    meets = table["meets_target"].to_numpy(dtype=bool)
    cheapest = table["predicted_ms"][meets].min()
    table["tied"] = meets & (table["predicted_ms"] <= cheapest * (1.0 + tolerance)).to_numpy()
    tied = table["tied"].to_numpy()
    key = table["share_escalated"].where(table["tied"], math.inf).to_numpy()
    cascade = (table["kind"] == "cascade").to_numpy()
    predicted = table["predicted_ms"].to_numpy()
    order = np.lexsort((cascade, predicted, cascade & tied, key, ~tied, ~meets))
    return table.iloc[order].reset_index(drop=True)


def rank_cascades(
    candidates: Mapping[str, Tensor],
    reference: Tensor,
    *,
    costs: Mapping[str, float],
    reference_cost: float,
    max_disagreement: float = 0.005,
    delta: float = 0.1,
    scorer: str | Scorer = "ratio",
    escalation_cost: float | None = None,
    tolerance: float = 0.0,
    decision_cost: float = 0.0,
    reference_name: str = "reference",
    min_agreement: float = 0.99,
    reduce: str = "mean",
) -> pd.DataFrame:
    """Rank the ways to serve at a target: each variant alone and each two-variant cascade
    ``candidate -> reference``, by predicted cost per input. The first row is the choice.

    ``candidates`` maps a name to that variant's per-input logits ``[N, C]`` on calibration
    data, ``reference`` is the reference's ``[N, C]`` on the same inputs; ``costs`` and
    ``reference_cost`` are measured costs per input (ms). For each candidate the bounded
    ``scorer`` is calibrated by Learn-then-Test at ``max_disagreement`` / ``delta`` (as
    :meth:`Controller.calibrate` does on its fixed grid), giving the share ``p`` of inputs
    escalated; the cascade's predicted cost is ``cost + p * escalation_cost + decision_cost``
    (``escalation_cost`` defaults to ``reference_cost``; at large batches pass the reference's
    cost per input on the few rows a batch escalates; ``decision_cost`` is the controller's
    scoring and routing per input). A variant alone (``kind="alone"``, a cascade of one)
    costs its own cost and meets the target only when Learn-then-Test certifies its
    disagreement; the reference alone always does. So a cascade predicted slower than the
    best variant meeting the target alone never ranks first. Rows meeting the target come
    first; among them predicted costs within ``tolerance`` (relative) of the cheapest tie
    (``tied``: measured costs are noisy) and fewer escalations rank first, a variant alone
    before a cascade. ``saving`` is ``1 - predicted_ms / alone_ms`` (the reference alone).
    Dense logits ``[N, C, P]`` (a segmentation model's, from :meth:`Controller.stage_outputs`)
    count an input as agreeing when ``min_agreement`` of its positions do, and score it by the
    ``reduce`` of its positions' scores (``"max"`` for a multi-label classifier's labels:
    :data:`~mpsearch.runtime._scorers.POSITION_REDUCTIONS`, what the controller uses).

    >>> import torch
    >>> ref = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    >>> cheap = torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.1, 0.0]])  # last input barely right
    >>> table = rank_cascades({"cheap": cheap}, ref, costs={"cheap": 1.0}, reference_cost=3.0,
    ...                       max_disagreement=0.5, delta=0.5)
    >>> table[["stages", "share_escalated", "predicted_ms"]].values.tolist()[0]
    ['cheap', 0.0, 1.0]
    """
    _check_cost("tolerance", tolerance, "a finite, non-negative relative cost difference")
    _check_logits(candidates, reference)
    names = list(candidates)
    escalation = reference_cost if escalation_cost is None else escalation_cost
    _check_costs(
        names,
        costs,
        {
            "reference_cost": reference_cost,
            "escalation_cost": escalation,
            "decision_cost": decision_cost,
        },
    )
    check_fraction("max_disagreement", max_disagreement)
    check_fraction("delta", delta)
    check_fraction("min_agreement", min_agreement, open_high=False)
    if reduce not in POSITION_REDUCTIONS:
        raise unknown("reduce", reduce, list(POSITION_REDUCTIONS))
    score = make_scorer(scorer)
    if score.learned or not score.bounded:
        raise invalid(
            "scorer", score.name, "a fixed bounded scorer (ratio, max_softmax, margin, entropy)"
        )
    rows = []
    for name in names:
        cost = float(costs[name])
        answers = stage_answers([candidates[name], reference], min_agreement=min_agreement)
        cascade = _cascade_row(
            score, candidates[name], answers, max_disagreement, delta, reduce=reduce
        )
        extra = cascade["share_escalated"] * float(escalation) + float(decision_cost)
        rows.append({**cascade, "candidate": name, "stages": f"{name} -> {reference_name}",
                     "cost_ms": cost, "predicted_ms": cost + extra})  # fmt: skip
        alone = _alone_row(answers, max_disagreement, delta)
        rows.append({**alone, "candidate": name, "stages": name, "cost_ms": cost,
                     "predicted_ms": cost})  # fmt: skip
    alone = _alone_row(None, max_disagreement, delta)
    rows.append({**alone, "candidate": reference_name, "stages": reference_name,
                 "cost_ms": float(reference_cost), "predicted_ms": float(reference_cost)})  # fmt: skip
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["alone_ms"] = float(reference_cost)
    table["saving"] = 1.0 - table["predicted_ms"] / reference_cost if reference_cost else math.nan
    return _rank(table, tolerance)


__all__ = ["rank_cascades"]
