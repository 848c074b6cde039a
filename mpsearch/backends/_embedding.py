"""Embedding tables, weight-only: fake-quantized (``simulate``) and stored as integer codes (``cpu``).

An embedding has no arithmetic on its input (token ids): every scheme quantizes its weight only,
one scale per row (a token) for per-channel schemes, per group of a row for grouped ones, and
its activation format does not apply (``w8a8`` is int8 weight-only here, ``w4a8`` / ``w4a16``
int4 weight-only). The rows looked up are dequantized to the table's own float dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch.backends._kernels import TORCH_DTYPES, RealLayer, dequantize_rows, pack_rows
from mpsearch.layers._layers import base_copy
from mpsearch.schemes import Scheme, fake_quantize
from mpsearch.schemes._formats import int_range


def _lookup(layer: nn.Embedding, ids: Tensor, weight: Tensor) -> Tensor:
    return F.embedding(ids, weight, layer.padding_idx, None, 2.0, layer.scale_grad_by_freq)


class SimulatedEmbedding(nn.Module):
    """An embedding whose table is fake-quantized once by the scheme's weight spec (and held in
    the scheme's weight format's float values); rows come out in the table's dtype."""

    def __init__(
        self, layer: nn.Embedding, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.layer_type = type(layer).__name__
        self.inner = layer
        with torch.no_grad():
            wq = fake_quantize(layer.weight.detach().float(), scheme.weight)
        self.register_buffer("weight_q", wq.to(layer.weight.dtype), persistent=True)

    def forward(self, ids: Tensor) -> Tensor:
        return _lookup(self.inner, ids, self.weight_q)

    def extra_repr(self) -> str:
        return f"{self.layer_type}, scheme={self.scheme.name!r} (weight-only)"


class CastEmbedding(RealLayer):
    """The embedding with its table stored in the scheme's dtype (``bf16``, ``fp16``); the
    rows looked up are cast back to the table's original dtype (fp32 runs the user's layer)."""

    def __init__(
        self, layer: nn.Embedding, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.out_dtype = layer.weight.dtype
        dtype = TORCH_DTYPES[scheme.compute_dtype]
        self.inner = base_copy(layer).to(dtype).requires_grad_(False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.inner(ids).to(self.out_dtype)


class QuantizedEmbedding(RealLayer):
    """Weight-only integer embedding (8, 4 or 2 bits): the table's codes packed ``8 // bits`` to
    a byte (offset to unsigned), scales in the scheme's scale dtype (one per row, or per group
    of a row) and, for asymmetric schemes, zero points (one byte each). A lookup gathers the
    packed rows, unpacks them and dequantizes ``(code - zero) * scale`` in float32: exactly the
    rows of :class:`SimulatedEmbedding`'s table, with ``bits / 32`` of its memory (plus scales).
    """

    def __init__(
        self, layer: nn.Embedding, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        spec = scheme.weight
        self.bits = spec.fmt.bits
        self.qmin = int_range(self.bits, symmetric=spec.symmetric)[0]
        self.out_dtype = layer.weight.dtype
        self.padding_idx, self.dim = layer.padding_idx, layer.embedding_dim
        codes, scales, zeros = pack_rows(layer.weight.detach(), scheme)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        w = dequantize_rows(
            self.codes.index_select(0, flat),
            self.scales.index_select(0, flat),
            None if self.zeros is None else self.zeros.index_select(0, flat),
            bits=self.bits,
            qmin=self.qmin,
            dim=self.dim,
        )
        return w.reshape(*ids.shape, self.dim).to(self.out_dtype)


__all__ = ["CastEmbedding", "QuantizedEmbedding", "SimulatedEmbedding"]
