"""Smoke test of ``benchmarks/bench_architectures.py``: one architecture through the whole
pipeline in its own process, and the row it reports."""

from __future__ import annotations

import pytest
from helpers import benchmark_module


@pytest.fixture(scope="module")
def script():
    with benchmark_module("bench_architectures") as module:
        yield module


@pytest.fixture(scope="module")
def bench(script):
    pytest.importorskip("transformers")
    return script


def test_every_architecture_builds_and_takes_its_inputs(bench) -> None:
    import torch

    for name in bench.ARCHITECTURES:
        model, inputs = bench.build(name)
        with torch.inference_mode():
            model(**inputs(2, torch.Generator().manual_seed(0)))


def test_every_torchvision_model_builds_and_attention_is_split(script) -> None:
    """Runs in the torchvision venv (``scripts/models_venv.sh``); skipped elsewhere."""
    assert not set(script.TORCHVISION) & (set(script.ARCHITECTURES) | set(script.TIMM))
    pytest.importorskip("torchvision")
    import torch

    for name in script.TORCHVISION:
        model, inputs = script.build(name)
        assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
        with torch.inference_mode():
            model(inputs(2, torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_one_architecture_runs_the_whole_pipeline_in_its_own_process(bench) -> None:
    row = bench.row_in_subprocess("clip_text", trials=4)
    assert row["pipeline"] == "ok", row.get("note")
    assert row["runner"].startswith("graph:") and row["memory_exact"] == "3/3"
    assert row["formats"].split(", ") == list(bench.FORMATS)
    assert row["export_top1"] >= 0.9  # the exported files agree with what they were written from
    assert row["profile_ratio"] > 0 and 0.9 < row["coverage"] <= 1
