"""Which cascade to serve: predicted cost of each (candidate -> reference) pair at a target.

A cascade only pays off when its cheap variant is much cheaper than the reference *and* its
scores single out the inputs it gets wrong. Both are measured: the candidates' per-input
logits on calibration data give, through the same Learn-then-Test calibration the controller
runs, the share of inputs each cascade would escalate at the target; measured costs turn that
share into a predicted cost per input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from torch import Tensor

from mpsearch._validation import check_fraction, invalid
from mpsearch.runtime._calibration import default_grid, learn_then_test, losses, served_stage
from mpsearch.runtime._scorers import Scorer, make_scorer


def _check_cost(
    argument: str, value: object, accepted: str = "a finite, non-negative cost in ms per input"
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):  # type: ignore[arg-type]
        raise invalid(argument, value, accepted)


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
) -> pd.DataFrame:
    """Rank the two-variant cascades ``candidate -> reference`` by predicted cost per input.

    ``candidates`` maps a name to that variant's per-input logits ``[N, C]`` on calibration
    data, ``reference`` is the reference's ``[N, C]`` on the same inputs; ``costs`` and
    ``reference_cost`` are measured costs per input (ms). For each candidate the bounded
    ``scorer`` is calibrated by Learn-then-Test at ``max_disagreement`` / ``delta`` (as
    :meth:`Controller.calibrate` does on its fixed grid), giving the share ``p`` of inputs
    escalated; the predicted cost is ``cost + p * escalation_cost`` (``escalation_cost``
    defaults to ``reference_cost``; at large batches pass the reference's cost per input on
    the few rows a batch escalates, which is higher). ``alone_ms`` is the reference alone;
    ``saving`` is ``1 - predicted_ms / alone_ms``. Rows are sorted cheapest first, except that
    predicted costs within ``tolerance`` (relative) of the cheapest count as a tie (``tied``):
    measured costs are noisy, and a tie-break keeps the choice stable from one measurement to
    the next. Among the tied, fewer escalations rank first: fewer second passes and less
    reliance on the calibration.

    >>> import torch
    >>> ref = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    >>> cheap = torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.1, 0.0]])  # last input barely right
    >>> table = rank_cascades({"cheap": cheap}, ref, costs={"cheap": 1.0}, reference_cost=3.0,
    ...                       max_disagreement=0.5, delta=0.5)
    >>> table[["candidate", "share_escalated", "predicted_ms"]].values.tolist()
    [['cheap', 0.0, 1.0]]
    """
    _check_cost("tolerance", tolerance, "a finite, non-negative relative cost difference")
    if not isinstance(candidates, Mapping) or not candidates:
        raise invalid("candidates", candidates, "a non-empty mapping name -> logits [N, C]")
    if not isinstance(reference, Tensor) or reference.dim() != 2:
        raise invalid("reference", reference, "the reference's per-input logits [N, C]")
    n = int(reference.shape[0])
    for name, logits in candidates.items():
        if not isinstance(logits, Tensor) or tuple(logits.shape) != tuple(reference.shape):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise invalid(
                f"candidates[{name!r}]",
                shape,
                f"logits shaped like the reference, {tuple(reference.shape)}",
            )
    names = list(candidates)
    if not isinstance(costs, Mapping) or any(name not in costs for name in names):
        raise invalid("costs", costs, f"a mapping with a cost (ms per input) for each of {names}")
    for name in names:
        _check_cost(f"costs[{name!r}]", costs[name])
    _check_cost("reference_cost", reference_cost)
    if escalation_cost is None:
        escalation_cost = reference_cost
    _check_cost("escalation_cost", escalation_cost)
    check_fraction("max_disagreement", max_disagreement)
    check_fraction("delta", delta)
    score = make_scorer(scorer)
    if score.learned or not score.bounded:
        raise invalid(
            "scorer", score.name, "a fixed bounded scorer (ratio, max_softmax, margin, entropy)"
        )
    ref_answer = reference.argmax(-1).numpy()
    rows = []
    for name in names:
        logits = candidates[name].float()
        scores = score.score_array(logits.numpy(), 0)[None]
        answers = np.stack([logits.argmax(-1).numpy(), ref_answer])
        res = learn_then_test(
            scores,
            answers,
            targets={"disagreement": max_disagreement},
            delta=delta,
            grid=default_grid(),
        )
        served = served_stage(scores, res.threshold)
        share = float((served == 1).mean()) if n else math.nan
        predicted = float(costs[name]) + share * float(escalation_cost)
        rows.append(
            {
                "candidate": name,
                "disagreement_alone": float((answers[0] != ref_answer).mean()),
                "threshold": res.threshold,
                "certified": res.certified,
                "share_escalated": share,
                "served_disagreement": float(losses(answers, served, None, "disagreement").mean()),
                "cost_ms": float(costs[name]),
                "predicted_ms": predicted,
                "alone_ms": float(reference_cost),
                "saving": 1.0 - predicted / reference_cost if reference_cost else math.nan,
            }
        )
    table = pd.DataFrame(rows)
    table["tied"] = table["predicted_ms"] <= table["predicted_ms"].min() * (1.0 + tolerance)
    # the tied first, fewest escalations first among them; then the rest, cheapest first
    key = table["share_escalated"].where(table["tied"], math.inf)
    order = np.lexsort(
        (table["predicted_ms"].to_numpy(), key.to_numpy(), ~table["tied"].to_numpy())
    )
    return table.iloc[order].reset_index(drop=True)


__all__ = ["rank_cascades"]
