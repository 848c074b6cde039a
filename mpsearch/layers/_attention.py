"""``nn.MultiheadAttention`` with its in-projection as Linear layers (:func:`split_attention`).

``nn.MultiheadAttention`` keeps its query/key/value projection as one bare parameter
(``in_proj_weight``) that ``F.multi_head_attention_forward`` reads: no layer holds it, so a
plan cannot quantize it (a quarter of a ViT's weights). :class:`SplitAttention` computes the
same attention with the projection as three ``nn.Linear`` layers, ``q_proj``, ``k_proj`` and
``v_proj``, and ``out_proj`` called as a Linear: every projection is a layer a plan names.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch._validation import check_module


class SplitAttention(nn.Module):
    """``mha``'s attention with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as Linear
    layers (copies of its weights): same arguments, same outputs as ``mha`` to float rounding.

    ``_qkv_same_embed_dim`` is ``False`` and ``in_proj_weight`` ``None``, so the fused paths of
    ``nn.TransformerEncoderLayer`` (which read the packed weight) are not taken.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.kdim, self.vdim, self.batch_first = mha.kdim, mha.vdim, mha.batch_first
        self.dropout, self.add_zero_attn = mha.dropout, mha.add_zero_attn
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = None
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bias = mha.in_proj_bias
        biases = (None,) * 3 if bias is None else bias.detach().chunk(3)
        self.q_proj, self.k_proj, self.v_proj = (
            _linear(w, b) for w, b in zip(weights, biases, strict=True)
        )
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward`` (``F.multi_head_attention_forward``'s steps)."""
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        dense: dict[int, Tensor] = {}  # each input made contiguous once, not by each Linear
        for x in (query, key, value):
            if id(x) not in dense:
                dense[id(x)] = x.contiguous()
        q = self.q_proj(dense[id(query)])
        k, v = self.k_proj(dense[id(key)]), self.v_proj(dense[id(value)])
        if self.batch_first and batched:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        if not batched:
            q, k, v = (x.unsqueeze(1) for x in (q, k, v))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = q.shape
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA takes the causal hint itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=q.dtype,
                check_other=False,
            )
            is_causal = is_causal and key_padding_mask is None
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
        heads = bsz * self.num_heads
        q = q.reshape(tgt_len, heads, self.head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], heads, self.head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], heads, self.head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = k.new_zeros(heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
        src_len = k.shape[1]
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, self.num_heads, -1, -1)
            padding = padding.reshape(heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q * math.sqrt(1.0 / self.head_dim) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = scores.softmax(dim=-1)
            weights = F.dropout(weights, p=dropout) if dropout else weights
            out = (weights @ v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
            weights = weights.view(bsz, self.num_heads, tgt_len, src_len)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            if attn_mask is not None:
                if attn_mask.shape[0] == 1:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, self.num_heads, -1, src_len)
            shape = (bsz, self.num_heads, -1, self.head_dim)
            out = F.scaled_dot_product_attention(
                q.view(shape), k.view(shape), v.view(shape), attn_mask, dropout, is_causal
            )
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)
            weights = None
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``."""
    layer = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _pad(mask: Tensor | None) -> Tensor | None:
    """``mask`` with one more key (the bias key or the zero key), not masked."""
    return None if mask is None else F.pad(mask, (0, 1))


def split_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each ``nn.MultiheadAttention`` a :class:`SplitAttention`:
    its projections become layers (``<name>.q_proj``, ``.k_proj``, ``.v_proj``, ``.out_proj``)
    that profile, search and quantize see. ``model`` itself is not changed; a model without
    one gets an unchanged copy and a warning.

    Outputs equal ``model``'s to float rounding, except at the padded positions of an
    ``nn.TransformerEncoder`` given a ``src_key_padding_mask`` (its nested-tensor path, which
    wrote zeros there, needs the packed weight: it is turned off).

    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 1)
    >>> [n for n, m in split_attention(enc).named_modules() if isinstance(m, nn.Linear)][:3]
    ['layers.0.self_attn.q_proj', 'layers.0.self_attn.k_proj', 'layers.0.self_attn.v_proj']
    """
    check_module(model)
    work = copy.deepcopy(model)
    found = [n for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not found:
        warnings.warn(
            f"split_attention: {type(model).__name__} holds no nn.MultiheadAttention; "
            "the copy is unchanged.",
            stacklevel=2,
        )
    for name in found:
        mha = work.get_submodule(name)
        split = SplitAttention(mha).train(mha.training)
        if name:
            work.set_submodule(name, split)
        else:
            work = split
    for module in work.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return work
