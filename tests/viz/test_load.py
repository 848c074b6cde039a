from __future__ import annotations

import optuna
import pandas as pd
import pytest
from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import Budget, SearchSpace, search
from mpsearch.viz import hypervolume_data, load_result, method_hypervolume_data


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('load') / 's.db'}"
    res = search(
        fake_model(),
        profile=FakeProfile(),
        cost=FakeCost(),
        evaluate=known_quality,
        space=SearchSpace(schemes=SCHEMES),
        budget=Budget(memory_fraction=0.6),
        storage=url,
        study_name="fake",
        n_trials=20,
    )
    return url, res


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
    pd.testing.assert_frame_equal(method_hypervolume_data(loaded), method_hypervolume_data(res))
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
