from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch.cost import held_bytes
from mpsearch.layers import coverage, quantizable_layers, split_attention
from mpsearch.layers._attention import SplitAttention
from mpsearch.workloads import load_workload

E, H, L, S, N = 16, 4, 5, 7, 3


def _inputs(batch_first: bool, kdim: int, vdim: int) -> tuple[torch.Tensor, ...]:
    def make(seq: int, dim: int) -> torch.Tensor:
        return torch.randn(N, seq, dim) if batch_first else torch.randn(seq, N, dim)

    return make(L, E), make(S, kdim), make(S, vdim)


def _masks() -> list[dict[str, torch.Tensor]]:
    padding = torch.rand(N, S) > 0.7
    padding[:, 0] = False  # no query sees only padding
    blocked = torch.rand(L, S) > 0.8
    blocked[:, 0] = False
    additive = torch.randn(N * H, L, S)
    return [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": blocked},
        {"attn_mask": additive},
        {"key_padding_mask": padding, "attn_mask": blocked},
        {"key_padding_mask": padding.float() * -1e9, "attn_mask": additive},
    ]


def _assert_same(expected: tuple, got: tuple) -> None:
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("batch_first", "bias", "bias_kv", "zero_attn", "dims"),
    [
        (False, True, False, False, None),
        (True, True, False, False, None),
        (True, False, True, False, None),
        (False, True, False, True, (8, 12)),
        (True, True, True, True, (8, 12)),
    ],
)
def test_split_attention_equals_multihead_attention(
    batch_first, bias, bias_kv, zero_attn, dims
) -> None:
    """Every mask, weights returned or not, averaged or per head, as ``nn.MultiheadAttention``
    itself computes them (SDPA without weights, softmax with)."""
    torch.manual_seed(0)
    kdim, vdim = dims or (E, E)
    mha = nn.MultiheadAttention(
        E,
        H,
        bias=bias,
        add_bias_kv=bias_kv,
        add_zero_attn=zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
    ).eval()
    split = SplitAttention(mha).eval()
    q, k, v = _inputs(batch_first, kdim, vdim)
    for masks, need, average in itertools.product(_masks(), (True, False), (True, False)):
        with torch.no_grad():
            kwargs = {"need_weights": need, "average_attn_weights": average, **masks}
            _assert_same(mha(q, k, v, **kwargs), split(q, k, v, **kwargs))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_split_self_attention_unbatched_and_causal(batch_first, need_weights) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    split = split_attention(mha)  # the model itself an attention module
    assert isinstance(split, SplitAttention) and not split.training
    x = _inputs(batch_first, E, E)[0]
    one = x[0] if batch_first else x[:, 0]
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        for args, kwargs in (
            ((x, x, x), {}),  # the fused path of nn.MultiheadAttention
            ((one, one, one), {}),
            ((x, x, x), {"attn_mask": causal, "is_causal": True}),
        ):
            kwargs["need_weights"] = need_weights
            _assert_same(mha(*args, **kwargs), split(*args, **kwargs))
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        split(x, x, x, is_causal=True)


def test_split_transformer_takes_the_unfused_path_and_keeps_its_outputs() -> None:
    """``nn.TransformerEncoder``'s fused and nested-tensor paths read the packed weight: the
    split model runs the layers' own path, equal outside the padded positions."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    split = split_attention(encoder).eval()
    assert isinstance(encoder.layers[0].self_attn, nn.MultiheadAttention)  # not changed
    assert not split.use_nested_tensor
    x = torch.randn(3, 6, E)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested-tensor prototype notice
        torch.testing.assert_close(split(x), encoder(x), atol=1e-5, rtol=1e-4)
        kept = ~padding
        torch.testing.assert_close(
            split(x, src_key_padding_mask=padding)[kept],
            encoder(x, src_key_padding_mask=padding)[kept],
            atol=1e-5,
            rtol=1e-4,
        )
    names = [n for n in quantizable_layers(split) if n.startswith("layers.0.")]
    assert names[:4] == [f"layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]


def test_split_attention_net_is_covered_profiled_and_quantized() -> None:
    """attention_net's in-projection (a bare 192 x 64 parameter) joins the plan: coverage
    goes to 1, the profile ranks each projection, and w8a8 holds the bytes the cost model
    prices."""
    wl = load_workload("attention_net")
    split = split_attention(wl.model)
    assert coverage(wl.model).share < 0.4 and coverage(split).share == 1.0
    x = wl.calib[0]
    with torch.no_grad():
        torch.testing.assert_close(split(x), wl.model(x), atol=1e-5, rtol=1e-4)
    prof = mps.profile(split, wl.calib[:2], schemes=["w8a8"], progress=False)
    assert set(prof.table["layer"]) >= {f"attn.{p}_proj" for p in ("q", "k", "v", "out")}
    assert set(prof.table["status"]) == {"ok"}
    cost = mps.measure_cost(split, x, schemes=["fp32", "w8a8"], backend="cpu", repeats=1)
    plan = mps.PrecisionPlan({}, default="w8a8")
    quantized = mps.quantize(split, plan, backend="cpu")
    assert cost.memory_bytes(plan) == held_bytes(quantized)
    assert held_bytes(quantized) < 0.3 * held_bytes(wl.model)
    with torch.no_grad():
        agree = (quantized(x).argmax(-1) == split(x).argmax(-1)).float().mean()
    assert agree > 0.9


def test_a_model_without_attention_gets_an_unchanged_copy_and_a_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="holds no nn.MultiheadAttention"):
        copied = split_attention(model)
    assert copied is not model and torch.equal(copied[0].weight, model[0].weight)
