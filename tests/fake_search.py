"""A fake model whose per-layer sensitivities and costs are known by construction."""

from __future__ import annotations

import itertools

import pandas as pd
import torch
from torch import nn

from mpsearch.backends._simulate import SimulatedLayer
from mpsearch.plan import PrecisionPlan

SCHEMES = ["fp32", "bf16", "w8a8", "w4a16"]
LAYERS = ["0", "1", "2", "3", "4"]
BITS = {"fp32": 32, "bf16": 16, "w8a8": 8, "w4a16": 4}
# sensitivity of layer k to scheme s: (k + 1) * base(s), with a twist on layer 2 so that the
# optimum is not simply "lowest bits on the least sensitive layers"
BASE = {"fp32": 0.0, "bf16": 0.001, "w8a8": 0.01, "w4a16": 0.08}
# small layer-specific factors break ties so that every budget has a unique optimum
SENS = {
    ly: {s: (int(ly) + 1) * BASE[s] * (1 + 0.07 * int(ly) ** 0.5) for s in SCHEMES} for ly in LAYERS
}
SENS["2"]["w4a16"] = 0.05
PARAMS = {ly: 1000 * (int(ly) + 1) for ly in LAYERS}  # layer k holds 1000 (k+1) weights
MEM = {ly: {s: PARAMS[ly] * BITS[s] // 8 for s in SCHEMES} for ly in LAYERS}
LAT = {ly: {s: 0.1 * (int(ly) + 1) * BITS[s] / 32 for s in SCHEMES} for ly in LAYERS}
BASE_MEMORY = 5000
BASE_LATENCY = 0.2


def fake_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(32, 32) for _ in LAYERS]).eval()


def known_quality(model: nn.Module) -> float:
    """1 minus the summed known sensitivities of the layers that run quantized."""
    drop = sum(
        SENS[n][m.scheme.name] for n, m in model.named_children() if isinstance(m, SimulatedLayer)
    )
    return 1.0 - drop


class FakeProfile:
    def error(self, layer: str, scheme: str, metric: str = "e2e") -> float:
        return SENS[layer][scheme]


class FakeCost:
    def __init__(self) -> None:
        self.table = pd.DataFrame(
            [
                {
                    "layer": ly,
                    "scheme": s,
                    "memory_bytes": MEM[ly][s],
                    "latency_ms": LAT[ly][s],
                    "supported": True,
                }
                for ly in LAYERS
                for s in SCHEMES
            ]
        )
        self.fp32_memory_bytes = self.memory_bytes(dict.fromkeys(LAYERS, "fp32"))
        self.fp32_latency_ms = self.latency_ms(dict.fromkeys(LAYERS, "fp32"))

    def _assignment(self, plan) -> dict[str, str]:
        return plan.resolve(LAYERS) if isinstance(plan, PrecisionPlan) else dict(plan)

    def memory_bytes(self, plan) -> int:
        a = self._assignment(plan)
        return BASE_MEMORY + sum(MEM[ly][a[ly]] for ly in LAYERS)

    def latency_ms(self, plan) -> float:
        a = self._assignment(plan)
        return BASE_LATENCY + sum(LAT[ly][a[ly]] for ly in LAYERS)

    def supported(self, layer: str, scheme: str) -> bool:
        return True


def brute_force_best(
    memory_mb: float | None = None, latency_ms: float | None = None
) -> dict[str, str]:
    cost = FakeCost()
    best, best_q, ties = None, -1.0, 0
    for combo in itertools.product(SCHEMES, repeat=len(LAYERS)):
        a = dict(zip(LAYERS, combo, strict=True))
        if memory_mb is not None and cost.memory_bytes(a) / 1e6 > memory_mb:
            continue
        if latency_ms is not None and cost.latency_ms(a) > latency_ms:
            continue
        q = 1.0 - sum(SENS[ly][a[ly]] for ly in LAYERS)
        if q > best_q + 1e-12:
            best, best_q, ties = a, q, 0
        elif abs(q - best_q) <= 1e-12:
            ties += 1
    assert best is not None and ties == 0, "the fake must have a unique optimum"
    return best
