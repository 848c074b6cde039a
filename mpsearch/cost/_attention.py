"""Attention of one new token over a static KV cache, as operations Inductor compiles into
the decoding step (for ``KVDecoder(compile="max-autotune")``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn


def one_query_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None
) -> Tensor:
    """Softmax attention of one query position, ``query`` ``[b, h, 1, d]``, over ``key`` and
    ``value`` ``[b, kv, L, d]`` (``h`` a multiple of ``kv``: grouped heads read each cached
    head once), ``mask`` boolean (``True``: attend) or additive, ``[b|1, 1|h, 1, L]``;
    ``[b, 1, h, d_v]`` (Hugging Face's layout after attention), in float32 inside.

    >>> q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    >>> torch.allclose(one_query_attention(q, k, v, None, None), ref.transpose(1, 2), atol=1e-6)
    True
    """
    b, h, _, d = query.shape
    kv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    # scores as a reduction along the cached rows: a matrix product first copied the whole
    # cache into a transposed, packed layout (6 x 20 us a token on stdlib_lm)
    q = query.float().reshape(b, kv, h // kv, 1, d)
    scores = (q * key.float()[:, :, None]).sum(-1) * scale
    if mask is not None:
        heads = (1, 1) if mask.shape[1] == 1 else (kv, h // kv)
        m = mask.reshape(mask.shape[0], *heads, mask.shape[-1])
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    out = scores.softmax(-1) @ value.float()  # [b, kv, h / kv, d_v]
    return out.to(query.dtype).reshape(b, 1, h, value.shape[-1])


def _decoding_sdpa(original: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``sdpa`` attention function, with one query position compiled as
    :func:`one_query_attention` while Dynamo traces (everything else: ``original``)."""

    @functools.wraps(original)
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        plain = (
            torch.compiler.is_compiling()
            and query.shape[2] == 1
            and not dropout
            and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None
            and query.shape[1] % key.shape[1] == 0
        )
        if not plain:
            return original(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return one_query_attention(query, key, value, attention_mask, scaling), None

    return attention


def decoding_attention() -> AbstractContextManager[Any]:
    """While entered, transformers' models that use its ``sdpa`` attention run one query
    position through :func:`one_query_attention` when Dynamo traces them. Inductor fuses it
    with the step; ``scaled_dot_product_attention``'s CPU kernel costs about 20-35 us a call
    at one query (stdlib_lm, 1 thread: 0.2 ms of a 1.2 ms int8 step). Without transformers,
    nothing changes."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return nullcontext()
    mapping = AttentionInterface._global_mapping
    if "sdpa" not in mapping:
        return nullcontext()
    return mock.patch.dict(mapping, {"sdpa": _decoding_sdpa(mapping["sdpa"])})
