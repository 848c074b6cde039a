"""Mixture-of-Experts banks (:mod:`mpsearch.layers._experts`) on the ``simulate`` and ``cpu``
backends.

A bank of Hugging Face's generic expert interface runs as its experts' Linear layers, each on
the backend's Linear kernel for the scheme, routed as the interface's eager forward
(:class:`~mpsearch.layers._expert_linears.ExpertLinears`): on ``cpu`` the packed int8 / int4
weight-only GEMMs and oneDNN / fbgemm int8 of any Linear layer (a Mixtral-size bank decoding
one token in w4a16: 2.3-3.0x the fp32 bank's speed, ``benchmarks/bench_experts.py``).

Any other bank runs its own forward, the family's routing code, with its expert weights
substituted (``torch.func.functional_call``): the fake-quantized weights in ``simulate``
(:class:`SimulatedExperts`), the stored ones dequantized at each call in ``cpu``
(:class:`QuantizedExperts`), both in the scheme's compute dtype, the bank's input cast to it
and its output cast back. As for an embedding, a scheme's activation format does not apply
there (the tokens are routed to the experts inside the bank's own code): ``w8a8`` is int8
weight-only, computed in float32. The two give the same weights bit for bit (the codes are the
simulation's, dequantized by the same operations). The memory is real (codes packed
``8 // bits`` to a byte, one scale per expert's output channel or group); dequantizing every
expert at each call is slow (the Mixtral-size bank: 260-400 ms per token), which the cost
model measures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from mpsearch.backends._kernels import TORCH_DTYPES, RealLayer, dequantize_rows, pack_rows
from mpsearch.layers._expert_linears import bank_copy
from mpsearch.layers._experts import expert_rows, expert_weights, from_expert_rows
from mpsearch.schemes import Scheme, fake_quantize
from mpsearch.schemes._formats import int_range


def _run(
    bank: nn.Module, weights: dict[str, Tensor], dtype: torch.dtype, args: Any, kwargs: Any
) -> Any:
    """``bank``'s own forward with ``weights`` in place of its expert weights, its biases and
    first input cast to ``dtype`` and its floating outputs cast back to that input's dtype."""
    x, *rest = args
    out_dtype = x.dtype
    biases = {n: p.to(dtype) for n, p in bank.named_parameters() if p.dtype != dtype}
    weights = {**biases, **weights}
    out = torch.func.functional_call(bank, weights, (x.to(dtype), *rest), kwargs)
    return pytree.tree_map_only(
        Tensor, lambda t: t.to(out_dtype) if t.is_floating_point() else t, out
    )


class SimulatedExperts(nn.Module):
    """A bank whose expert weights are fake-quantized once (by each expert's output channel)
    and held in the scheme's compute dtype; ``inner`` is the bank itself, only read (it runs as
    a copy: :func:`bank_copy`)."""

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.layer_type = type(layer).__name__
        self.inner = layer
        self.bank = bank_copy(layer)
        self.compute_dtype = TORCH_DTYPES[scheme.compute_dtype]
        self.names = list(expert_weights(layer))
        with torch.no_grad():
            for name, w in expert_weights(layer).items():
                rows = fake_quantize(expert_rows(layer, w.detach().float()), scheme.weight)
                wq = from_expert_rows(layer, rows, w.shape).to(self.compute_dtype)
                self.register_buffer(f"{name}_q", wq.contiguous(), persistent=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = {n: getattr(self, f"{n}_q") for n in self.names}
        return _run(self.bank, weights, self.compute_dtype, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.layer_type}, scheme={self.scheme.name!r} (weight-only)"


class QuantizedExperts(RealLayer):
    """A bank whose expert weights are stored in the scheme's weight format: integer codes
    packed to bytes with scales (and zero points) per expert's output channel or group, or a
    half-precision dtype. ``inner`` is the bank's copy to run, with its own copy of the biases
    (:func:`bank_copy`); each call dequantizes the expert weights to the compute dtype."""

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        spec = scheme.weight
        self.compute_dtype = TORCH_DTYPES[scheme.compute_dtype]
        weights = expert_weights(layer)
        self.names = list(weights)
        self.inner = bank_copy(layer, own=True)
        self.integer = spec.fmt.kind == "int"
        self.bits = spec.fmt.bits if self.integer else 0
        self.qmin = int_range(self.bits, symmetric=spec.symmetric)[0] if self.integer else 0
        self.shapes = {n: tuple(w.shape) for n, w in weights.items()}
        with torch.no_grad():
            for name, w in weights.items():
                rows = expert_rows(layer, w.detach())
                if not self.integer:  # bf16 / fp16: the weight stored in that dtype
                    stored = from_expert_rows(layer, rows, w.shape).to(TORCH_DTYPES[spec.format])
                    self.register_buffer(f"{name}_w", stored.contiguous())
                    continue
                codes, scales, zeros = pack_rows(rows, scheme)
                self.register_buffer(f"{name}_codes", codes)
                self.register_buffer(f"{name}_scales", scales)
                self.register_buffer(f"{name}_zeros", zeros)

    def _weight(self, name: str) -> Tensor:
        """Expert weight ``name`` dequantized, in its bank's layout, in the compute dtype."""
        if not self.integer:
            return getattr(self, f"{name}_w").to(self.compute_dtype)
        shape = self.shapes[name]
        rows = dequantize_rows(
            getattr(self, f"{name}_codes"),
            getattr(self, f"{name}_scales"),
            getattr(self, f"{name}_zeros"),
            bits=self.bits,
            qmin=self.qmin,
            dim=shape[1] if getattr(self.inner, "is_transposed", False) else shape[2],
        )
        return from_expert_rows(self.inner, rows, shape).to(self.compute_dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = {n: self._weight(n) for n in self.names}
        return _run(self.inner, weights, self.compute_dtype, args, kwargs)


__all__ = [
    "QuantizedExperts",
    "SimulatedExperts",
]
