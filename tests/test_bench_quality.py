"""Smoke test of ``benchmarks/bench_quality.py``: its quality measures, one uniform-plan pass on
a tiny model with tiny settings, and the goal lines."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import benchmark_module
from torch import nn

from mpsearch.workloads._base import labelled_workload


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_quality") as module:
        yield module


class Fixed(nn.Module):
    """Returns the same logits for any input of the batch size."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape[1:])


def test_perplexity_of_uniform_logits_is_the_vocabulary_size(bench) -> None:
    logits = torch.zeros(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    assert bench.perplexity(nn.Identity(), [logits], [targets]) == pytest.approx(7.0, rel=1e-6)


def test_kl_to_reference_is_exact(bench) -> None:
    x = torch.zeros(4, 1)
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    kl = bench.KLToReference(Fixed(p.log()), [x])
    assert kl(Fixed(p.log())) == 0.0
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl(Fixed(q.log())) == pytest.approx(expected, rel=1e-6)


def test_kl_to_reference_skips_padded_tokens(bench) -> None:
    class LM(nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.logits

    ref = torch.zeros(1, 2, 2)  # uniform at both positions
    other = torch.tensor([[[0.0, 0.0], [0.0, 5.0]]])  # differs only at the padded position
    batch = {
        "input_ids": torch.zeros(1, 2, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 0]]),
    }
    assert bench.KLToReference(LM(ref), [batch])(LM(other)) == 0.0
    # a sequence classifier takes the mask too but gives one distribution per sample
    pooled = bench.KLToReference(LM(torch.zeros(1, 2)), [batch])(LM(torch.tensor([[0.0, 5.0]])))
    log_q = torch.log_softmax(torch.tensor([0.0, 5.0]), dim=0)
    assert pooled == pytest.approx(math.log(0.5) - 0.5 * float(log_q.sum()), rel=1e-6)


def tiny_workload():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(48, 32)
    with torch.no_grad():
        y = net(x).argmax(-1)
    return labelled_workload(
        "tiny", net, calib=(x[:24], y[:24]), test=(x[24:], y[24:]), batch_size=8, info={}
    )


def test_uniform_rows_on_a_tiny_model(bench) -> None:
    wl = tiny_workload()
    measure = bench.measure_for(wl)
    settings = replace(
        bench.QUICK, schemes=("w4a16_pc",), adaround_iters=5, recover_steps=2, recover_lr=1e-3
    )
    rows = bench.uniform_rows(wl, measure, settings)
    assert [r["method"] for r in rows] == ["-", *bench.METHODS]
    assert rows[0]["quality"] == 100.0  # labels are the fp32 model's own predictions
    # Exact bytes: int4 codes, a bf16 scale and a 4-bit zero point per output row, bf16 bias.
    layer_bytes = [(o * i * 4 + o * (16 + 4)) // 8 + 2 * o for o, i in ((16, 32), (4, 16))]
    fp32_bytes = 4 * (16 * 32 + 16 + 4 * 16 + 4)
    for r in rows[1:]:
        assert r["backend"] == "cpu"
        assert r["bytes_pct"] == pytest.approx(100 * sum(layer_bytes) / fp32_bytes)
        assert 0.0 <= r["quality"] <= 100.0 and r["seconds"] >= 0.0


def test_goal_lines(bench) -> None:
    def row(scheme, method, quality, pct=10.0):
        return {"scheme": scheme, "method": method, "quality": quality, "bytes_pct": pct}

    measures = {
        "digits_cnn": bench.Measure("accuracy %", True, lambda m: 0.0),
        "text_transformer": bench.Measure("perplexity", False, lambda m: 0.0),
    }
    rows = {
        "digits_cnn": [row("fp32", "-", 99.0, 100.0), row("w2a16", "gptq", 98.7)],
        "text_transformer": [
            row("fp32", "-", 4.0, 100.0),
            row("w4a16_pc", "rtn", 5.0),
            row("w4a16_pc", "gptq", 4.6),
            row("w4a16_pc", "recover(rtn)", 4.4),
        ],
    }
    ok = bench.SearchOutcome(hv={"rounding": 1.2, "rtn only": 1.0})
    low = bench.SearchOutcome(hv={"rounding": 1.05, "rtn only": 1.0})
    lines = bench.goals(rows, measures, {"a": ok, "b": low})
    assert "**met**" in lines[0] and "drop 0.30 points" in lines[0]
    assert "**met**" in lines[1] and "best (recover(rtn)) +0.400 (0.40 x RTN)" in lines[1]
    assert "**not met** (1 of 2" in lines[2]
    rows["digits_cnn"][1]["quality"] = 98.5
    assert "**not met**" in bench.goals(rows, measures, {})[0]
