"""A weight's quantization grid, fixed from the weight itself, and rounding onto it.

Calibrated rounding (GPTQ, AdaRound) moves weights to other grid points than the nearest; it
must never move the grid. Every backend re-derives a weight's scales and zero points from the
weight's own per-row (or per-group) minimum and maximum, so a rounded weight runs exactly as
rounded only if its extremes give back the same grid. :class:`Grid` therefore *anchors* them: in
each row (group) the codes stay within the grid's range (the code of 0 bounds a side with no
weight of that sign), and the largest (smallest) weight takes the largest (smallest) code. A
rounded weight is then a fixed point of the scheme's own ``fake_quantize``: the kernels store
exactly its codes. The anchored round to nearest (:meth:`Grid.rtn`) is round to nearest itself
except, rarely, for an extreme weight that round to nearest puts one code inside the range (its
value is then within 0.53 of a step of the anchor's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpsearch.schemes import QuantSpec
from mpsearch.schemes._fakequant import dequantize_codes, qparams, quantize_codes
from mpsearch.schemes._formats import int_range


def _spread(t: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """A per-(row, group) tensor ``(out, groups, 1)`` as one value per weight ``(out, d)``."""
    return t.expand(shape).reshape(shape[0], -1)


class Grid:
    """The grid of a 2-D weight ``(out, d)`` under ``spec`` (per-channel or per-group integer).

    >>> from mpsearch.schemes import get_scheme, fake_quantize
    >>> w = torch.randn(4, 64)
    >>> grid = Grid(w, get_scheme("w4a16").weight)
    >>> torch.equal(fake_quantize(grid.rtn(), grid.spec), grid.rtn())
    True
    """

    def __init__(self, weight: Tensor, spec: QuantSpec) -> None:
        if weight.dim() != 2:
            raise ValueError(f"Grid takes a 2-D weight (out, in). Got shape {tuple(weight.shape)}.")
        self.spec = spec
        out, d = weight.shape
        self.group = spec.group_size if spec.granularity == "group" else d
        if d % self.group:
            raise ValueError(f"group_size={self.group} does not divide the layer's input size {d}")
        w = weight.detach().float()
        shape = (out, d // self.group, self.group)
        g = w.reshape(shape)
        lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
        scale, zero = qparams(lo.reshape(-1, 1), hi.reshape(-1, 1), spec)
        self.scale = _spread(scale.reshape(*shape[:2], 1), shape)
        qmin, qmax = int_range(spec.fmt.bits, symmetric=spec.symmetric)
        if zero is None:  # symmetric: [-qmax, qmax]; the largest |w| takes ±qmax by its sign
            self.zero = None
            amax = torch.maximum(-lo, hi)
            low = torch.where(amax > 0, torch.full_like(amax, qmin), 0.0)
            high = -low
            extremes = [(g.abs().argmax(2, keepdim=True), amax > 0, None)]
        else:  # asymmetric: qmin at the smallest weight, qmax at the largest
            z = zero.reshape(*shape[:2], 1)
            self.zero = _spread(z, shape)
            low = torch.where(lo < 0, torch.full_like(lo, qmin), z)
            high = torch.where(hi > 0, torch.full_like(hi, qmax), z)
            extremes = [
                (g.argmax(2, keepdim=True), hi > 0, high),
                (g.argmin(2, keepdim=True), lo < 0, low),
            ]
        self.low, self.high = _spread(low, shape), _spread(high, shape)
        if zero is None:  # the range the grid spans (symmetric: ±amax)
            lo, hi = -amax, amax
        self.w_low, self.w_high = _spread(lo, shape), _spread(hi, shape)
        self.anchored = torch.zeros_like(w, dtype=torch.bool)
        self.anchor_codes = torch.zeros_like(w)
        for index, present, code in extremes:
            if code is None:
                code = torch.where(g.gather(2, index) < 0, low, high)
            mark = torch.zeros_like(g, dtype=torch.bool).scatter_(2, index, True) & present
            mark = mark.reshape(out, d)
            self.anchored |= mark
            self.anchor_codes = torch.where(mark, _spread(code, shape), self.anchor_codes)
        self.rtn_codes = self.codes(w)

    def codes(self, values: Tensor, columns: slice | Tensor = slice(None)) -> Tensor:
        """Round-to-nearest codes of ``values`` (the weight's ``columns``), in range, anchored."""
        zero = None if self.zero is None else self.zero[:, columns]
        q = quantize_codes(values.float(), self.scale[:, columns], zero, self.spec)
        return self._anchor(q, columns)

    def clamp(self, codes: Tensor) -> Tensor:
        """``codes`` (of the whole weight) in range, anchored."""
        return self._anchor(codes, slice(None))

    def _anchor(self, q: Tensor, columns: slice | Tensor) -> Tensor:
        q = torch.minimum(torch.maximum(q, self.low[:, columns]), self.high[:, columns])
        return torch.where(self.anchored[:, columns], self.anchor_codes[:, columns], q)

    def dequantize(self, codes: Tensor, columns: slice | Tensor = slice(None)) -> Tensor:
        zero = None if self.zero is None else self.zero[:, columns]
        return dequantize_codes(codes, self.scale[:, columns], zero)

    def rtn(self) -> Tensor:
        """The anchored round to nearest (where calibrated rounding starts)."""
        return self.dequantize(self.rtn_codes)

    def latent(self, weight: Tensor, codes: Tensor, *, margin: float = 0.45) -> Tensor:
        """The float weight nearest to ``weight`` that rounds to nearest to ``codes`` on this
        grid (within ``margin`` of a step of each code) and keeps the grid: where a
        quantization-aware fine-tune starts to keep a calibrated rounding and the weight's own
        fractional positions. The extremes that set the grid stay the weight's own.

        >>> from mpsearch.schemes import get_scheme
        >>> w = torch.randn(4, 64)
        >>> grid = Grid(w, get_scheme("w4a16").weight)
        >>> torch.equal(Grid(grid.latent(w, grid.rtn_codes), grid.spec).scale, grid.scale)
        True
        """
        w = weight.detach().float()
        inside = torch.minimum(
            torch.maximum(w, self.dequantize(codes - margin)), self.dequantize(codes + margin)
        )
        inside = torch.minimum(torch.maximum(inside, self.w_low), self.w_high)
        return torch.where(self.anchored, w, inside)

    def floor_codes(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(floor code, fractional part)`` of each weight on the grid (AdaRound's start)."""
        x = weight.detach().float() / self.scale
        fl = torch.floor(x)
        if self.zero is not None:
            return fl + self.zero, x - fl
        return fl, x - fl


def output_error(weight: Tensor, rounded: Tensor, hessian: Tensor) -> float:
    """``tr((W - R) H (W - R)^T)``: the summed squared error of the layer's outputs that ``R``
    instead of ``W`` causes on inputs with second moment ``H`` (``sum x x^T``).

    >>> output_error(torch.ones(1, 2), torch.zeros(1, 2), torch.eye(2))
    2.0
    """
    delta = weight.double() - rounded.double()
    return float((delta @ hessian.double() * delta).sum())
