"""Hutchinson Hessian traces (HAWQ-V2 sensitivity)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.profile._hessian import hutchinson_traces


class _Attention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (as Hugging Face models run)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).unbind(2)
        mixed = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.out(mixed.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16))


def test_attention_models_get_traces_on_cpu() -> None:
    """The fused CPU attention (flash) has no double backward: the traces run on the math one."""
    torch.manual_seed(0)
    net = _Attention().eval()
    x = torch.randn(4, 6, 16)
    traces = hutchinson_traces(
        net, [x], ["qkv", "out"], lambda out, b: out.pow(2).mean(), samples=2
    )
    assert set(traces) == {"qkv", "out"} and all(math.isfinite(t) for t in traces.values())
