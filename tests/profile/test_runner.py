"""The graph runner: how many quantized variants it re-runs at once, and that it does not
change the numbers."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from profile_models import batches, chain
from torch import nn

from mpsearch.layers import quantizable_layers
from mpsearch.profile import profile

runner_module = importlib.import_module("mpsearch.profile._runner")


class _ConvNet(nn.Module):
    """Large activations, small weights: compute-bound, one variant at a time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class _WideMLP(nn.Module):
    """Small activations, large weights used for few rows: weight-bound, all variants at once."""

    def __init__(self, d: int = 1024) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _groups(model: nn.Module, calib: list[torch.Tensor]) -> dict[str, int]:
    names = list(quantizable_layers(model))
    runner = runner_module.build_runner(model, calib, names, fold_bn=True, warn=print)
    runner.prepare_e2e(runner.batches)
    assert all(runner.batchable.values())
    return runner.group


def test_variants_run_together_only_where_it_saves_work() -> None:
    conv = _groups(_ConvNet().eval(), batches(2, 32, 3, 16, 16))
    # conv1's and conv2's suffixes hold 32 x 64 x 16 x 16 floats (2 MiB) per variant
    assert conv["conv1"] == conv["conv2"] == 1
    assert conv["fc"] > 3  # [32, 10] logits: all at once
    wide = _groups(_WideMLP().eval(), batches(2, 32, 64))
    # downstream of fc1, fc2's 4 MiB weight serves only 32 rows per run: worth sharing
    assert wide["fc1"] > 3


def test_concatenation_does_not_change_the_table(monkeypatch) -> None:
    model, calib = chain(4), batches(3, 16, 32)
    kwargs = {"schemes": ["bf16", "w8a8", "w4a16"], "progress": False}
    monkeypatch.setattr(runner_module, "CONCAT_BYTES", 1 << 40)
    assert min(_groups(model, calib).values()) >= 3
    together = profile(model, calib, **kwargs).table
    monkeypatch.setattr(runner_module, "CONCAT_BYTES", 0)
    monkeypatch.setattr(runner_module, "WEIGHT_REUSE", 0)
    assert set(_groups(model, calib).values()) == {1}
    alone = profile(model, calib, **kwargs).table
    for column in ("mse", "sqnr_db"):
        assert together[column].equals(alone[column])
    np.testing.assert_allclose(together["e2e"], alone["e2e"], rtol=1e-5)


class _Mixed(nn.Module):
    """Every kind of graph node the runner executes: modules (max pooling's fast stand-in
    included), functions, methods, an attribute, a residual, attention and a matrix product."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.proj = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.conv(x)))  # [b, 8, 4, 4]
        t = y.flatten(2).transpose(1, 2)  # [b, 16, 8]
        q = self.proj(t) * self.scale
        a = torch.nn.functional.scaled_dot_product_attention(q[:, None], t[:, None], t[:, None])
        z = t + a[:, 0] + torch.matmul(q, q.transpose(1, 2)).softmax(-1) @ t
        return self.head(z.mean(1))


def test_graph_runner_rows_equal_hook_runner_rows(monkeypatch) -> None:
    model, calib = _Mixed().eval(), batches(2, 6, 3, 8, 8)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(model, calib, **kwargs)
    monkeypatch.setattr(runner_module, "CAPTURES", {})  # no graph capture: the hook runner
    with pytest.warns(UserWarning, match="hook runner"):
        hooks = profile(model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx" and hooks.info["runner"] == "hooks"
    for metric in ("mse", "sqnr_db"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-5)
    # KL divergences down to 1e-10: float rounding of the batched downstream runs shows there
    np.testing.assert_allclose(graph.pivot("e2e"), hooks.pivot("e2e"), rtol=1e-4, atol=1e-10)


def test_node_costs_are_multiply_accumulates_or_output_sizes() -> None:
    model, calib = _Mixed().eval(), batches(1, 6, 3, 8, 8)
    runner = runner_module.build_runner(
        model, calib, ["conv", "proj", "head"], fold_bn=True, warn=print
    )
    cost = {str(n): c for n, c in runner.node_cost.items()}
    b, s, d = 6, 16, 8
    assert cost["conv"] == b * 8 * 8 * 8 * (3 * 3 * 3)  # output elements x (c_in x kernel)
    assert cost["proj"] == b * s * d * d
    assert cost["head"] == b * 5 * d
    assert cost["scaled_dot_product_attention"] == b * s * s * (d + d)  # q k^T and (.) v
    assert cost["matmul"] == b * s * s * d
    assert cost["matmul_1"] == b * s * d * s  # the `@` operator
    assert cost["pool"] == b * 8 * 4 * 4  # no multiply-accumulates: its output's size
    assert cost["relu"] == b * 8 * 8 * 8
    assert cost["x"] == cost["scale"] == cost["output"] == 0.0
