"""One-query attention for compiled decoding: equal to torch's own attention, used only while
Dynamo traces, and only inside ``decoding_attention``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from mpsearch.cost._attention import decoding_attention, one_query_attention

transformers = pytest.importorskip("transformers")


def _qkv(heads: int, kv: int, length: int, dtype: torch.dtype = torch.float32, d_v: int = 16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 1, 16, generator=g)
    k = torch.randn(2, kv, length, 16, generator=g)
    v = torch.randn(2, kv, length, d_v, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa(q, k, v, mask, scale=None):
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True, scale=scale
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool per head", "additive"])
def test_one_query_attention_equals_torchs_attention(kv: int, mask_kind: str) -> None:
    q, k, v = _qkv(4, kv, 10)
    mask = {
        "none": None,
        "bool": torch.arange(10).expand(2, 1, 1, 10) < torch.tensor([7, 10]).view(2, 1, 1, 1),
        "bool per head": torch.rand(2, 4, 1, 10, generator=torch.Generator().manual_seed(1)) > 0.3,
        "additive": torch.randn(1, 1, 1, 10),
    }[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # every head attends to something
    got = one_query_attention(q, k, v, mask, None)
    torch.testing.assert_close(got, _sdpa(q, k, v, mask), atol=1e-6, rtol=1e-5)
    scaled = one_query_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(scaled, _sdpa(q, k, v, mask, scale=0.3), atol=1e-6, rtol=1e-5)


def test_one_query_attention_keeps_the_dtype_and_the_value_width() -> None:
    q, k, v = _qkv(4, 2, 9, torch.bfloat16, d_v=8)  # values narrower than keys, as in MLA
    got = one_query_attention(q, k, v, None, None)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 1, 4, 8)
    torch.testing.assert_close(got, _sdpa(q, k, v, None).to(torch.bfloat16))


def test_eager_calls_inside_the_switch_run_transformers_own_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    model, ids = tiny_llama(num_hidden_layers=1), torch.tensor([[3, 9, 4]])
    original = AttentionInterface._global_mapping["sdpa"]
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with decoding_attention():
            assert AttentionInterface._global_mapping["sdpa"] is not original
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert AttentionInterface._global_mapping["sdpa"] is original


def _traced_step_ops(model: torch.nn.Module, switch: bool) -> tuple[set[object], torch.Tensor]:
    """The operations of the graph Dynamo captures for one token after a 3-token prompt."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=8)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, _: list[torch.Tensor]):
        graphs.append(gm)
        return gm.forward

    with torch.inference_mode():
        model(input_ids=torch.tensor([[3, 9, 4]]), cache=cache, use_cache=True)
        step = torch.compile(lambda **kw: model(**kw).logits, backend=backend, dynamic=False)
        kwargs = {"input_ids": torch.tensor([[7]]), "cache": cache, "use_cache": True}
        if switch:
            with decoding_attention():
                got = step(**kwargs)
        else:
            got = step(**kwargs)
    torch._dynamo.reset()
    return {node.target for gm in graphs for node in gm.graph.nodes}, got


def test_a_traced_one_token_step_has_no_attention_kernel_inside_the_switch() -> None:
    model = tiny_llama(num_hidden_layers=1)
    plain, want = _traced_step_ops(model, switch=False)
    switched, got = _traced_step_ops(model, switch=True)
    assert F.scaled_dot_product_attention in plain
    assert F.scaled_dot_product_attention not in switched
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
