"""Hugging Face architectures beyond the zoo, random-initialised from configs, through profile ->
measure_cost (cpu) -> search -> quantize (cpu) with exact memory: each one is here for a way
its code uses a layer other than calling it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import mpsearch as mps
from mpsearch._data import output_tensor, run_model
from mpsearch.cost import held_bytes
from mpsearch.layers import coverage
from mpsearch.layers._layers import NEVER_CALLED
from mpsearch.schemes._rounding import split_choice

transformers = pytest.importorskip("transformers")
runner_module = importlib.import_module("mpsearch.profile._runner")

VOCAB = 256


def _tokens(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, VOCAB, (n, 16), generator=g)}


def _images(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


def _audio(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(n, 2000, generator=g)}


SMALL = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": VOCAB}
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any], Callable[..., Any], str]] = {
    # ViTEmbeddings casts pixels to the patch projection's weight dtype
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        {**SMALL, "intermediate_size": 128, "image_size": 32, "patch_size": 8, "num_labels": 4},
        _images,
        "",
    ),
    # T5EncoderModel: 'shared' is a tied copy of encoder.embed_tokens the model never calls
    "t5_encoder": (
        "T5Config",
        "T5EncoderModel",
        {
            "d_model": 64,
            "d_ff": 128,
            "num_layers": 1,
            "num_heads": 4,
            "d_kv": 16,
            "vocab_size": VOCAB,
        },
        _tokens,
        "shared",
    ),
    # Mamba reads dt_proj's weight in a matmul and conv1d's through its own path
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        {"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": VOCAB, "state_size": 8},
        _tokens,
        "backbone.layers.0.mixer.dt_proj",
    ),
    # Gemma's scaled embedding: an nn.Embedding subclass whose forward calls the base's
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        {**SMALL, "intermediate_size": 128, "num_key_value_heads": 1, "head_dim": 16},
        _tokens,
        "",
    ),
    # OPT: torch.ones(batch, length) on traced sizes, a positional embedding fed the mask
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {**SMALL, "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 32},
        _tokens,
        "",
    ),
    # BLOOM: torch.finfo(x.dtype) in its attention mask
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"hidden_size": 64, "n_layer": 1, "n_head": 4, "vocab_size": VOCAB},
        _tokens,
        "",
    ),
    # wav2vec2: a weight-normed positional convolution (parametrized tensors)
    "wav2vec2": (
        "Wav2Vec2Config",
        "Wav2Vec2ForSequenceClassification",
        {
            **SMALL,
            "intermediate_size": 128,
            "conv_dim": (16, 16),
            "conv_stride": (5, 4),
            "conv_kernel": (10, 4),
            "num_conv_pos_embeddings": 8,
            "num_conv_pos_embedding_groups": 4,
            "num_labels": 3,
        },
        _audio,
        "",
    ),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_runs_the_pipeline_with_exact_memory(name: str) -> None:
    config_name, model_name, config, make, never_called = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()
    g = torch.Generator().manual_seed(0)
    calib, test = [make(4, g) for _ in range(3)], make(8, g)
    with torch.inference_mode():
        ref = output_tensor(run_model(model, test)).argmax(-1)

    def agreement(m: torch.nn.Module) -> float:
        with torch.inference_mode():
            return float((output_tensor(run_model(m, test)).argmax(-1) == ref).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = mps.profile(model, calib, schemes=["bf16", "w8a8"], progress=False)
        cost = mps.measure_cost(
            model, calib[0], schemes=["bf16", "w8a8"], backend="cpu", repeats=1, warmup=0
        )
        res = mps.search(model, profile=prof, cost=cost, evaluate=agreement, n_trials=6, seed=0)
    if never_called:
        assert never_called in cost.never_called
        reasons = prof.table.set_index("layer").loc[[never_called], "reason"]
        assert set(reasons) == {NEVER_CALLED}
    if name in ("opt", "bloom", "vit", "gemma", "wav2vec2"):  # code fx(values) traces
        assert prof.info["runner"] == "graph:fx(values)", prof.info["runner_fallbacks"]
    if name == "gemma":  # its scaled embedding is quantized, its own forward kept
        assert "model.embed_tokens" in coverage(model).layers and coverage(model).share > 0.99
    if name == "t5_encoder":  # T5's shared embedding follows its called copy
        assert res.space.followers == {"shared": "encoder.embed_tokens"}
    for plan in (res.best(), *res.plans):
        if never_called:  # the scheme of the called layer holding its weight (T5), else fp32
            chosen = plan.resolve(model)
            leader = res.space.followers.get(never_called)
            expected = "fp32" if leader is None else split_choice(chosen[leader])[0]
            assert chosen[never_called] == expected
        quantized = mps.quantize(model, plan, backend=cost.backend)
        assert cost.memory_bytes(plan) == held_bytes(quantized)
        assert 0.0 <= agreement(quantized) <= 1.0


def test_a_model_returning_a_cache_is_exported_with_the_cache_off(monkeypatch) -> None:
    """Mamba (``use_cache=True`` in its config) returns a cache ``torch.export`` cannot
    output: the export capture calls it with ``use_cache=False`` (the logits do not change)
    and its rows equal the hook runner's, which runs the model as it is."""
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    assert model.config.use_cache
    g = torch.Generator().manual_seed(0)
    calib = [_tokens(4, g) for _ in range(2)]
    kwargs = {"schemes": ["w8a8"], "progress": False, "e2e_samples": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = mps.profile(model, calib, **kwargs)  # 6 hook runner calls: export skipped
        monkeypatch.setattr(runner_module, "EXPORT_MIN_CALLS", 0)
        graph = mps.profile(model, calib, **kwargs)
        monkeypatch.setattr(runner_module, "CAPTURES", {})
        hooks = mps.profile(model, calib, **kwargs)
    assert skipped.info["runner"] == "hooks"
    assert skipped.info["runner_fallbacks"]["graph:export"].startswith("not tried")
    assert graph.info["runner"] == "graph:export", graph.info["runner_fallbacks"]
    assert hooks.info["runner"] == "hooks"
    for metric in ("mse", "e2e"):
        ok = graph.table["status"] == "ok"
        assert ok.sum() > 0
        torch.testing.assert_close(
            torch.tensor(graph.table.loc[ok, metric].to_numpy()),
            torch.tensor(hooks.table.loc[ok, metric].to_numpy()),
            rtol=1e-4,
            atol=1e-10,
        )


@pytest.mark.parametrize("scheme", ["w8a16", "bf16"])
def test_a_uniform_plan_keeps_the_layers_mamba_reads_directly_with_or_without_calib(scheme):
    """Mamba reads ``conv1d``'s and ``dt_proj``'s weights directly. Quantized without
    calibration batches they were replaced, and their bf16 biases met float32 activations;
    they now stay fp32 whichever way, found on the model's own example input, and the cost
    model prices them so (it charged their quantized bytes)."""
    config_name, model_name, config, make, _ = ARCHITECTURES["mamba"]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()
    calib = [make(4, torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = mps.measure_cost(model, calib[0], schemes=[scheme], repeats=1, warmup=0)
    direct = {f"backbone.layers.0.mixer.{n}" for n in ("conv1d", "dt_proj")}
    assert set(cost.read_directly) == direct
    plan = mps.PrecisionPlan.uniform(scheme)
    for given in (None, calib):
        with pytest.warns(UserWarning, match="2 layer"):
            quantized = mps.quantize(model, plan, backend="cpu", calib=given)
        assert cost.memory_bytes(plan) == held_bytes(quantized)
        with torch.inference_mode():
            out = output_tensor(run_model(quantized, calib[0]))
        assert out.dtype == torch.float32 and bool(out.isfinite().all())
