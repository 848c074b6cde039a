"""Helpers shared by tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """The script ``benchmarks/<name>.py`` imported as a module (its folder on ``sys.path``
    meanwhile, for its own imports of ``_tables`` and the other benchmarks)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    ref, out = ref.detach(), out.detach()
    noise = (ref.float() - out.float()).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise))


def conv_net(classes: int = 10) -> nn.Module:
    """A small conv net (seed 0, eval mode) for 8x8 RGB inputs: conv, BatchNorm, ReLU, conv,
    then two Linear layers; layers ``0``, ``3``, ``5`` and ``7`` are quantizable."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    ).eval()


class StandardizedConv(nn.Conv2d):
    """timm's ``StdConv2d``: the weight standardized in forward, then the base's call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class ReadsWeights(nn.Module):
    """Model code that reads layers besides calling them: a dtype check before ``proj`` (as
    Hugging Face ViT and T5 do), ``head``'s weight shape and settings (as CLIP's
    ``weight.shape[0]`` and Whisper's ``num_embeddings``) and ``gate``'s weight used directly,
    never called (as Mamba's ``dt_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(64, 64)
        self.gate = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.to(self.proj.weight.dtype))
        n = min(self.head.weight.shape[0], self.head.out_features)
        return self.head(torch.relu(h @ self.gate.weight.T))[..., :n]


class TiedThroughFunctional(nn.Module):
    """A language model whose output projection is its embedding's weight through
    ``F.linear``: ``embed`` is called and its weight read besides (research code's
    ``logits = h @ self.embed.weight.T``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 32)
        self.mix = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))
        return torch.nn.functional.linear(h, self.embed.weight)


class PackedLSTM(nn.Module):
    """Variable-length sequences through ``pack_padded_sequence`` (speech and text research
    code): an embedding, a bidirectional LSTM on the packed batch, a head on the mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 16)
        self.rnn = nn.LSTM(16, 24, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 4)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        x = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(x)[0], batch_first=True)
        return self.head(out.sum(1) / lengths[:, None].float())


def packed_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of :class:`PackedLSTM`'s inputs: 4 token sequences of unsorted lengths."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(1, 30, (4, 9), generator=g), torch.tensor([9, 5, 7, 3])) for _ in range(n)
    ]


class SharedEmbedding(nn.Module):
    """T5-style tied embeddings: ``shared`` is never called, ``enc`` (the same weight) is, and
    ``head`` reads that weight as a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(64, 32)
        self.enc = nn.Embedding(64, 32)
        self.enc.weight = self.shared.weight
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.enc(ids)))


class HFMoE(nn.Module):
    """A router over all experts but the last (which no token reaches) and a Hugging Face
    expert bank random-initialised from its config (``family``: Mixtral, ``[experts, out,
    in]`` weights, or GPT-OSS: transposed, per-expert biases, its own clamped gate); the
    output is the residual sum."""

    def __init__(self, experts: int, hidden: int, inter: int, family: str = "mixtral") -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        if family == "mixtral":
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Bank

            config = transformers.MixtralConfig
        else:
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Bank

            config = transformers.GptOssConfig
        cfg = config(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts)
        cfg._experts_implementation = "eager"
        torch.manual_seed(0)
        self.router = nn.Linear(hidden, experts - 1, bias=False)
        self.experts = Bank(cfg)
        with torch.no_grad():
            for p in self.experts.parameters():
                p.normal_(0.0, 0.2)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(self.router(x), -1).topk(2, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.route(x)
        return x + self.experts(x, index, weights)


def tiny_llama(seed: int = 0, **sizes: int) -> nn.Module:
    """A random-initialised Hugging Face Llama (grouped-query attention: 4 heads, 2 key/value
    heads; 96-token vocabulary), 2 layers of width 64 unless ``sizes`` say otherwise."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **{"intermediate_size": 128, "num_hidden_layers": 2, **sizes},
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_multi_label_bert(seed: int = 0) -> nn.Module:
    """A random-initialised Hugging Face BERT classifier configured for multi-label
    classification (5 labels, 100-token vocabulary, 1 layer of width 32)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
        problem_type="multi_label_classification",
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A random-initialised Hugging Face GPT-2 (64-token vocabulary, 1 layer of width 32)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()
