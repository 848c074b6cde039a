from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from fake_search import BITS, LAYERS, PARAMS, SENS

from mpsearch.plan import PrecisionPlan
from mpsearch.report import (
    StudyRecord,
    controller_curve_data,
    front_table,
    layer_table,
    speedup_table,
)
from mpsearch.report._data import best_uniform, headline, plan_label


def _summary(rows: list[tuple[str, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["plan", "quality", "memory_mb", "latency_ms"])


def test_front_table_is_the_search_front_with_ratios_and_the_chosen_plan(
    fake_result, fake_record
) -> None:
    front = front_table(fake_record)
    pareto = fake_result.pareto
    assert sorted(front["trial"]) == sorted(pareto["trial"])
    assert list(front["memory_mb"]) == sorted(front["memory_mb"])
    fp32_mb, fp32_ms = fake_result.fp32_memory_mb, fake_result.fp32_latency_ms
    np.testing.assert_allclose(front["memory_ratio"], front["memory_mb"] / fp32_mb)
    np.testing.assert_allclose(front["speedup"], fp32_ms / front["latency_ms"])
    chosen = front[front["chosen"]]
    assert len(chosen) == 1
    assert int(chosen["trial"].iloc[0]) == fake_result.best().metadata["trial"]
    assert chosen["memory_mb"].iloc[0] <= fake_result.limits[0]
    plan = dict(zip(LAYERS, ["w8a8", "fp32", "w4a16", "fp32", "bf16"], strict=True))
    assert plan_label(plan) == "0=w8a8 2=w4a16 4=bf16"
    assert plan_label(dict.fromkeys(LAYERS, "fp32")) == "fp32"


def test_layer_table_reads_scheme_size_bits_and_sensitivity(fake_record) -> None:
    plan = PrecisionPlan({"0": "w8a8", "2": "w4a16", "4": "bf16"}, default="fp32")
    table = layer_table(fake_record, plan).set_index("layer")
    assert list(table.index) == LAYERS
    for layer, scheme in plan.resolve(LAYERS).items():
        row = table.loc[layer]
        assert row["scheme"] == scheme
        assert row["params"] == PARAMS[layer]
        assert row["bits_per_weight"] == BITS[scheme]
        assert row["sensitivity"] == pytest.approx(SENS[layer][scheme])
        assert row["memory_kb"] == pytest.approx(PARAMS[layer] * BITS[scheme] / 8 / 1e3)
    # default: the chosen plan
    chosen = layer_table(fake_record)
    assert dict(zip(chosen["layer"], chosen["scheme"], strict=True)) == (
        fake_record.best.resolve(LAYERS)
    )


def test_best_uniform_is_the_best_feasible_uniform_plan_and_speedups_are_ratios(
    fake_record,
) -> None:
    trials = fake_record.trials
    feasible = set(trials.loc[trials["feasible"], "origin"])
    assert "uniform:w8a8" in feasible and "uniform:fp32" not in feasible
    fake_record.summary = _summary(
        [
            ("fp32", 0.99, 0.065, 4.0),
            ("best", 0.985, 0.02, 1.6),
            ("uniform:fp32", 0.99, 0.065, 4.2),  # best quality, but over the budget
            ("uniform:w8a8", 0.97, 0.021, 2.0),
            ("uniform:w4a16", 0.90, 0.013, 1.2),
        ]
    )
    assert best_uniform(fake_record) == "uniform:w8a8"
    table = speedup_table(fake_record).set_index("plan")
    assert table.loc["best", "speedup"] == pytest.approx(4.0 / 1.6)
    assert table.loc["uniform:w8a8", "best_vs"] == pytest.approx(2.0 / 1.6)
    assert table.loc["uniform:w4a16", "quality_drop"] == pytest.approx(0.09)
    assert table.loc["best", "memory_ratio"] == pytest.approx(0.02 / 0.065)
    assert list(table["role"]) == ["reference", "chosen", "", "best uniform", ""]
    h = headline(fake_record)
    assert h["best_uniform"] == "uniform:w8a8"
    assert h["speedup_vs_best_uniform"] == pytest.approx(1.25)
    assert h["speedup_vs_fp32"] == pytest.approx(2.5)
    assert h["front_size"] == len(fake_record.pareto)
    assert h["true_evaluations"] == int((fake_record.trials["quality_source"] == "true").sum())


def test_without_a_feasible_uniform_plan_the_best_quality_one_is_used(fake_record) -> None:
    fake_record.summary = _summary(
        [("fp32", 0.99, 0.065, 4.0), ("best", 0.98, 0.02, 2.0), ("uniform:fp32", 0.99, 0.065, 4.1)]
    )
    assert best_uniform(fake_record) == "uniform:fp32"
    fake_record.summary = None
    assert best_uniform(fake_record) is None
    assert speedup_table(fake_record).empty
    assert math.isnan(headline(fake_record)["speedup_vs_fp32"])


def test_controller_curve_groups_methods_into_series() -> None:
    df = pd.DataFrame(
        {
            "method": ["ctrl:gate:0.05", "static:fp32", "ctrl:gate:0.01", "static:w8a8", "oracle"],
            "latency_ms": [0.5, 1.0, 0.8, 0.4, 0.45],
            "disagreement": [0.03, 0.0, 0.004, 0.06, 0.0],
            "accuracy": [0.97, 0.99, 0.99, 0.93, np.nan],
        }
    )
    curve = controller_curve_data(df)
    gate = curve[curve["series"] == "ctrl:gate"]
    assert list(gate["epsilon"]) == [0.05, 0.01]  # sorted by latency
    assert set(curve.loc[curve["series"] == "static", "method"]) == {"static:fp32", "static:w8a8"}
    assert curve.loc[curve["method"] == "oracle", "series"].item() == "oracle"
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['disagreement'\]"):
        controller_curve_data(df.drop(columns="disagreement"))
    with pytest.raises(ValueError, match="no rows"):
        controller_curve_data(df.iloc[:0])


def test_record_round_trips_through_its_directory(fake_record, tmp_path) -> None:
    fake_record.summary = _summary([("fp32", 0.99, 0.065, 4.0), ("best", 0.98, 0.02, 2.0)])
    fake_record.controller = pd.DataFrame(
        {"method": ["static:fp32"], "latency_ms": [1.0], "disagreement": [0.0], "accuracy": [0.9]}
    )
    fake_record.save(tmp_path / "out")
    back = StudyRecord.load(tmp_path / "out")
    assert back.name == "fake"
    assert back.best == fake_record.best
    assert [p.rules for p in back.pareto["plan"]] == [p.rules for p in fake_record.pareto["plan"]]
    assert list(back.trials["assignment"]) == list(fake_record.trials["assignment"])
    assert back.trials["feasible"].dtype == bool
    pd.testing.assert_frame_equal(back.summary, fake_record.summary)
    assert back.layers == LAYERS
    assert front_table(back).equals(front_table(fake_record))
    with pytest.raises(ValueError, match="No study output directory"):
        StudyRecord.load(tmp_path / "missing")


def test_a_rerun_without_a_plan_under_the_budget_leaves_no_stale_plan(
    fake_record, tmp_path
) -> None:
    fake_record.save(tmp_path / "out")
    assert (tmp_path / "out" / "best_plan.json").exists()
    fake_record.best = None  # the rerun's search found no plan meeting the budget
    fake_record.save(tmp_path / "out")
    assert not (tmp_path / "out" / "best_plan.json").exists()
    assert StudyRecord.load(tmp_path / "out").best is None


def test_trials_without_a_quality_source_column_load(fake_record, tmp_path) -> None:
    fake_record.trials = fake_record.trials.drop(columns=["quality_source"], errors="ignore")
    fake_record.save(tmp_path / "out")
    back = StudyRecord.load(tmp_path / "out")
    assert set(back.trials["quality_source"]) == {""}


def test_empty_notes_read_back_as_empty_text(fake_record, tmp_path) -> None:
    fake_record.pareto = fake_record.pareto.assign(real_note=[""] * len(fake_record.pareto))
    fake_record.summary = _summary([("fp32", 0.99, 0.065, 4.0)]).assign(note=[""])
    fake_record.save(tmp_path / "out")
    back = StudyRecord.load(tmp_path / "out")
    assert list(back.pareto["real_note"]) == [""] * len(fake_record.pareto)
    assert list(back.summary["note"]) == [""]
