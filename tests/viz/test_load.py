from __future__ import annotations

import optuna
import pandas as pd
import pytest
from fake_search import FakeCost

from mpsearch.viz import load_result
from mpsearch.viz.data import hypervolume_data, method_hypervolume_data


@pytest.fixture
def stored(stored_budget):
    return stored_budget


def test_load_result_rebuilds_the_front_from_storage_alone(stored) -> None:
    url, res = stored
    cost = FakeCost()
    loaded = load_result(
        url,
        "fake",
        fp32_memory_mb=cost.fp32_memory_bytes / 1e6,
        fp32_latency_ms=cost.fp32_latency_ms,
    )
    cols = ["trial", "quality", "memory_mb", "latency_ms", "origin"]
    pd.testing.assert_frame_equal(loaded.pareto[cols], res.pareto[cols])
    assert loaded.plans == res.plans
    assert loaded.limits == pytest.approx(res.limits)
    assert loaded.objectives == res.objectives
    assert loaded.best() == res.best()
    assert loaded.hypervolume() == pytest.approx(res.hypervolume())
    pd.testing.assert_frame_equal(hypervolume_data(loaded), hypervolume_data(res))
    # with the study's choice table the baselines' plans are matched exactly as on the original
    with_table = load_result(
        url,
        "fake",
        table=res.table,
        fp32_memory_mb=res.fp32_memory_mb,
        fp32_latency_ms=res.fp32_latency_ms,
    )
    pd.testing.assert_frame_equal(method_hypervolume_data(with_table), method_hypervolume_data(res))
    assert with_table.space == res.space
    # without it, by the trials' origin (the first method that proposed each plan)
    by_origin = method_hypervolume_data(loaded).set_index("method")["points"]
    evaluated = res.trials[
        res.trials["quality_source"].isin(["true", "memo"]) & res.trials["feasible"]
    ]
    assert by_origin["greedy"] == int(evaluated["origin"].str.startswith("greedy:").sum())
    assert loaded.space.layers == res.space.layers
    assert loaded.space.choices == res.space.choices


def test_load_result_without_fp32_figures_uses_the_largest_trial(stored) -> None:
    url, res = stored
    loaded = load_result(url, "fake")
    assert loaded.fp32_memory_mb == pytest.approx(res.trials["memory_mb"].max())
    assert loaded.fp32_latency_ms == pytest.approx(res.trials["latency_ms"].max())
    pd.testing.assert_frame_equal(loaded.trials, res.trials)


def test_load_result_refuses_unknown_or_foreign_studies(stored, tmp_path) -> None:
    url, _ = stored
    with pytest.raises(ValueError, match=r"no study named 'nope'.*\['fake'\]"):
        load_result(url, "nope")
    plain = f"sqlite:///{tmp_path / 'plain.db'}"
    optuna.create_study(storage=plain, study_name="plain")
    with pytest.raises(ValueError, match="not made by mpsearch.search"):
        load_result(plain, "plain")
    with pytest.raises(ValueError, match="'fp32_memory_mb' argument"):
        load_result(url, "fake", fp32_memory_mb=-1.0)
    with pytest.raises(ValueError, match="'study_name' argument"):
        load_result(url, "")
