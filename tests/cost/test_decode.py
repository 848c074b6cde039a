"""Batch-1 decoding time: prefill and per-token steps with the model's own KV cache."""

from __future__ import annotations

import pytest
import torch

import mpsearch as mps
from mpsearch.cost import measure_decode

transformers = pytest.importorskip("transformers")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_decode_is_the_models_greedy_generation_and_is_timed() -> None:
    model = _llama()
    prompt = torch.tensor([[5, 17, 42, 8]])
    t = measure_decode(model, prompt, new_tokens=12, repeats=2)
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert t.tokens == expected[0, 4:].tolist()
    assert (
        t.prefill_ms > 0 and t.decode_ms > 0 and t.tokens_per_s == pytest.approx(1000 / t.decode_ms)
    )


def test_a_quantized_plan_decodes_on_the_cpu_kernels() -> None:
    model = _llama()
    qm = mps.quantize(model, "w8a16", backend="cpu")
    t = measure_decode(qm, torch.tensor([[1, 2, 3]]), new_tokens=6, repeats=1)
    assert len(t.tokens) == 6 and t.decode_ms > 0


def test_decode_refuses_what_it_cannot_time() -> None:
    model = _llama()
    with pytest.raises(
        ValueError, match="'input_ids' argument must be a LongTensor of shape \\[1, T\\]"
    ):
        measure_decode(model, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="'new_tokens'"):
        measure_decode(model, torch.tensor([[1, 2]]), new_tokens=0)

    class NoCache(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
            return torch.nn.functional.one_hot(input_ids, 8).float()

    with pytest.raises(ValueError, match="forward takes a KV cache"):
        measure_decode(NoCache(), torch.tensor([[1, 2]]))
