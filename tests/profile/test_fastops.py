"""Exact stand-ins for slow CPU operations: bit-identical values, chosen only where they apply."""

from __future__ import annotations

import importlib
import itertools
import warnings

import pytest
import torch
from profile_models import batches
from torch import fx, nn
from torch.nn import functional as F

from mpsearch.profile import profile
from mpsearch.profile._fastops import FAST_FUNCTIONS, FAST_MODULES, fast_call, window_max


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values, NaN where NaN (and the same shape, dtype and strides)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(0.0, 1.0, -1.0), b.nan_to_num(0.0, 1.0, -1.0))
    )


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return v if isinstance(v, tuple) else (v, v)


CASES = [
    (k, s, p, d)
    for k, s, p, d in itertools.product([1, 2, 3, (2, 3), 4], [None, 1, 2, (1, 2)], [0, 1], [1, 2])
    if p <= (k if isinstance(k, int) else min(k)) // 2
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CASES)
def test_window_max_equals_max_pool2d(kernel, stride, padding, dilation) -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 9, 9), (3, 8, 8), (1, 2, 7, 10)]:
        x = torch.randn(shape, generator=g)
        x[..., 0, 0] = torch.nan
        x[..., 1, 2] = -torch.inf
        x[..., 2, 1] = torch.inf
        try:
            ref = F.max_pool2d(x, kernel, stride, padding, dilation)
        except RuntimeError:  # output smaller than one window: not a case
            continue
        out = window_max(x, _pair(kernel), _pair(stride or kernel), _pair(padding), _pair(dilation))
        assert _same(out, ref)


def test_window_max_other_dtypes_and_layouts() -> None:
    x = torch.randn(4, 8, 6, 6)
    for y in (x.bfloat16(), x.half(), x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(window_max(y, (2, 2), (2, 2), (0, 0), (1, 1)), F.max_pool2d(y, 2))


def _pool_node(module: nn.Module) -> tuple[fx.Node, nn.Module | None]:
    gm = fx.symbolic_trace(nn.Sequential(module))
    node = next(n for n in gm.graph.nodes if n.op in ("call_module", "call_function"))
    return node, gm.get_submodule(node.target) if node.op == "call_module" else None


def _call(fast, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """``fast`` called as the graph runner calls it: the node's own constant arguments."""
    return fast(x, *node.args[1:], **node.kwargs)


class _Functional(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, **self.kwargs)


class _Torch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max_pool2d(x, 2)


@pytest.mark.parametrize(
    ("module", "chosen"),
    [
        (nn.MaxPool2d(2), True),
        (nn.MaxPool2d(3, stride=2, padding=1), True),
        (_Functional(kernel_size=2), True),
        (_Functional(kernel_size=(2, 2), stride=1, padding=1), True),
        (_Torch(), True),
        (nn.MaxPool2d(2, ceil_mode=True), False),
        (nn.MaxPool2d(2, return_indices=True), False),
        (nn.MaxPool2d(5), False),  # 25 elements per window: the kernel stays
        (_Functional(kernel_size=2, ceil_mode=True), False),
        (nn.AvgPool2d(2), False),  # a mean depends on the order of the sum: never replaced
        (nn.ReLU(), False),
    ],
)
def test_fast_call_is_chosen_only_where_exact(module: nn.Module, chosen: bool) -> None:
    node, sub = _pool_node(module)
    fast = fast_call(node, sub)
    assert (fast is not None) is chosen
    if fast is not None:
        x = torch.randn(2, 4, 8, 8)
        assert torch.equal(_call(fast, node, x), module(x))


def test_fast_call_falls_back_to_the_original_for_other_inputs() -> None:
    node, sub = _pool_node(nn.MaxPool2d(2))
    fast = fast_call(node, sub)
    assert fast is not None
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = _call(fast, node, x)
    assert out.grad_fn is not None and "MaxPool" in type(out.grad_fn).__name__


class _PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_profile_with_and_without_stand_ins_is_identical(monkeypatch) -> None:
    model = _PoolNet().eval()
    calib = batches(3, 8, 3, 8, 8)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    fast = profile(model, calib, **kwargs)
    fastops = importlib.import_module("mpsearch.profile._fastops")
    monkeypatch.setattr(fastops, "FAST_FUNCTIONS", {})
    monkeypatch.setattr(fastops, "FAST_MODULES", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slow = profile(model, calib, **kwargs)
    assert fast.info["runner"] == slow.info["runner"] == "graph:fx"
    assert fast.table.equals(slow.table)


def test_registries_name_the_pooling_operations() -> None:
    assert F.max_pool2d in FAST_FUNCTIONS and torch.max_pool2d in FAST_FUNCTIONS
    assert nn.MaxPool2d in FAST_MODULES
