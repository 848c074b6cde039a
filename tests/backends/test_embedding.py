"""Embeddings, weight-only: per-row int8, grouped int4 codes; simulate and cpu give the same rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.backends import get_backend, quantize, storage_bytes
from mpsearch.backends._embedding import QuantizedEmbedding, SimulatedEmbedding
from mpsearch.schemes import get_scheme


@pytest.fixture
def emb() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(50, 64, padding_idx=0).eval()


IDS = torch.tensor([[3, 0, 49, 3], [7, 8, 9, 10]])


def _hand_int8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127  # one scale per row (token)
    scale[scale == 0] = 1.0  # the padding row: zeros
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _hand_int4_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    g = w.reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).to(torch.bfloat16).float()  # bf16 scales
    scale[scale == 0] = 1.0  # the padding row: zeros
    zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, 15) - zero) * scale).reshape(w.shape)


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
@torch.no_grad()
def test_int8_rows_equal_the_hand_computation(emb: nn.Embedding, backend: str) -> None:
    q = get_backend(backend).quantize_layer(emb, get_scheme("w8a8"))  # weight-only here
    assert torch.equal(q(IDS), _hand_int8(emb.weight)[IDS])
    assert q(IDS).dtype == torch.float32


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
@torch.no_grad()
def test_int4_grouped_rows_equal_the_hand_computation(emb: nn.Embedding, backend: str) -> None:
    q = get_backend(backend).quantize_layer(emb, get_scheme("w4a16"))
    assert torch.equal(q(IDS), _hand_int4_groups(emb.weight, 32)[IDS])


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", "w4a16_pc", "w2a16", "w4a8", "bf16"])
@torch.no_grad()
def test_cpu_rows_are_the_simulated_rows(emb: nn.Embedding, scheme: str) -> None:
    sim = get_backend("simulate").quantize_layer(emb, get_scheme(scheme))
    cpu = get_backend("cpu").quantize_layer(emb, get_scheme(scheme))
    assert isinstance(sim, SimulatedEmbedding)
    assert torch.equal(cpu(IDS), sim(IDS))


def test_int_tables_store_their_codes_packed(emb: nn.Embedding) -> None:
    cpu = get_backend("cpu")
    int8 = cpu.quantize_layer(emb, get_scheme("w8a8"))
    int4 = cpu.quantize_layer(emb, get_scheme("w4a16"))
    assert isinstance(int8, QuantizedEmbedding)
    assert storage_bytes(int8) == 50 * 64 + 50 * 4  # int8 codes + fp32 scale per row
    assert storage_bytes(int4) == 50 * 32 + 50 * 2 * (2 + 1)  # 2 codes a byte; bf16 scale, zero
    assert storage_bytes(emb) == 50 * 64 * 4


def test_fp8_embedding_is_refused_by_name_on_cpu() -> None:
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 4))
    with pytest.raises(ValueError, match=r"0 \(Embedding\) in 'fp8'"):
        quantize(model, "fp8", backend="cpu")
    assert quantize(model, "fp8", backend="simulate")(torch.tensor([[1, 2]])).shape == (1, 2, 4)
