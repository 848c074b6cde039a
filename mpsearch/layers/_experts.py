"""Mixture-of-Experts banks: one module holding every expert's weights as 3-D tensors.

Hugging Face ``transformers`` stores the experts of Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek
and some 70 other families in one module per layer (``MixtralExperts``...): ``gate_up_proj``
``[experts, 2 x intermediate, hidden]`` and ``down_proj`` ``[experts, hidden, intermediate]``
(``[experts, in, out]`` where the class sets ``is_transposed``), called as
``experts(hidden_states, top_k_index, top_k_weights)`` and routing each token to its experts in
its own forward. In Mixtral they hold 3/4 of the parameters.

Such a bank is one quantizable layer (:func:`is_expert_bank`): one scheme for all its experts,
each expert's weight quantized by output channel (:func:`expert_rows`: ``[experts x out, in]``,
groups along ``in``). A bank of Hugging Face's generic expert interface runs as its experts'
Linear layers (:mod:`mpsearch.layers._expert_linears`), each on a backend's Linear kernel for
the scheme; any other bank runs its own forward on its weights dequantized to the scheme's
compute dtype, weight-only (a token's activations are split among the experts inside the
module's own code: ``mpsearch.backends._experts``), so any routing code, activation or expert
implementation of the family runs unchanged. Calibrated rounding reads each expert's inputs
from the first form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")
"""Names of the 3-D expert weights in Hugging Face's expert banks."""


class ExpertBank(nn.Module):
    """The kind of a Mixture-of-Experts bank, recognised by :func:`is_expert_bank` (whatever
    its class): a key for kernel tables, never instantiated."""


def expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own 3-D expert weights (:data:`EXPERT_WEIGHTS`), by name (a scripted
    module's parameters are no dict: looked up by ``in`` and ``[]``)."""
    own = module._parameters
    return {
        name: p
        for name in EXPERT_WEIGHTS
        if name in own and isinstance(p := own[name], torch.Tensor) and p.dim() == 3
    }


def is_expert_bank(module: nn.Module) -> bool:
    """Whether ``module`` is a Mixture-of-Experts bank: it holds 3-D expert weights
    (:data:`EXPERT_WEIGHTS`) as its own parameters, its other own parameters are biases (2-D,
    one row per expert), and it is no standard layer.

    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
    ...         self.down_proj = nn.Parameter(torch.zeros(4, 8, 8))
    >>> is_expert_bank(Experts()), is_expert_bank(nn.Linear(2, 2))
    (True, False)
    """
    weights = expert_weights(module)
    if not weights:
        return False
    others = [p for n, p in module._parameters.items() if n not in weights and p is not None]
    return all(p.dim() == 2 for p in others)


def expert_rows(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An expert weight of ``module`` with one row per (expert, output channel): ``[experts x
    out, in]`` (a copy where the bank stores it transposed).

    >>> class Experts(nn.Module):
    ...     is_transposed = True
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.down_proj = nn.Parameter(torch.zeros(4, 8, 6))  # [experts, in, out]
    >>> bank = Experts()
    >>> expert_rows(bank, bank.down_proj).shape
    torch.Size([24, 8])
    """
    if getattr(module, "is_transposed", False):
        weight = weight.transpose(1, 2)
    return weight.reshape(-1, weight.shape[-1])


def from_expert_rows(module: nn.Module, rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`expert_rows`: rows back in the layout of an expert weight of
    ``shape``."""
    if getattr(module, "is_transposed", False):
        return rows.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    return rows.reshape(tuple(shape))


__all__ = [
    "EXPERT_WEIGHTS",
    "ExpertBank",
    "expert_rows",
    "expert_weights",
    "from_expert_rows",
    "is_expert_bank",
]
