from __future__ import annotations

import pytest
from torch import nn

from mpsearch.layers import coverage, quantizable_layers
from mpsearch.workloads import load_workload
from mpsearch.workloads._zoo import zoo_available


def test_speaker_encoder_names_the_lstm_and_covers_only_the_linear() -> None:
    model = load_workload("speaker_lstm").model
    cov = coverage(model)
    linear = sum(p.numel() for p in model.proj.parameters())
    lstm = sum(p.numel() for p in model.lstm.parameters())
    assert cov.layers == ["proj"]
    assert (cov.covered_params, cov.total_params) == (linear, linear + lstm)
    assert cov.share == pytest.approx(8256 / 359488)
    assert [(e.module, e.type, e.params, e.reason) for e in cov.left_out] == [
        ("lstm", "LSTM", 351232, "no per-gate kernel yet")
    ]
    assert cov.summary().startswith(
        "quantizable layers cover 2.3% of the parameters (8,256 of 359,488); "
        "left out: lstm (LSTM, 351,232: no per-gate kernel yet)"
    )


def test_attention_in_proj_is_left_out_with_its_reason() -> None:
    cov = coverage(load_workload("attention_net").model)
    assert cov.layers == ["patch", "attn.out_proj", "head"]
    (attn,) = cov.left_out
    assert (attn.module, attn.params) == ("attn", 64 * 192 + 192)
    assert "in_proj_weight is a bare parameter" in attn.reason


def test_tied_embedding_is_left_out_and_names_the_layer_it_is_tied_to() -> None:
    emb, head, norm = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.LayerNorm(4)
    head.weight = emb.weight
    cov = coverage(nn.ModuleDict({"emb": emb, "norm": norm, "head": head}))
    assert cov.layers == ["head"] and cov.covered_params == 0 and cov.total_params == 48
    by_name = {e.module: e for e in cov.left_out}
    assert by_name["emb"].params == 40 and by_name["emb"].tied_to == ("head",)
    assert by_name["norm"].reason == "norm/bias: kept in full precision"
    assert "emb (Embedding, 40, tied to head: weight-only not supported yet)" in cov.summary()


def test_coverage_refuses_a_non_module() -> None:
    with pytest.raises(TypeError, match="'model' argument"):
        coverage("gpt2")


@pytest.mark.skipif(not zoo_available("hf_gpt2"), reason="needs transformers")
def test_gpt2_conv1d_projections_are_quantizable() -> None:
    model = load_workload("hf_gpt2").model
    layers = quantizable_layers(model)
    conv1d = [n for n, m in layers.items() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and "transformer.h.0.attn.c_attn" in conv1d
    cov = coverage(model)
    assert cov.left_out[0].module == "transformer.wte" and cov.left_out[0].tied_to == ("lm_head",)
    assert cov.covered_params == sum(p.numel() for n in conv1d for p in layers[n].parameters())
