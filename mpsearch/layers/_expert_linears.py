"""A Mixture-of-Experts bank of Hugging Face's generic expert interface as its experts' Linear
layers (:class:`ExpertLinears`), routed as the interface's eager forward: what a backend runs on
its Linear kernels, and where calibrated rounding reads each expert's inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mpsearch.layers._experts import expert_weights
from mpsearch.layers._layers import stand_in_tensor
from mpsearch.schemes import Scheme, get_scheme

ExpertRanges = Mapping[str, tuple[float, float]]
"""Static activation ranges of a bank's expert Linear layers by their names in
:class:`ExpertLinears` (``"up.0"``, ``"down.3"``)."""

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


def expert_linear(layer: nn.Module, name: str, e: int) -> nn.Linear:
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


def bank_copy(layer: nn.Module, *, own: bool = False, biases: bool = True) -> nn.Module:
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
    Under ``torch.compile`` and ``torch.export`` every expert runs on every token, weighted by
    the routing (zero where not routed): the same sums, ``experts / top_k`` times the work, in
    one graph of static shapes (the eager loop over the experts its tokens picked reads the
    routing's values, which needs a graph per routing); the rows of tokens not routed to an
    expert are zeroed at its projections' inputs, so an activation range measured per call
    spans the routed tokens alone, as in eager. Compiled batch-1 decoding of the
    zoo's Mixtral (A, 1 thread, ``benchmarks/bench_experts.py``) then ran a w4a16 token about
    4x faster than eager and 1.7x faster than the compiled fp32 model; a decoder keeps
    whichever runs faster.
    ``act_range``: static activation ranges of expert Linear layers by their names here
    (``"up.0"``, ``"down.3"``: :func:`recording`); the others measure theirs on each call.
    ``bank`` is the bank's copy without its tensors, for its gate, activation and norm."""

    def __init__(
        self,
        layer: nn.Module,
        scheme: Scheme,
        build: Any,
        *,
        act_range: ExpertRanges | None = None,
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.layer_type = type(layer).__name__
        self.bank = bank_copy(layer, biases=False)
        ranges = act_range or {}

        def built(name: str, weight: str, e: int) -> nn.Module:
            linear = expert_linear(layer, weight, e)
            found = ranges.get(f"{name}.{e}")  # a static range observed for this expert
            return (
                build(linear, scheme) if found is None else build(linear, scheme, act_range=found)
            )

        up = "gate_up_proj" if layer.has_gate else "up_proj"
        experts = range(int(layer.num_experts))
        self.up = nn.ModuleList(built("up", up, e) for e in experts)
        self.down = nn.ModuleList(built("down", "down_proj", e) for e in experts)

    def _expert(self, e: int, x: Tensor, routed: Tensor | None = None) -> Tensor:
        """Expert ``e`` on ``x``; with ``routed`` (a column of booleans), the rows of other
        tokens are zeros at both projections' inputs: a range measured per call then holds the
        routed tokens' values and zero (which every range holds), as on the routed rows alone."""
        bank = self.bank
        h = self.up[e](x if routed is None else x * routed)
        h = bank._apply_gate(h) if bank.has_gate else bank.act_fn(h)
        y = self.down[e](h if routed is None else h * routed)
        return bank.post_expert_norm(y) if getattr(bank, "has_post_expert_norm", False) else y

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        n = len(self.up)
        out = torch.zeros(hidden.shape[0], hidden.shape[-1], device=hidden.device)
        if torch.compiler.is_compiling():  # one graph: every expert on every token
            hit = top_k_index < n  # an expert-parallel sentinel (>= n): no expert here
            dense = torch.zeros(hidden.shape[0], n + 1, device=hidden.device).scatter_add_(
                1, torch.where(hit, top_k_index, n), top_k_weights.float() * hit
            )
            for e in range(n):
                routed = (top_k_index == e).any(dim=-1, keepdim=True)
                out = out + self._expert(e, hidden, routed).float() * dense[:, e : e + 1]
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


def recording(bank: nn.Module, record: Callable[[str, Tensor], None]) -> ExpertLinears:
    """``bank`` run as its float32 expert Linear layers (the interface's routing), each passing
    its input to ``record(name, x)`` first (``name``: ``"up.<e>"`` or ``"down.<e>"``, as in
    :class:`ExpertLinears`): what each expert's tokens give each projection, for statistics
    and activation ranges."""
    linears = ExpertLinears(bank, get_scheme("fp32"), lambda linear, _: linear)
    for part in ("up", "down"):
        for e, linear in enumerate(getattr(linears, part)):
            name = f"{part}.{e}"
            linear.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
    return linears
