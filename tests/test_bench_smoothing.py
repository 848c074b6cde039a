"""Smoke test of ``benchmarks/bench_smoothing.py``: one Hugging Face architecture's row."""

from __future__ import annotations

import pytest
from helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    with benchmark_module("bench_smoothing") as module:
        yield module


def test_a_row_compares_w8a8_without_and_with_each_smoothing(bench) -> None:
    row = bench.row(bench.architecture_case("vit"))
    assert row["model"] == "hf:vit" and row["fp32"] == 0.0  # KL of the model to itself
    assert row["w8a8"] > 0.0
    for alpha in bench.ALPHAS:
        assert row[f"{alpha}: x loss"] == pytest.approx(row[f"w8a8 + {alpha}"] / row["w8a8"])
        smoothed, total = map(int, row[f"{alpha}: layers"].split("/"))
        assert 0 <= smoothed <= total == 13
    # 0.5 folds every normalisation it can; auto only those that hold up on held-out rows
    assert int(row["auto: layers"].split("/")[0]) <= int(row["0.5: layers"].split("/")[0])
