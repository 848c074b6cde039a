"""Smoke test of ``benchmarks/bench_attention.py``: the fused and split rows of one model."""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_attention") as module:
        yield module


def test_split_rows_cover_the_in_projection_and_hold_fewer_w8a8_bytes(bench) -> None:
    torch.manual_seed(0)
    model = bench.Encoder(dim=32, vocab=64).eval()
    data = [torch.randint(0, 64, (4, 8)) for _ in range(2)]
    rows = {r["variant"]: r for r in bench.bench("encoder", model, data, rounds=1)}
    assert list(rows) == ["fused fp32", "split fp32", "fused w8a8", "split w8a8"]
    assert rows["fused fp32"]["coverage"] < 0.9 < rows["split fp32"]["coverage"]
    assert rows["split fp32"]["bytes"] == rows["fused fp32"]["bytes"]
    assert rows["split w8a8"]["bytes"] < rows["fused w8a8"]["bytes"] < rows["fused fp32"]["bytes"]
    assert rows["fused fp32"]["vs fused fp32 (1 thr)"] == 1.0
