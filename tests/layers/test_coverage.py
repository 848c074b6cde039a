from __future__ import annotations

import pytest
import torch
from helpers import StandardizedConv
from torch import nn

from mpsearch.layers import coverage, is_quantizable, quantizable_layers
from mpsearch.workloads import load_workload
from mpsearch.workloads._zoo import zoo_available


def test_speaker_encoder_lstm_is_covered() -> None:
    model = load_workload("speaker_lstm").model
    cov = coverage(model)
    assert cov.layers == ["lstm", "proj"]
    assert (cov.covered_params, cov.total_params) == (359488, 359488)
    assert cov.share == 1.0 and cov.left_out == []


def test_plain_rnn_and_lstm_with_projection_are_left_out_with_their_reason() -> None:
    model = nn.ModuleDict({"rnn": nn.RNN(4, 8), "proj": nn.LSTM(4, 8, proj_size=2)})
    cov = coverage(model)
    assert cov.layers == [] and cov.covered_params == 0
    reasons = {e.module: e.reason for e in cov.left_out}
    assert reasons == {
        "rnn": "only LSTM and GRU are quantizable (tanh/ReLU RNN)",
        "proj": "an LSTM with proj_size has no quantized kernel",
    }


def test_attention_in_proj_is_left_out_with_its_reason() -> None:
    cov = coverage(load_workload("attention_net").model)
    assert cov.layers == ["patch", "attn.out_proj", "head"]
    (attn,) = cov.left_out
    assert (attn.module, attn.params) == ("attn", 64 * 192 + 192)
    assert "in_proj_weight is a bare parameter" in attn.reason


def test_tied_embedding_is_covered_with_its_head() -> None:
    emb, head, norm = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.LayerNorm(4)
    head.weight = emb.weight
    cov = coverage(nn.ModuleDict({"emb": emb, "norm": norm, "head": head}))
    assert cov.layers == ["emb", "head"] and cov.covered_params == 40 and cov.total_params == 48
    (norm_out,) = cov.left_out
    assert norm_out.reason == "norm/bias: kept in full precision"


def test_coverage_refuses_a_non_module() -> None:
    with pytest.raises(TypeError, match="'model' argument"):
        coverage("gpt2")


@pytest.mark.skipif(not zoo_available("hf_gpt2"), reason="needs transformers")
def test_gpt2_conv1d_projections_are_quantizable() -> None:
    model = load_workload("hf_gpt2").model
    layers = quantizable_layers(model)
    conv1d = [n for n, m in layers.items() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and "transformer.h.0.attn.c_attn" in conv1d
    assert {"transformer.wte", "transformer.wpe"} <= set(layers)  # embeddings (wte tied)
    cov = coverage(model)
    assert cov.share > 0.99
    assert all(e.reason == "norm/bias: kept in full precision" for e in cov.left_out)


class _ScaledEmbedding(nn.Embedding):
    """Gemma's: the lookup times a scale, in the subclass's own forward, through the base's."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 8.0


class _CastingLinear(nn.Linear):
    """timm's ``Linear``: its own forward, the same output as ``nn.Linear``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class _SelfPaddedConv(nn.Conv2d):
    """timm's ``Conv2dSame``: pads its input itself, then convolves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias)


def test_a_subclass_whose_forward_computes_something_else_is_left_out_with_the_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        _ScaledEmbedding(64, 16),
        _CastingLinear(16, 16),
        StandardizedConv(16, 8, 3),
        _SelfPaddedConv(8, 8, 2),
        nn.Linear(8, 4),
    )
    # Gemma's calls its base's forward on its one input: quantized with its own forward kept;
    # the standardized conv only transforms its weight: folded (effective_form)
    assert [is_quantizable(m) for m in model] == [True, True, True, False, True]
    assert list(quantizable_layers(model)) == ["0", "1", "2", "4"]
    summary = coverage(model).summary()
    assert "0 (_ScaledEmbedding" not in summary and "3 (_SelfPaddedConv" in summary
    assert "a subclass whose own forward computes something else" in summary
    plain = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 4))
    assert list(quantizable_layers(plain)) == ["0", "1"]


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_a_weight_standardized_conv_is_folded_and_quantized(backend: str) -> None:
    """timm's StdConv2d (BiT, NFNet): 0.1% of resnetv2_50x1_bit and nf_resnet26 was
    quantizable; the standardized weight is folded into a plain convolution (as a BatchNorm
    is), exactly, and quantized."""
    from mpsearch.backends import quantize
    from mpsearch.cost import held_bytes, measure_cost
    from mpsearch.layers._layers import effective_form, standard_form

    torch.manual_seed(0)
    model = nn.Sequential(StandardizedConv(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    folded = effective_form(model[0])
    assert type(folded) is nn.Conv2d and standard_form(model[0]) is folded
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model[0](x), rtol=0, atol=0)
        assert torch.equal(quantize(model, "fp32", backend=backend)(x), model(x))
        cost = measure_cost(model, x, schemes=["w8a8"], backend=backend, repeats=1)
        q = quantize(model, "w8a8", backend=cost.backend)
        assert (q(x) - model(x)).norm() < 0.05 * model(x).norm()
        assert cost.memory_bytes("w8a8") == held_bytes(q)
        model[0].weight.mul_(2.0)  # trained further: folded again, not from a stale copy
        torch.testing.assert_close(effective_form(model[0])(x), model[0](x), rtol=0, atol=0)


def test_a_scripted_submodule_is_scanned_like_any_other() -> None:
    """A ``torch.jit.script``-ed submodule (its parameters are no dict) is left out with a
    reason; the scan of the layers around it does not fail."""
    model = nn.Sequential(nn.Linear(8, 8), torch.jit.script(nn.Linear(8, 8)), nn.GELU())
    assert list(quantizable_layers(model)) == ["0"]
    assert coverage(model).share == 0.5
