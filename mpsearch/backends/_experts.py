"""Mixture-of-Experts banks (:mod:`mpsearch.layers._experts`) on the ``simulate`` and ``cpu``
backends.

A bank of Hugging Face's generic expert interface (:func:`follows_expert_interface`) runs as
its experts' Linear layers, each on the backend's Linear kernel for the scheme, routed as the
interface's eager forward (:class:`ExpertLinears`): on ``cpu`` the packed int8 / int4
weight-only GEMMs and oneDNN int8 of any Linear layer (measured on a Mixtral-size bank at one
token: 0.84 ms in w4a16 vs 2.49 ms fp32, ``benchmarks/bench_experts.py``).

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

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from mpsearch.backends._kernels import TORCH_DTYPES, RealLayer, dequantize_rows, pack_rows
from mpsearch.layers._experts import expert_rows, expert_weights, from_expert_rows
from mpsearch.layers._layers import stand_in_tensor
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


EXPERT_INTERFACE = ("has_gate", "has_bias", "is_transposed", "num_experts")
"""The attributes of Hugging Face's generic expert interface (``use_experts_implementation``),
besides ``_apply_gate`` (gated banks) or ``act_fn``: with them a bank is a set of expert
Linear layers and a routing (:class:`ExpertLinears`)."""


def follows_expert_interface(layer: nn.Module) -> bool:
    """Whether the bank ``layer`` follows Hugging Face's generic expert interface
    (:data:`EXPERT_INTERFACE`), its weights named as that interface reads them."""
    if not all(hasattr(layer, a) for a in EXPERT_INTERFACE):
        return False
    if not hasattr(layer, "_apply_gate" if layer.has_gate else "act_fn"):
        return False
    up = "gate_up_proj" if layer.has_gate else "up_proj"
    return set(expert_weights(layer)) == {up, "down_proj"}


def _expert_linear(layer: nn.Module, name: str, e: int) -> nn.Linear:
    """Expert ``e``'s projection ``name`` of an interface bank as an ``nn.Linear`` (its weight
    ``[out, in]``; a transposed bank's is copied)."""
    w = getattr(layer, name)[e].detach()
    w = w.T.contiguous() if layer.is_transposed else w
    bias = getattr(layer, f"{name}_bias")[e].detach() if layer.has_bias else None
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear.eval()


def _bank_copy(layer: nn.Module, *, own: bool = False, biases: bool = True) -> nn.Module:
    """A copy of the bank ``layer`` to run: its settings, submodules and other tensors (biases)
    shared (``own``: the biases copied, so that the copy's bytes are its own; ``biases=False``:
    none), its expert weights replaced by stand-ins (no bytes), none of its hooks (a hook the
    profiler puts on the bank must not run again inside its quantized variants)."""
    weights = expert_weights(layer)
    bank = copy.copy(layer)
    nn.Module.__init__(bank)  # fresh parameter, buffer, module and hook registries
    bank._parameters = {
        n: nn.Parameter(p.detach().clone(), requires_grad=False) if own and p is not None else p
        for n, p in layer._parameters.items()
        if n not in weights and biases
    }
    bank._buffers = dict(layer._buffers)
    bank._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
    bank._modules = dict(layer._modules)
    for name, w in weights.items():
        bank.register_buffer(name, stand_in_tensor(w), persistent=False)
    return bank.train(layer.training).requires_grad_(False)


class ExpertLinears(nn.Module):
    """A bank following Hugging Face's generic expert interface, run as its experts' Linear
    layers, each built in the scheme by ``build(linear, scheme)`` (a backend's Linear kernel:
    ``simulate``'s fake quantization, ``cpu``'s packed int8 / int4 weight-only GEMMs, oneDNN
    int8...), and the routing of the interface's eager forward: each hit expert's tokens
    through its up (or gate-up) projection, the bank's own gate (``_apply_gate``: GPT-OSS's
    clamped GLU) or activation, its down projection and optional post-expert norm, weighted
    and summed in float32. A scheme quantizes activations as on any Linear (per expert call).
    Under ``torch.export`` (static shapes) every expert runs on every token, weighted by the
    routing (zero where not routed): the same sums, ``experts / top_k`` times the work.
    ``bank`` is the bank's copy without its tensors, for its gate, activation and norm."""

    def __init__(
        self, layer: nn.Module, scheme: Scheme, build: Any, *, act_range: Any = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.layer_type = type(layer).__name__
        self.bank = _bank_copy(layer, biases=False)
        up = "gate_up_proj" if layer.has_gate else "up_proj"
        experts = range(int(layer.num_experts))
        self.up = nn.ModuleList(build(_expert_linear(layer, up, e), scheme) for e in experts)
        self.down = nn.ModuleList(
            build(_expert_linear(layer, "down_proj", e), scheme) for e in experts
        )

    def _expert(self, e: int, x: Tensor) -> Tensor:
        bank = self.bank
        h = self.up[e](x)
        h = bank._apply_gate(h) if bank.has_gate else bank.act_fn(h)
        y = self.down[e](h)
        return bank.post_expert_norm(y) if getattr(bank, "has_post_expert_norm", False) else y

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        n = len(self.up)
        out = torch.zeros(hidden.shape[0], hidden.shape[-1], device=hidden.device)
        if torch.compiler.is_exporting():  # static shapes: every expert on every token
            hit = top_k_index < n  # an expert-parallel sentinel (>= n): no expert here
            dense = torch.zeros(hidden.shape[0], n + 1, device=hidden.device).scatter_add_(
                1, torch.where(hit, top_k_index, n), top_k_weights.float() * hit
            )
            for e in range(n):
                out = out + self._expert(e, hidden).float() * dense[:, e : e + 1]
            return out.to(hidden.dtype)
        k = top_k_index.shape[-1]
        flat, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)
        for e in torch.unique(flat).tolist():
            if e >= n:
                continue
            pos = (flat == e).nonzero().squeeze(1)
            token = pos // k
            y = self._expert(e, hidden[token])
            out.index_add_(0, token, y.float() * weights[pos, None].float())
        return out.to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"{self.layer_type}, scheme={self.scheme_name!r}, {len(self.up)} experts"


class SimulatedExperts(nn.Module):
    """A bank whose expert weights are fake-quantized once (by each expert's output channel)
    and held in the scheme's compute dtype; ``inner`` is the bank itself, only read (it runs as
    a copy: :func:`_bank_copy`)."""

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.layer_type = type(layer).__name__
        self.inner = layer
        self.bank = _bank_copy(layer)
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
    (:func:`_bank_copy`); each call dequantizes the expert weights to the compute dtype."""

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        spec = scheme.weight
        self.compute_dtype = TORCH_DTYPES[scheme.compute_dtype]
        weights = expert_weights(layer)
        self.names = list(weights)
        self.inner = _bank_copy(layer, own=True)
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
    "ExpertLinears",
    "QuantizedExperts",
    "SimulatedExperts",
    "follows_expert_interface",
]
