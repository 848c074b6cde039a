"""The ``simulate`` backend: fake quantization of any scheme, on any device, for quality."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mpsearch.backends._embedding import SimulatedEmbedding
from mpsearch.backends._experts import SimulatedExperts
from mpsearch.backends._recurrent import RNN_TYPES, SimulatedRNN
from mpsearch.backends._registry import Backend
from mpsearch.layers import layer_forward
from mpsearch.layers._expert_linears import ExpertLinears, ExpertRanges, follows_expert_interface
from mpsearch.layers._experts import is_expert_bank
from mpsearch.layers._layers import from_rows, standard_form, weight_rows
from mpsearch.schemes import Scheme, fake_quantize

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SimulatedLayer(nn.Module):
    """A layer whose weight is fake-quantized once and whose input is fake-quantized per call.

    The arithmetic then runs in the scheme's ``compute_dtype``; the output is cast back to
    the input's dtype. The wrapped layer is only read, never modified.
    """

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.layer_type = type(layer).__name__
        layer = standard_form(layer)  # HF Conv1D: a Linear on its transposed weight
        self.inner = layer
        self.compute_dtype = _DTYPES[scheme.compute_dtype]
        with torch.no_grad():  # quantized by output channel, kept in the layer's layout
            wq = from_rows(layer, fake_quantize(weight_rows(layer).detach().float(), scheme.weight))
        self.register_buffer("weight_q", wq.to(self.compute_dtype), persistent=True)
        bias = getattr(layer, "bias", None)
        self.register_buffer(
            "bias_c",
            None if bias is None else bias.detach().to(self.compute_dtype),
            persistent=True,
        )
        self.act_range = act_range

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        act = self.scheme.activation
        if act is not None and not act.is_identity:
            lo, hi = self.act_range if self.act_range is not None else (None, None)
            x = fake_quantize(x.float(), act, lo=lo, hi=hi)
        y = layer_forward(self.inner, x.to(self.compute_dtype), self.weight_q, self.bias_c)
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.layer_type}, scheme={self.scheme.name!r}, static={self.act_range is not None}"
        )


SIMULATED_KINDS: list[tuple[tuple[type[nn.Module], ...], type[nn.Module]]] = [
    (RNN_TYPES, SimulatedRNN),
    ((nn.Embedding,), SimulatedEmbedding),
]
"""(layer types, simulated module) for the layers that are not a Linear or a convolution."""

SIMULATED_TYPES: tuple[type[nn.Module], ...] = (
    SimulatedLayer,
    SimulatedExperts,
    *(kind for _, kind in SIMULATED_KINDS),
)
"""Every simulated module: each holds the layer it wraps as ``inner`` and its ``scheme``."""


class SimulateBackend(Backend):
    """Fake quantization: every scheme, every device; quality only, no real speed-up.

    LSTM / GRU layers: :class:`SimulatedRNN` (per-gate-row weights, dynamic activations as
    PyTorch's dynamic int8 kernel); embeddings: :class:`SimulatedEmbedding` (weight-only);
    Mixture-of-Experts banks: their experts' Linear layers (:class:`ExpertLinears`) where they
    follow Hugging Face's expert interface, else :class:`SimulatedExperts` (weight-only).
    """

    name = "simulate"
    real = False

    def quantize_layer(
        self,
        layer: nn.Module,
        scheme: Scheme,
        *,
        act_range: tuple[float, float] | ExpertRanges | None = None,
    ) -> nn.Module:
        """``layer`` in ``scheme``; ``act_range``: a static activation range (a bank of the
        expert interface: its expert Linear layers' :data:`ExpertRanges`)."""
        if is_expert_bank(layer):
            if follows_expert_interface(layer):
                assert not isinstance(act_range, tuple)
                return ExpertLinears(layer, scheme, self.quantize_layer, act_range=act_range)
            return SimulatedExperts(layer, scheme)
        assert not isinstance(act_range, Mapping)
        for types, kind in SIMULATED_KINDS:
            if isinstance(layer, types):
                return kind(layer, scheme)
        return SimulatedLayer(layer, scheme, act_range=act_range)
