"""How much of a model the quantizable layers reach, and what they leave out (and why)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mpsearch._validation import check_module
from mpsearch.layers._layers import enclosing_layer, is_quantizable, unsupported_form

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
_NORM_TYPES += (nn.modules.batchnorm._NormBase,)

_REASONS: list[tuple[Callable[[nn.Module], bool], str]] = [
    (lambda m: isinstance(m, nn.RNNBase), "only LSTM and GRU are quantizable (tanh/ReLU RNN)"),
    (
        lambda m: isinstance(m, nn.RNNCellBase),
        "only LSTM and GRU cells are quantizable (tanh/ReLU RNN cell)",
    ),
    (lambda m: isinstance(m, nn.EmbeddingBag), "EmbeddingBag: no quantized bag kernel yet"),
    (
        lambda m: isinstance(m, nn.MultiheadAttention),
        "in_proj_weight is a bare parameter read by F.multi_head_attention_forward, not a "
        "layer: mpsearch.split_attention(model) makes it three Linear layers",
    ),
    (
        lambda m: isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower(),
        "norm/bias: kept in full precision",
    ),
]
"""(recognise, reason) for modules whose parameters no quantizable layer holds; first match."""


@dataclass(frozen=True)
class LeftOut:
    """One module holding parameters that stay in full precision, each counted once.

    ``tied_to`` names the quantizable layers sharing one of them (a tied embedding and
    ``lm_head``): quantizing those layers gives them their own copy and leaves this one.
    """

    module: str
    type: str
    params: int
    reason: str
    tied_to: tuple[str, ...] = ()

    def describe(self) -> str:
        tied = f", tied to {', '.join(dict.fromkeys(self.tied_to))}" if self.tied_to else ""
        return f"{self.module} ({self.type}, {self.params:,}{tied}: {self.reason})"


@dataclass(frozen=True)
class Coverage:
    """Share of a model's parameters held by its quantizable layers only (a weight tied to a
    module that stays in full precision is left out), and what is left out."""

    covered_params: int
    total_params: int
    layers: list[str]
    left_out: list[LeftOut]

    @property
    def share(self) -> float:
        """Covered parameters / all parameters (each tied parameter once)."""
        return self.covered_params / self.total_params if self.total_params else 1.0

    def summary(self) -> str:
        """One line: the share covered and the largest parts left out.

        >>> print(coverage(nn.Sequential(nn.RNN(4, 8), nn.Linear(8, 2))).summary())
        quantizable layers cover 13.8% of the parameters (18 of 130); left out: 0 (RNN, 112: only LSTM and GRU are quantizable (tanh/ReLU RNN))
        """
        line = (
            f"quantizable layers cover {self.share:.1%} of the parameters "
            f"({self.covered_params:,} of {self.total_params:,})"
        )
        biggest = sorted(self.left_out, key=lambda e: -e.params)[:3]
        if biggest:
            parts = [e.describe() for e in biggest]
            more = len(self.left_out) - len(biggest)
            line += "; left out: " + ", ".join(parts) + (f" and {more} more" if more else "")
        return line


def coverage(model: nn.Module) -> Coverage:
    """Which of ``model``'s parameters the quantizable layers hold, and which modules they
    leave out with the reason (norms, a plain RNN, bare parameters...). The biases of a
    quantizable layer (an LSTM's included) count as covered: they stay with it.

    >>> cov = coverage(nn.Sequential(nn.LSTM(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
    >>> cov.layers, [(e.module, e.type, e.params) for e in cov.left_out]
    (['0', '2'], [('1', 'LayerNorm', 16)])
    """
    check_module(model)
    layers = [name for name, m in model.named_modules() if name and is_quantizable(m)]
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    sizes: dict[int, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        outer = enclosing_layer(name, layers)  # a weight-normed layer's parametrizations
        holder = (outer, model.get_submodule(outer)) if outer else (name, module)
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(holder)
            sizes[id(param)] = param.numel()
    covered = 0
    left: dict[str, tuple[nn.Module, list[int], list[str]]] = {}  # name: module, params, tied
    for key, holders in owners.items():
        quantizable = [n for n, m in holders if is_quantizable(m)]
        others = [(n, m) for n, m in holders if not is_quantizable(m)]
        if not others:
            covered += sizes[key]
            continue
        name, module = others[0]  # a tied copy stays here even when the layers are quantized
        entry = left.setdefault(name, (module, [], []))
        entry[1].append(sizes[key])
        entry[2].extend(quantizable)
    left_out = [
        LeftOut(name or "(model)", type(m).__name__, sum(params), _reason(m), tuple(tied))
        for name, (m, params, tied) in left.items()
    ]
    return Coverage(covered, sum(sizes.values()), layers, left_out)


def _reason(module: nn.Module) -> str:
    why = unsupported_form(module)
    if why:
        return why
    for recognise, reason in _REASONS:
        if recognise(module):
            return reason
    if any(True for _ in module.children()):
        return "bare parameter (not a layer)"
    return "not a quantizable layer type (mpsearch.layers.register_quantizable_type adds one)"


__all__ = ["Coverage", "LeftOut", "coverage"]
