"""Second-order sensitivity (HAWQ-V2): Hutchinson estimates of each layer's Hessian trace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpsearch._data import Batch, output_tensor, run_model
from mpsearch.layers import layer_weights

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def hutchinson_traces(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[str],
    loss_fn: LossFn,
    *,
    samples: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Mean Hessian diagonal ``tr(H_W) / numel(W)`` of the loss w.r.t. each layer's weight.

    Hutchinson's estimator: ``tr(H) = E[v^T H v]`` with Rademacher ``v``; ``H v`` comes from a
    second backward pass through the gradient. All layers are probed at once with one random
    vector over all their weights (cross-layer terms vanish in expectation). Cost: per batch one
    forward and backward with ``create_graph=True``, then ``samples`` Hessian-vector products
    (each about one more backward pass). ``loss_fn(output_tensor, batch)`` returns a scalar.
    The model's weights are made to require gradients (pass a copy).

    >>> net = nn.Sequential(nn.Linear(3, 1)).eval()
    >>> x = torch.randn(8, 3)
    >>> t = hutchinson_traces(net, [x], ["0"], lambda out, b: out.pow(2).mean(), samples=2)
    >>> t["0"] > 0   # H = 2 X^T X / n is positive semi-definite
    True
    """
    owner, params = [], []  # every weight matrix of every layer (an LSTM has several)
    for i, name in enumerate(layers):
        for w in layer_weights(model.get_submodule(name)).values():
            owner.append(i)
            params.append(w)
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(layers)
    sizes = [0] * len(layers)
    for i, p in zip(owner, params, strict=True):
        sizes[i] += p.numel()
    # The math attention kernel: the fused CPU ones (flash) have no double backward.
    with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            out = output_tensor(run_model(model, batch))
            loss = loss_fn(out, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(
                    "The 'loss_fn' argument must return a scalar tensor (with a graph to the "
                    f"model's weights). Got {type(loss).__name__} instead."
                )
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            if any(g is None for g in grads):
                missing = sorted(
                    {layers[i] for i, g in zip(owner, grads, strict=True) if g is None}
                )
                raise ValueError(f"The 'loss_fn' loss does not depend on layers {missing}.")
            for _ in range(samples):
                vs = [
                    torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                    for p in params
                ]
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                for i, hv, v in zip(owner, hvs, vs, strict=True):
                    totals[i] += float((hv * v).sum())
    n = samples * len(batches)
    return {name: totals[i] / n / sizes[i] for i, name in enumerate(layers)}
