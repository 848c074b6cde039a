"""A small character-level decoder-only transformer trained on Python's bundled pydoc topics."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch.workloads._base import (
    Workload,
    labelled_workload,
    register_workload,
    split_indices,
    take,
)
from mpsearch.workloads._cache import fingerprint, load_or_train

UNKNOWN = 0
"""Token id of every character outside the vocabulary."""


@dataclass(frozen=True)
class TextConfig:
    """Model and training hyperparameters of the text workload (part of the cache key)."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    min_count: int = 20
    vocab_multiple: int = 32
    chunk_chars: int = 2048
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    steps: int = 600
    train_batch: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0


CONFIG = TextConfig()
N_TEST = 256


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with plain ``nn.Linear`` q/k/v/out projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"The 'n_heads' argument must divide d_model={d_model}. Got {n_heads} instead."
            )
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        heads = (batch, length, self.n_heads, d_model // self.n_heads)
        q = self.q_proj(x).view(heads).transpose(1, 2)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, d_model))


class MLP(nn.Module):
    """``Linear(d, 4d) -> GELU -> Linear(4d, d)``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Decoder-only transformer: token ids ``[B, T]`` (``T <= seq_len``) to logits ``[B, T, V]``.

    >>> CharTransformer(vocab_size=96)(torch.zeros(2, 64, dtype=torch.long)).shape
    torch.Size([2, 64, 96])
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 64,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # scaled residual projections (GPT-2)
            nn.init.normal_(block.attn.out_proj.weight, std=0.02 / math.sqrt(2 * n_layers))
            nn.init.normal_(block.mlp.fc2.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclass(frozen=True)
class Corpus:
    """The pydoc topics text, its vocabulary, and its three encoded splits."""

    vocab: str
    vocab_size: int
    train: torch.Tensor
    calib: torch.Tensor
    test: torch.Tensor
    digest: str

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (characters outside the vocabulary become ``UNKNOWN``)."""
        index = {char: i + 1 for i, char in enumerate(self.vocab)}
        return torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        """Text of token ids (``UNKNOWN`` and padding ids become ``"?"``)."""
        chars = [self.vocab[t - 1] if 0 < t <= len(self.vocab) else "?" for t in tokens.tolist()]
        return "".join(chars)


@cache
def _raw_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


@cache
def corpus(seed: int, config: TextConfig = CONFIG) -> Corpus:
    """Encode the pydoc topics and split them, by seeded ``chunk_chars`` chunks, 80/10/10.

    >>> corpus(0).vocab_size % 32
    0
    """
    text = _raw_text()
    counts = Counter(text)
    vocab = "".join(sorted(c for c, n in counts.items() if n >= config.min_count))
    multiple = config.vocab_multiple
    vocab_size = -(-(len(vocab) + 1) // multiple) * multiple
    index = {char: i + 1 for i, char in enumerate(vocab)}
    ids = torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.long)
    chunks = list(torch.split(ids, config.chunk_chars))
    parts = split_indices(len(chunks), config.split, seed=seed)
    streams = [torch.cat([chunks[i] for i in sorted(part.tolist())]) for part in parts]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Corpus(vocab, vocab_size, *streams, digest=digest)


def windows(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(inputs, next-token targets)`` windows ``[N, seq_len]`` of ``stream``.

    >>> [t.tolist() for t in windows(torch.arange(7), 3)]
    [[[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]]]
    """
    n = (len(stream) - 1) // seq_len
    inputs = stream[: n * seq_len].view(n, seq_len)
    targets = stream[1 : n * seq_len + 1].view(n, seq_len)
    return inputs, targets


def _train(
    model: nn.Module, stream: torch.Tensor, config: TextConfig, *, seed: int
) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay on random windows of ``stream``."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "emb" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed + 1)
    offsets_max = len(stream) - config.seq_len - 1
    span = torch.arange(config.seq_len + 1)
    model.train()
    recent: list[float] = []
    for _ in range(config.steps):
        starts = torch.randint(0, offsets_max + 1, (config.train_batch, 1), generator=generator)
        window = stream[starts + span]
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        recent = [*recent[-49:], float(loss.detach())]
    model.eval()
    return {"final_train_loss": round(sum(recent) / len(recent), 6), "steps": config.steps}


@register_workload("text_transformer")
def build_text_transformer(
    *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
) -> Workload:
    """Char-level transformer: inputs LongTensor ``[B, 64]``; quality is next-token accuracy."""
    config = CONFIG
    text = corpus(seed, config)
    key = fingerprint("text_transformer", asdict(config), text.digest, text.vocab)
    model, info = load_or_train(
        "text_transformer",
        seed=seed,
        cache_dir=cache_dir,
        key=key,
        build=lambda: CharTransformer(
            vocab_size=text.vocab_size,
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            seq_len=config.seq_len,
        ),
        train=lambda m: _train(m, text.train, config, seed=seed),
    )
    calib_x, calib_y = windows(text.calib, config.seq_len)
    test_x, test_y = windows(text.test, config.seq_len)
    n_cal = take("n_calib", n_calib, len(calib_x))
    n_tst = take("n_test", n_test, len(test_x), default=N_TEST)
    return labelled_workload(
        "text_transformer",
        model,
        calib=(calib_x[:n_cal], calib_y[:n_cal]),
        test=(test_x[:n_tst], test_y[:n_tst]),
        batch_size=batch_size,
        task="language_model",
        info={**info, "vocab": text.vocab, "vocab_size": text.vocab_size},
    )
