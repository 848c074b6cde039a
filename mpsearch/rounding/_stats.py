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
from mpsearch.layers._expert_linears import follows_expert_interface, recording
from mpsearch.layers._experts import is_expert_bank
from mpsearch.layers._layers import eval_mode, standard_form, swapped, watched

ROUNDABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layers (in their standard form) whose weights calibrated rounding takes: one weight applied
to input patches (``Linear`` rows, convolution windows). A Mixture-of-Experts bank of Hugging
Face's expert interface is taken too: each expert weight as a grouped Linear, one group per
expert (:class:`BankStats`)."""


@dataclass
class LayerStats:
    """``hessian[g]``: ``sum p p^T`` over the input patches ``p`` of convolution group ``g``
    (one group for a Linear), ``mean[g]``: their mean, ``count``: how many patches."""

    hessian: Tensor
    mean: Tensor
    count: int


BankStats = dict[str, LayerStats]
"""A Mixture-of-Experts bank's statistics, by expert weight (``gate_up_proj``, ``down_proj``...):
group ``e`` of each is expert ``e``'s inputs to that projection, the tokens routed to it (zero
for an expert no calibration token reached); ``count`` is the rows of all experts."""


def rounding_unsupported(layer: nn.Module) -> str | None:
    """Why calibrated rounding cannot take ``layer`` (``None``: it can).

    >>> rounding_unsupported(nn.LSTM(4, 4))
    'calibrated rounding takes Linear and Conv1d/Conv2d layers, not LSTM'
    """
    if isinstance(standard_form(layer), ROUNDABLE_TYPES):
        return None
    kind = type(layer).__name__
    if is_expert_bank(layer):
        if follows_expert_interface(layer):
            return None
        return (
            "calibrated rounding takes Mixture-of-Experts banks that follow Hugging Face's "
            f"expert interface (their experts run as Linear layers), not {kind}"
        )
    return f"calibrated rounding takes Linear and Conv1d/Conv2d layers, not {kind}"


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


def _never_ran(name: str) -> ValueError:
    return ValueError(
        f"Layer {name!r} never ran on the calibration data, so it has no input statistics "
        "for calibrated rounding; give it 'rtn' or check the data reaches it."
    )


def _unit_scaled(chunk: Tensor) -> tuple[Tensor, Tensor]:
    """``(chunk / scale, scale)``: each group's inputs divided by the power of two at their
    largest magnitude (exact), so their float32 products neither underflow nor overflow
    (a random-initialised MobileViT feeds layers inputs of 1e-22 to 1e-34); ``scale`` float64,
    ``(groups, 1, 1)``."""
    amax = chunk.abs().amax(dim=(1, 2), keepdim=True)
    one = torch.ones_like(amax)
    scale = torch.where(amax > 0, torch.ldexp(one, torch.frexp(amax).exponent), one)
    return chunk / scale, scale.double()


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
            unit, scale = _unit_scaled(p[:, start : start + 8192])
            self.hessian += (unit.transpose(1, 2) @ unit).double() * scale.square()
            self.total += unit.sum(1).double() * scale[:, 0]
        self.count += p.shape[1]

    def result(self, name: str) -> LayerStats:
        if self.hessian is None or self.total is None:
            raise _never_ran(name)
        return LayerStats(self.hessian, self.total / self.count, self.count)


class _BankAccumulator:
    """Each expert's inputs to each projection of an interface bank, read from the bank run as
    its expert Linear layers (:func:`recording`: the interface's own routing, float32)."""

    def __init__(self, bank: nn.Module) -> None:
        self.accumulators: dict[str, _Accumulator] = {}
        self.linears = recording(bank, self._record)
        up = "gate_up_proj" if bank.has_gate else "up_proj"
        self.parts = {
            weight: [self.accumulators.setdefault(f"{part}.{e}", _Accumulator(linear))
                     for e, linear in enumerate(getattr(self.linears, part))]
            for weight, part in ((up, "up"), ("down_proj", "down"))
        }  # fmt: skip

    def _record(self, name: str, x: Tensor) -> None:
        self.accumulators[name](x)

    def result(self, name: str) -> BankStats:
        out = {}
        for weight, experts in self.parts.items():
            d = experts[0].layer.in_features
            hessian = torch.zeros(len(experts), d, d, dtype=torch.float64)
            mean = torch.zeros(len(experts), d, dtype=torch.float64)
            for e, acc in enumerate(experts):
                if acc.hessian is not None and acc.total is not None:
                    hessian[e], mean[e] = acc.hessian[0], acc.total[0] / acc.count
            count = sum(acc.count for acc in experts)
            if not count:
                raise _never_ran(name)
            out[weight] = LayerStats(hessian, mean, count)
        return out


def collect_stats(
    model: nn.Module, batches: Iterable[Any], layers: Sequence[str]
) -> dict[str, LayerStats | BankStats]:
    """:class:`LayerStats` of each of ``layers`` over ``batches`` (one pass of ``model``); a
    Mixture-of-Experts bank's :class:`BankStats`.

    >>> net = nn.Sequential(nn.Linear(3, 2)).eval()
    >>> collect_stats(net, [torch.ones(4, 3)], ["0"])["0"].hessian[0]
    tensor([[4., 4., 4.],
            [4., 4., 4.],
            [4., 4., 4.]], dtype=torch.float64)
    """
    modules = {name: model.get_submodule(name) for name in layers}
    banks = {n: _BankAccumulator(m) for n, m in modules.items() if is_expert_bank(m)}
    accumulators = {n: _Accumulator(m) for n, m in modules.items() if n not in banks}
    recorders = {name: bank.linears for name, bank in banks.items()}
    with (
        torch.inference_mode(),
        eval_mode(model),
        watched(model, accumulators),
        swapped(model, recorders),
    ):
        for batch in batches:
            run_model(model, batch)
    found: dict[str, _Accumulator | _BankAccumulator] = {**accumulators, **banks}
    return {name: found[name].result(name) for name in layers}
