"""Folding BatchNorm into the preceding convolution or linear layer (torch.fx)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from mpsearch._validation import check_module

_FOLDABLE_INTO: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` (``bn`` in eval mode), in float64 then cast."""
    folded = copy.deepcopy(layer)
    w = layer.weight.detach().double()
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    shape = (-1,) + (1,) * (w.dim() - 1)
    dtype = layer.weight.dtype
    folded.weight = nn.Parameter((w * factor.reshape(shape)).to(dtype), requires_grad=False)
    folded.bias = nn.Parameter(((bias - mean) * factor + beta).to(dtype), requires_grad=False)
    return folded


def fold_graph(gm: fx.GraphModule) -> int:
    """Fold every ``BatchNorm(conv/linear(x))`` pair of ``gm`` in place; return how many were folded.

    A pair folds when the layer's output feeds only the BatchNorm, the BatchNorm is in eval mode
    with running statistics, and (for Linear) the BatchNorm is ``BatchNorm1d`` on 2-D input.
    """
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        bn = modules[node.target]
        if bn.training or bn.running_mean is None or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = modules.get(src.target)
        if not isinstance(layer, _FOLDABLE_INTO) or type(layer) not in _FOLDABLE_INTO:
            continue
        if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        gm.set_submodule(src.target, _fold_pair(layer, bn))
        modules[src.target] = gm.get_submodule(src.target)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return count


@contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Puts every module's attributes, parameters, buffers and submodules back after a trace:
    a ``forward`` caching ``self.pe = f(x, self.pe)`` sets a proxy there (Wav2Vec2-Conformer),
    which the graph would hold and later runs would call. What the trace added stays, but a
    proxy: the tracer's own constants (``_tensor_constant0``) are read by the graph."""
    saved = [
        (d, dict(d))
        for m in model.modules()
        for d in (vars(m), m._parameters, m._buffers, m._modules)
    ]
    try:
        yield
    finally:
        for d, items in saved:
            for key in [k for k, v in d.items() if k not in items and isinstance(v, fx.Proxy)]:
                del d[key]
            d.update(items)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the conv/linear before it.

    The model is traced with ``torch.fx``; the folded copy is a ``GraphModule`` whose layers keep
    their names from ``model.named_modules()`` (``conv1``, ``layer1.0.conv1`` ...) and whose fp32
    outputs equal ``model``'s to float rounding (about 1e-6 relative). Where tracing fails
    (data-dependent control flow), a warning is issued and an unfolded copy is returned.
    ``model`` itself is never modified.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net)
    >>> [type(m).__name__ for m in folded.children()]
    ['Conv2d', 'ReLU']
    """
    check_module(model)
    work = copy.deepcopy(model).eval()
    try:
        with attributes_kept(work):  # the graph module is made from the attributes put back
            graph = fx.Tracer().trace(work)
    except Exception as exc:  # tracing failures come in many types
        warnings.warn(
            f"fold_batchnorm: {type(model).__name__} cannot be traced with torch.fx ({exc}); "
            "BatchNorm is left unfolded.",
            stacklevel=2,
        )
        return work
    gm = fx.GraphModule(work, graph, type(work).__name__)
    fold_graph(gm)
    return gm.eval()
