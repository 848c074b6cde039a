"""AdaRound (Nagel et al., 2020): learned up/down rounding of each weight, per layer."""

from __future__ import annotations

import torch
from torch import Tensor

from mpsearch.rounding._grid import Grid, output_error
from mpsearch.schemes import QuantSpec

_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch


def _h(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def adaround(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    iters: int = 400,
    lr: float = 1e-2,
    reg: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    check_every: int = 25,
    seed: int = 0,
    trace: list[float] | None = None,
) -> Tensor:
    """``weight`` (``(out, d)``) rounded onto its grid under ``spec`` by AdaRound.

    Each weight rounds down or up (``floor + h(V)``, ``h`` a rectified sigmoid); ``V`` minimises
    the layer's output error ``tr(ΔW H ΔW^T)`` (``hessian``: ``sum x x^T`` of the layer's
    calibration inputs, so the objective is exact for the whole calibration set) plus ``reg``
    times a regulariser pushing ``h`` to 0 or 1, annealed from ``beta[0]`` to ``beta[1]``
    after ``warmup`` of the ``iters`` Adam steps. The hard rounding is scored every
    ``check_every`` steps by the output error alone, and the best one seen (the anchored round
    to nearest included: the starting point) is returned, so the result's output error never
    exceeds round to nearest's. Anchored grid as :func:`~mpsearch.rounding.gptq`.

    >>> from mpsearch.schemes import get_scheme
    >>> w, x = torch.randn(8, 32), torch.randn(256, 32)
    >>> h, spec = x.T @ x, get_scheme("w4a16_pc").weight
    >>> output_error(w, adaround(w, h, spec), h) <= output_error(w, Grid(w, spec).rtn(), h)
    True
    """
    with torch.inference_mode(False), torch.enable_grad():  # also when called under no_grad
        return _adaround(
            weight.detach().float().clone(),
            hessian.detach().float().clone(),
            spec,
            iters=iters,
            lr=lr,
            reg=reg,
            beta=beta,
            warmup=warmup,
            check_every=check_every,
            seed=seed,
            trace=trace,
        ).to(weight.dtype)


def _adaround(
    w: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    iters: int,
    lr: float,
    reg: float,
    beta: tuple[float, float],
    warmup: float,
    check_every: int,
    seed: int,
    trace: list[float] | None,
) -> Tensor:
    grid = Grid(w, spec)
    h = hessian / max(float(hessian.diagonal().mean()), 1e-30)
    floor, frac = grid.floor_codes(w)
    best_codes = grid.rtn_codes
    anchors = grid.rtn()
    best = output_error(w, grid.dequantize(best_codes), h)
    scored = trace if trace is not None else []
    scored.append(best)
    # h(V) = frac at the start: the soft weight is the weight itself
    p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    torch.manual_seed(seed)
    start = int(warmup * iters)
    scale = 1.0 / w.shape[0]
    for it in range(iters):
        soft = grid.dequantize(torch.minimum(torch.maximum(floor + _h(v), grid.low), grid.high))
        soft = torch.where(grid.anchored, anchors, soft)
        delta = soft - w
        loss = (delta @ h * delta).sum() * scale
        if it >= start:
            b = beta[0] + (beta[1] - beta[0]) * (it - start) / max(iters - start - 1, 1)
            loss = loss + reg * (1 - (2 * _h(v) - 1).abs().pow(b)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % check_every == 0 or it + 1 == iters:
            with torch.no_grad():
                codes = grid.clamp(floor + (v >= 0).float())
                err = output_error(w, grid.dequantize(codes), h)
            scored.append(err)
            if err < best:
                best, best_codes = err, codes
    return grid.dequantize(best_codes)
