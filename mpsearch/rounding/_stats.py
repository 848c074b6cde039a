"""Second moments of each layer's inputs on calibration data: what GPTQ, AdaRound and bias
correction need of it (one pass over the data for every layer and every scheme)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch._data import run_model
from mpsearch.layers._layers import standard_form, watched

ROUNDABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layers (in their standard form) whose weights calibrated rounding takes: one weight applied
to input patches (``Linear`` rows, convolution windows)."""


@dataclass
class LayerStats:
    """``hessian[g]``: ``sum p p^T`` over the input patches ``p`` of convolution group ``g``
    (one group for a Linear), ``mean[g]``: their mean, ``count``: how many patches."""

    hessian: Tensor
    mean: Tensor
    count: int


def rounding_unsupported(layer: nn.Module) -> str | None:
    """Why calibrated rounding cannot take ``layer`` (``None``: it can).

    >>> rounding_unsupported(nn.LSTM(4, 4))
    'calibrated rounding takes Linear and Conv1d/Conv2d layers, not LSTM'
    """
    if isinstance(standard_form(layer), ROUNDABLE_TYPES):
        return None
    return f"calibrated rounding takes Linear and Conv1d/Conv2d layers, not {type(layer).__name__}"


def patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows ``layer`` multiplies by its weight: ``(groups, rows, in per group)``.

    A Linear's inputs over every leading dimension; a convolution's windows (padding included,
    as :func:`torch.nn.functional.unfold` lays them out: channel-major, the order of the
    flattened weight), split by its groups.

    >>> conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    >>> patches(conv, torch.randn(2, 4, 5, 5)).shape
    torch.Size([2, 50, 18])
    """
    layer = standard_form(layer)
    x = x.detach().float()
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C*k, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    g = layer.groups
    return rows.reshape(rows.shape[0], g, -1).transpose(0, 1)


class _Accumulator:
    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.hessian: Tensor | None = None
        self.total: Tensor | None = None
        self.count = 0

    def __call__(self, x: Tensor) -> None:
        p = patches(self.layer, x)
        if self.hessian is None:
            g, _, d = p.shape
            self.hessian = torch.zeros(g, d, d, dtype=torch.float64)
            self.total = torch.zeros(g, d, dtype=torch.float64)
        assert self.total is not None
        for start in range(0, p.shape[1], 8192):  # float32 products, float64 sums
            chunk = p[:, start : start + 8192]
            self.hessian += (chunk.transpose(1, 2) @ chunk).double()
            self.total += chunk.sum(1).double()
        self.count += p.shape[1]

    def result(self, name: str) -> LayerStats:
        if self.hessian is None or self.total is None:
            raise ValueError(
                f"Layer {name!r} never ran on the calibration data, so it has no input statistics "
                "for calibrated rounding; give it 'rtn' or check the data reaches it."
            )
        return LayerStats(self.hessian, self.total / self.count, self.count)


def collect_stats(
    model: nn.Module, batches: Iterable[Any], layers: Sequence[str]
) -> dict[str, LayerStats]:
    """:class:`LayerStats` of each of ``layers`` over ``batches`` (one pass of ``model``).

    >>> net = nn.Sequential(nn.Linear(3, 2)).eval()
    >>> collect_stats(net, [torch.ones(4, 3)], ["0"])["0"].hessian[0]
    tensor([[4., 4., 4.],
            [4., 4., 4.],
            [4., 4., 4.]], dtype=torch.float64)
    """
    accumulators = {name: _Accumulator(model.get_submodule(name)) for name in layers}
    with torch.inference_mode(), watched(model, accumulators):
        for batch in batches:
            run_model(model, batch)
    return {name: acc.result(name) for name, acc in accumulators.items()}
