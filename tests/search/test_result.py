"""SearchResult.best ranks ties by the budget asked for; warnings name a plan slower than fp32."""

from __future__ import annotations

import optuna
import pytest
from fake_search import LAT, LAYERS, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import Budget, SearchResult, SearchSpace, search

FP32_MB, FP32_MS = 10.0, 10.0
# scheme: (quality, memory MB, latency ms); w8a8 and bf16 tie in quality, as on BERT
FRONT = {
    "fp32": (0.95, 10.0, 10.0),
    "w8a8": (0.90, 2.0, 5.0),  # the smaller
    "bf16": (0.90, 4.0, 3.0),  # the faster
    "w4a16": (0.80, 1.0, 1.0),
}


def fake_result(front=FRONT, limits=(None, None)) -> SearchResult:
    study = optuna.create_study(direction="maximize")
    for name, (quality, memory_mb, latency_ms) in front.items():
        attrs = {"plan": {"0": name}, "memory_mb": memory_mb, "latency_ms": latency_ms}
        trial = optuna.trial.create_trial(
            value=quality, user_attrs={**attrs, "quality_source": "true"}
        )
        study.add_trial(trial)
    return SearchResult(
        study=study,
        space=None,
        table=None,
        objectives=("quality",),
        limits=limits,
        fp32_memory_mb=FP32_MB,
        fp32_latency_ms=FP32_MS,
    )


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (Budget(latency_ms=6.0), "bf16"),  # a latency budget: the faster of equal quality
        (Budget(latency_fraction=0.6), "bf16"),
        (Budget(memory_mb=5.0), "bf16"),  # a memory budget met by both: the faster
        # both: the smaller share of the budgets, w8a8 2/5 + 5/6 = 1.23, bf16 4/5 + 3/6 = 1.3
        (Budget(memory_mb=5.0, latency_ms=6.0), "w8a8"),
        (Budget(memory_mb=5.0, latency_ms=4.0), "bf16"),  # int8 is over the latency budget
        (None, "fp32"),  # no budget: the best quality
        (Budget(memory_mb=1.5), "w4a16"),
    ],
)
def test_best_breaks_quality_ties_by_the_budget_asked_for(budget, expected) -> None:
    assert fake_result().best(budget).resolve(["0"]) == {"0": expected}


def test_best_defaults_to_the_searchs_budget() -> None:
    assert fake_result(limits=(None, 6.0)).best().resolve(["0"]) == {"0": "bf16"}
    assert fake_result(limits=(5.0, None)).best().resolve(["0"]) == {"0": "bf16"}
    with pytest.raises(ValueError, match="No evaluated plan meets the budget"):
        fake_result(limits=(0.5, None)).best()


def test_warnings_say_when_the_best_plan_is_predicted_slower_than_fp32() -> None:
    slow = {"fp32": (0.95, 10.0, 10.0), "w8a8": (0.9, 2.0, 13.0)}
    res = fake_result(slow, limits=(3.0, None))
    assert res.warnings == [
        "The best plan under the budget (trial 1) is predicted 1.30x slower than fp32 (13 ms vs "
        "10 ms) on this machine: it meets the budget by giving up speed. If speed matters too, "
        "add a latency budget, e.g. res.best(Budget(latency_fraction=1.0)) or search(..., "
        "budget=Budget(..., latency_fraction=1.0)), or pick another plan from the front "
        "(res.pareto)."
    ]
    tie = {"fp32": (0.9, 10.0, 10.0), "w8a8": (0.9, 2.0, 13.0)}  # no budget: the smaller wins
    (note,) = fake_result(tie).warnings
    assert note.startswith("The best plan (no budget was given) (trial 1) is predicted 1.30x")
    assert "without a budget, quality ties go to the smaller plan" in note
    within_noise = {"fp32": (0.95, 10.0, 10.0), "w8a8": (0.9, 2.0, 10.4)}
    assert fake_result(within_noise, limits=(3.0, None)).warnings == []
    assert fake_result(limits=(5.0, None)).warnings == []
    assert fake_result(limits=(0.5, None)).warnings == []  # no plan: best() says so


class SlowLowBitsCost(FakeCost):
    """Every scheme but fp32 runs 2x slower than fp32 (as bf16 does on AVX2-only CPUs)."""

    def __init__(self) -> None:
        super().__init__()
        self.table["latency_ms"] = [
            LAT[row.layer]["fp32"] * (1 if row.scheme == "fp32" else 2)
            for row in self.table.itertuples()
        ]

    def latency_ms(self, plan) -> float:
        a = self._assignment(plan)
        return 0.2 + sum(LAT[ly]["fp32"] * (1 if a[ly] == "fp32" else 2) for ly in LAYERS)


def test_search_warns_when_its_best_plan_is_slower_than_fp32() -> None:
    with pytest.warns(UserWarning, match=r"predicted 1\.\d\dx slower than fp32"):
        res = search(
            fake_model(),
            profile=FakeProfile(),
            cost=SlowLowBitsCost(),
            evaluate=known_quality,
            space=SearchSpace(schemes=["fp32", "bf16", "w8a8", "w4a16"]),
            budget=Budget(memory_fraction=0.3),
            n_trials=10,
        )
    assert len(res.warnings) == 1
