"""A real (small) search on the fake model whose sensitivities and costs are known, as a record."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from fake_search import (
    BITS,
    LAYERS,
    PARAMS,
    SCHEMES,
    SENS,
    FakeCost,
    FakeProfile,
    fake_model,
    known_quality,
)

from mpsearch.report import StudyRecord
from mpsearch.report._report import as_record
from mpsearch.search import Budget, SearchSpace, search

MEMORY_MB = 0.03


@pytest.fixture(scope="session")
def fake_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-search")
    return search(
        fake_model(),
        profile=FakeProfile(),
        cost=FakeCost(),
        evaluate=known_quality,
        space=SearchSpace(schemes=SCHEMES),
        budget=Budget(memory_mb=MEMORY_MB),
        n_trials=12,
        storage=f"sqlite:///{tmp}/s.db",
        study_name="fake",
        seed=0,
    )


def profile_table() -> pd.DataFrame:
    """The fake model's profile as the profiler lays it out (known by construction)."""
    return pd.DataFrame(
        [
            {
                "layer": ly,
                "scheme": s,
                "layer_type": "Linear",
                "params": PARAMS[ly],
                "bits_per_weight": float(BITS[s]),
                "e2e": SENS[ly][s],
                "task_drop": math.nan,
            }
            for ly in LAYERS
            for s in SCHEMES
            if s != "fp32"
        ]
    )


def make_record(result) -> StudyRecord:
    rec = as_record(result)
    rec.profile = profile_table()
    rec.cost = FakeCost().table
    rec.info["workload"] = "fake"
    return rec


def add_measurements(rec: StudyRecord) -> StudyRecord:
    """Measured rows and a controller curve in the layout `mpsearch run` writes them."""
    rec.summary = pd.DataFrame(
        {
            "plan": ["fp32", "best", "uniform:w8a8", "uniform:w4a16"],
            "quality": [0.99, 0.985, 0.97, 0.90],
            "memory_mb": [0.065, 0.02, 0.021, 0.013],
            "latency_ms": [4.0, 1.6, 2.0, 1.2],
        }
    )
    rec.controller = pd.DataFrame(
        {
            "method": [
                "static:fp32",
                "static:w8a8",
                "ctrl:max_softmax:0.01",
                "ctrl:max_softmax:0.05",
            ],
            "latency_ms": [1.0, 0.4, 0.8, 0.5],
            "disagreement": [0.0, 0.06, 0.004, 0.03],
            "accuracy": [0.99, 0.93, 0.99, 0.97],
        }
    )
    return rec


@pytest.fixture
def fake_record(fake_result) -> StudyRecord:
    return make_record(fake_result)


@pytest.fixture(scope="session")
def full_report(fake_result):
    """The report (figures drawn once) of the fake search with measurements and a controller curve."""
    from mpsearch.report import build_report

    return build_report(add_measurements(make_record(fake_result)))
