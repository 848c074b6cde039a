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
    cascades = table[table["kind"] == "cascade"]
    assert cascades["candidate"].tolist() == ["noisy", "good", "blind"]
    rows = cascades.set_index("candidate")
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
    cascade = table[table["kind"] == "cascade"].iloc[0]
    assert cascade["predicted_ms"] == pytest.approx(1.0 + HARD / N * 10.0)


@pytest.mark.parametrize(
    ("tolerance", "order", "tied"),
    [
        (0.0, ["noisy ->", "good", "good ->"], [True, False, False]),
        (0.01, ["noisy ->", "good", "good ->"], [True, False, False]),  # 1.1 > 1.08 * 1.01
        (0.05, ["good", "good ->", "noisy ->"], [True, True, True]),  # tied: fewer escalations
        (4.0, ["good", "reference", "good ->"], [True, True, True]),  # alone before a cascade
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
    stages = [s.removesuffix("reference").rstrip() or "reference" for s in table["stages"]]
    assert stages[:3] == order
    assert table["tied"].tolist()[:3] == tied
    # the variants that do not meet the target alone come last, cheapest first
    assert table["stages"].tolist()[-2:] == ["blind", "noisy"]
    assert not table["meets_target"].iloc[-2:].any()


def test_a_variant_alone_is_a_choice_and_beats_a_slower_cascade() -> None:
    """A cascade of one: a variant that meets the target alone is weighed like the cascades,
    so a cascade predicted slower than it is never chosen (nor one slower than the reference)."""
    reference, candidates = _logits()
    steady = reference.clone()
    steady[-2:] = torch.tensor([0.0, 5.0])  # 2 sure disagreements in 1000: meets eps = 0.01
    table = rank_cascades(
        {"steady": steady, "noisy": candidates["noisy"]},
        reference,
        costs={"steady": 1.0, "noisy": 0.95},
        reference_cost=4.0,
        escalation_cost=1.0,
        decision_cost=0.1,  # noisy -> reference: 0.95 + 0.02 * 1.0 + 0.1 = 1.07
        max_disagreement=0.01,
    )
    first = table.iloc[0]
    assert (first["kind"], first["stages"], first["predicted_ms"]) == ("alone", "steady", 1.0)
    assert first["certified"] and first["meets_target"] and first["share_escalated"] == 0.0
    rows = table.set_index("stages")
    assert rows.loc["noisy -> reference", "predicted_ms"] == pytest.approx(1.07)
    assert rows.loc["steady -> reference", "predicted_ms"] == pytest.approx(1.1)  # never escalates
    assert not rows.loc["noisy", "meets_target"]  # 2% disagreement alone
    # Without the decision cost the cheap cascade wins (0.97 < 1.0).
    cheap = rank_cascades(
        {"steady": steady, "noisy": candidates["noisy"]},
        reference,
        costs={"steady": 1.0, "noisy": 0.95},
        reference_cost=4.0,
        escalation_cost=1.0,
        max_disagreement=0.01,
    )
    assert cheap.iloc[0]["stages"] == "noisy -> reference"


def test_the_reference_alone_beats_cascades_predicted_slower() -> None:
    """Only a cheap variant that is sure where it is wrong: its cascade escalates everything
    (4.5 ms per input) and the reference alone (4.0 ms) is the choice."""
    reference, candidates = _logits()
    table = rank_cascades(
        {"blind": candidates["blind"]},
        reference,
        costs={"blind": 0.5},
        reference_cost=4.0,
        reference_name="fp32",
    )
    assert table["stages"].tolist() == ["fp32", "blind -> fp32", "blind"]
    assert table.iloc[0]["kind"] == "alone" and table.iloc[0]["saving"] == 0.0
    assert table.iloc[1]["predicted_ms"] == pytest.approx(4.5)


def test_bad_input_is_refused_by_name() -> None:
    reference, candidates = _logits()
    with pytest.raises(ValueError, match="'costs'"):
        rank_cascades(candidates, reference, costs={"good": 1.0}, reference_cost=4.0)
    with pytest.raises(ValueError, match=r"costs\['good'\]"):
        rank_cascades(
            {"good": candidates["good"]}, reference, costs={"good": -1.0}, reference_cost=4.0
        )
    with pytest.raises(ValueError, match="'decision_cost'"):
        rank_cascades(
            {"good": reference}, reference, costs={"good": 1.0}, reference_cost=4.0,
            decision_cost=-1.0,
        )  # fmt: skip
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


def test_dense_logits_count_an_input_by_min_agreement() -> None:
    """Per-pixel logits [N, C, P]: the 'noisy' map is unsure and wrong at 2 of 10 positions of
    the HARD inputs and at 1 position of 10 others. At min_agreement 0.85 only the HARD inputs
    disagree, and the cascade escalates exactly those; at 0.95 all 30 do."""
    reference = torch.tensor([5.0, 0.0]).view(1, 2, 1).repeat(N, 1, 10)
    noisy = reference.clone()
    noisy[:HARD, :, :2] = torch.tensor([0.0, 0.1]).view(2, 1)
    noisy[HARD : HARD + 10, :, :1] = torch.tensor([0.0, 0.1]).view(2, 1)
    common = {"costs": {"noisy": 1.0}, "reference_cost": 4.0, "delta": 0.1}
    rows = rank_cascades(
        {"noisy": noisy}, reference, max_disagreement=0.005, min_agreement=0.85, **common
    ).set_index("stages")
    assert rows.loc["noisy", "disagreement_alone"] == HARD / N
    assert rows.loc["noisy -> reference", "share_escalated"] == HARD / N
    assert rows.loc["noisy -> reference", "served_disagreement"] == 0.0
    rows = rank_cascades(
        {"noisy": noisy}, reference, max_disagreement=0.05, min_agreement=0.95, **common
    ).set_index("stages")
    assert rows.loc["noisy", "disagreement_alone"] == (HARD + 10) / N
    with pytest.raises(ValueError, match="min_agreement"):
        rank_cascades({"noisy": noisy}, reference, min_agreement=0, **common)
    with pytest.raises(ValueError, match="'reduce'.*'max'"):
        rank_cascades({"noisy": noisy}, reference, reduce="median", **common)


def test_multi_label_logits_score_an_input_by_its_least_certain_label() -> None:
    """A multi-label classifier's labels as positions (``[N, 2, L]``): the HARD inputs have one
    of 10 labels flipped and unsure, 10 others one label as unsure but right (no score tells
    them apart), 10 more every label a little less sure. By the max of its labels' scores
    (``reduce="max"``, the controller's for multi-label) the cascade escalates the first 30
    only; by the mean the last 10 score above the HARD ones and are escalated too."""
    reference = torch.tensor([0.0, -6.0]).view(1, 2, 1).repeat(N, 1, 10)
    noisy = reference.clone()
    noisy[:HARD, 1, 0] = 0.05  # flipped, unsure
    noisy[HARD : HARD + 10, 1, 0] = -0.05  # right, unsure
    noisy[HARD + 10 : HARD + 20, 1, :] = -1.0  # right, every label a little less sure
    common = {"costs": {"noisy": 1.0}, "reference_cost": 4.0, "delta": 0.1}
    by_max = rank_cascades(
        {"noisy": noisy}, reference, max_disagreement=0.005, reduce="max", **common
    ).set_index("stages")
    by_mean = rank_cascades(
        {"noisy": noisy}, reference, max_disagreement=0.005, **common
    ).set_index("stages")
    assert by_max.loc["noisy -> reference", "share_escalated"] == (HARD + 10) / N
    assert by_mean.loc["noisy -> reference", "share_escalated"] > (HARD + 10) / N
    assert by_max.loc["noisy -> reference", "served_disagreement"] == 0.0
