"""The study summary says plainly when a plan, the chosen one included, ran slower than fp32."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import torch
from torch import nn

from mpsearch.pipeline import StudyConfig, StudySteps, summarize
from mpsearch.plan import PrecisionPlan

# measured latency by the scheme the model runs in (bf16 slow, as on AVX2-only CPUs)
MEASURED_MS = {"fp32": 1.0, "bf16": 1.5, "w8a8": 1.02}


class FakeCost:
    fp32_memory_bytes = 4000
    backend = "simulate"  # the backend its kernels were measured on

    def memory_bytes(self, plan) -> int:
        return 2000

    def time_module(self, module: nn.Module) -> float:
        return MEASURED_MS[getattr(module[0], "scheme", SimpleNamespace(name="fp32")).name]


def _workload():
    torch.manual_seed(0)
    return SimpleNamespace(model=nn.Sequential(nn.Linear(32, 32)).eval(), evaluate=lambda m: 1.0)


def test_summary_notes_each_plan_measured_slower_than_fp32() -> None:
    plans = {"best": PrecisionPlan.uniform("bf16"), "uniform:w8a8": PrecisionPlan.uniform("w8a8")}
    df = summarize(_workload(), FakeCost(), plans, backend="simulate", rounds=1)
    assert list(df["plan"]) == ["fp32", "best", "uniform:w8a8"]
    # w8a8 at 1.02x is within the timing noise: no note
    assert list(df["note"]) == ["", "measured 1.50x slower than fp32", ""]


def test_summary_notes_a_plan_that_cannot_run_on_the_backend() -> None:
    plans = {"best": PrecisionPlan.uniform("w4a4"), "uniform:w8a8": PrecisionPlan.uniform("w8a8")}
    df = summarize(_workload(), FakeCost(), plans, backend="cpu", rounds=1)
    assert df.loc[1, "note"].startswith("cannot run: ValueError: The plan cannot run on the 'cpu'")
    assert df["quality"].isna().tolist() == [False, True, False]
    assert list(df.columns) == [
        "plan",
        "quality",
        "memory_mb",
        "latency_ms",
        "memory_ratio",
        "speedup",
        "quality_drop",
        "note",
    ]


def test_the_study_log_says_when_the_chosen_plan_ran_slower_than_fp32() -> None:
    lines: list[str] = []
    steps = StudySteps(StudyConfig(workload="mlp", backend="simulate"), log=lines.append)
    no_uniform = pd.DataFrame(columns=["origin", "state", "assignment"], dtype=str)
    steps.__dict__.update(
        workload=_workload(),
        cost=FakeCost(),
        best=PrecisionPlan.uniform("bf16"),
        result=SimpleNamespace(trials=no_uniform),
    )
    steps.measure()
    assert lines[-1] == (
        "note: the chosen plan was measured 1.50x slower than fp32 (1.5 ms); if speed matters "
        "too, add a latency budget (e.g. latency_fraction: 1.0)"
    )
