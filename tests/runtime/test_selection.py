from __future__ import annotations

import pytest
import torch

from mpsearch.runtime import rank_cascades

N, HARD = 1000, 20


def _logits() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference: class 0 with a wide margin everywhere. 'good' agrees everywhere; 'noisy' is
    wrong on HARD inputs and unsure exactly there; 'blind' is wrong on HARD inputs and sure."""
    reference = torch.tensor([[5.0, 0.0]]).repeat(N, 1)
    noisy = reference.clone()
    noisy[:HARD] = torch.tensor([0.0, 0.1])
    blind = reference.clone()
    blind[:HARD] = torch.tensor([0.0, 5.0])
    return reference, {"good": reference.clone(), "noisy": noisy, "blind": blind}


def test_known_cascades_are_ranked_with_exact_shares_and_costs() -> None:
    reference, candidates = _logits()
    table = rank_cascades(
        candidates,
        reference,
        costs={"good": 2.0, "noisy": 1.0, "blind": 0.5},
        reference_cost=4.0,
        max_disagreement=0.005,
        delta=0.1,
    )
    assert table["candidate"].tolist() == ["noisy", "good", "blind"]
    rows = table.set_index("candidate")
    # the unsure inputs are exactly the wrong ones: escalate those and nothing else
    assert rows.loc["noisy", "share_escalated"] == HARD / N
    assert rows.loc["noisy", "predicted_ms"] == pytest.approx(1.0 + HARD / N * 4.0)
    assert rows.loc["good", "share_escalated"] == 0.0
    # sure and wrong: no threshold separates them, every input goes to the reference
    assert rows.loc["blind", "share_escalated"] == 1.0
    assert rows.loc["blind", "predicted_ms"] == pytest.approx(4.5)
    assert (rows["served_disagreement"] == 0.0).all()
    assert rows.loc["noisy", "disagreement_alone"] == HARD / N
    assert rows.loc["noisy", "saving"] == pytest.approx(1 - (1.0 + 0.08) / 4.0)


def test_escalation_cost_replaces_the_reference_cost_for_escalated_inputs() -> None:
    reference, candidates = _logits()
    table = rank_cascades(
        {"noisy": candidates["noisy"]},
        reference,
        costs={"noisy": 1.0},
        reference_cost=4.0,
        escalation_cost=10.0,
    )
    assert table.loc[0, "predicted_ms"] == pytest.approx(1.0 + HARD / N * 10.0)


@pytest.mark.parametrize(
    ("tolerance", "order", "tied"),
    [
        (0.0, ["noisy", "good", "blind"], [True, False, False]),
        (0.01, ["noisy", "good", "blind"], [True, False, False]),  # 1.1 > 1.08 * 1.01
        (0.05, ["good", "noisy", "blind"], [True, True, False]),  # tied: fewer escalations
        (4.0, ["good", "noisy", "blind"], [True, True, True]),  # blind escalates everything
    ],
)
def test_costs_within_the_tolerance_tie_and_fewer_escalations_win(
    tolerance: float, order: list[str], tied: list[bool]
) -> None:
    reference, candidates = _logits()
    table = rank_cascades(
        candidates,
        reference,
        costs={"good": 1.1, "noisy": 1.0, "blind": 0.5},  # predicted 1.1, 1.08, 4.5
        reference_cost=4.0,
        tolerance=tolerance,
    )
    assert table["candidate"].tolist() == order
    assert table["tied"].tolist() == tied


def test_bad_input_is_refused_by_name() -> None:
    reference, candidates = _logits()
    with pytest.raises(ValueError, match="'costs'"):
        rank_cascades(candidates, reference, costs={"good": 1.0}, reference_cost=4.0)
    with pytest.raises(ValueError, match=r"costs\['good'\]"):
        rank_cascades(
            {"good": candidates["good"]}, reference, costs={"good": -1.0}, reference_cost=4.0
        )
    with pytest.raises(ValueError, match="'reference_cost'"):
        rank_cascades(
            candidates, reference, costs=dict.fromkeys(candidates, 1.0), reference_cost=float("nan")
        )
    with pytest.raises(ValueError, match=r"candidates\['good'\]"):
        rank_cascades({"good": reference[:10]}, reference, costs={"good": 1.0}, reference_cost=4.0)
    with pytest.raises(ValueError, match="'scorer'"):
        rank_cascades(
            {"good": reference}, reference, costs={"good": 1.0}, reference_cost=4.0, scorer="gate"
        )
    with pytest.raises(ValueError, match="'max_disagreement'"):
        rank_cascades(
            {"good": reference}, reference, costs={"good": 1.0}, reference_cost=4.0,
            max_disagreement=0.0,
        )  # fmt: skip
    for tolerance in (-0.1, float("nan"), float("inf"), True, "0.05"):
        with pytest.raises(ValueError, match="'tolerance'"):
            rank_cascades(
                {"good": reference}, reference, costs={"good": 1.0}, reference_cost=4.0,
                tolerance=tolerance,  # type: ignore[arg-type]
            )  # fmt: skip
