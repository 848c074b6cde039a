"""A wide character-level MLP language model on Python's bundled pydoc topics.

Each input is the ``context`` characters before a position; the answer is the next
character. The model is an embedding followed by wide ``nn.Linear`` layers, so at batch 1 its
time is spent in large matrix-vector products where low-precision weights are really faster
(unlike the small digits CNN or the small transformer, dominated by per-call overhead). Every
position of the calibration and test streams is one sample, so there are tens of thousands of
calibration inputs: enough to certify small disagreement rates.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch.workloads._base import Workload, labelled_workload, register_workload, take
from mpsearch.workloads._cache import fingerprint, load_or_train
from mpsearch.workloads._text import corpus


@dataclass(frozen=True)
class CharMLPConfig:
    """Model and training hyperparameters of the char-MLP workload (part of the cache key)."""

    context: int = 32
    embed: int = 32
    hidden: int = 1536
    n_hidden: int = 4
    steps: int = 800
    train_batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20


CHAR_MLP_CONFIG = CharMLPConfig()
N_TEST = 2048


class CharMLP(nn.Module):
    """Token ids ``[B, context]`` to next-character logits ``[B, V]`` through wide Linear layers.

    ``n_hidden`` Linear+GELU layers (the first ``context * embed -> hidden``, the others
    ``hidden -> hidden``) and a ``hidden -> V`` head.

    >>> CharMLP(vocab_size=96, context=8, embed=4, hidden=16)(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 96])
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        context: int = 32,
        embed: int = 32,
        hidden: int = 1536,
        n_hidden: int = 4,
    ) -> None:
        super().__init__()
        if n_hidden < 1:
            raise ValueError(f"The 'n_hidden' argument must be >= 1. Got {n_hidden} instead.")
        self.context = context
        self.emb = nn.Embedding(vocab_size, embed)
        widths = [context * embed] + [hidden] * n_hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).flatten(1)
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


def contexts(stream: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(previous context characters, next character)`` pair of ``stream``.

    >>> [t.tolist() for t in contexts(torch.arange(5), 3)]
    [[[0, 1, 2], [1, 2, 3]], [3, 4]]
    """
    n = len(stream) - context
    if n < 1:
        raise ValueError(f"A stream of {len(stream)} tokens has no context of {context}.")
    index = torch.arange(n)[:, None] + torch.arange(context)
    return stream[index], stream[context:]


def _train(
    model: CharMLP, stream: torch.Tensor, config: CharMLPConfig, *, seed: int
) -> dict[str, Any]:
    """AdamW with warm-up and linear decay on random positions of ``stream``."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.05, 1.0 - (step - config.warmup_steps) / (config.steps - config.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed + 1)
    span = torch.arange(config.context + 1)
    model.train()
    recent: list[float] = []
    for _ in range(config.steps):
        starts = torch.randint(
            0, len(stream) - config.context, (config.train_batch, 1), generator=generator
        )
        window = stream[starts + span]
        loss = F.cross_entropy(model(window[:, :-1]), window[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent = [*recent[-49:], float(loss.detach())]
    model.eval()
    return {"final_train_loss": round(sum(recent) / len(recent), 6), "steps": config.steps}


def build_char_mlp_workload(
    config: CharMLPConfig,
    *,
    name: str,
    seed: int,
    cache_dir: Path,
    n_calib: int,
    n_test: int | None,
    batch_size: int,
) -> Workload:
    """The char-MLP workload for any ``config`` (the registered one uses ``CHAR_MLP_CONFIG``)."""
    text = corpus(seed)
    key = fingerprint(name, asdict(config), text.digest, text.vocab)
    model, info = load_or_train(
        name,
        seed=seed,
        cache_dir=cache_dir,
        key=key,
        build=lambda: CharMLP(
            vocab_size=text.vocab_size,
            context=config.context,
            embed=config.embed,
            hidden=config.hidden,
            n_hidden=config.n_hidden,
        ),
        train=lambda m: _train(m, text.train, config, seed=seed),
    )
    calib_x, calib_y = contexts(text.calib, config.context)
    test_x, test_y = contexts(text.test, config.context)
    # consecutive positions overlap; a seeded shuffle spreads each split over the whole stream
    g = torch.Generator().manual_seed(seed + 2)
    calib_order = torch.randperm(len(calib_x), generator=g)
    test_order = torch.randperm(len(test_x), generator=g)
    n_cal = take("n_calib", n_calib, len(calib_x))
    n_tst = take("n_test", n_test, len(test_x), default=N_TEST)
    calib_idx, test_idx = calib_order[:n_cal], test_order[:n_tst]
    return labelled_workload(
        name,
        model,
        calib=(calib_x[calib_idx], calib_y[calib_idx]),
        test=(test_x[test_idx], test_y[test_idx]),
        batch_size=batch_size,
        info={**info, "vocab": text.vocab, "vocab_size": text.vocab_size},
    )


@register_workload("char_mlp")
def build_char_mlp(
    *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
) -> Workload:
    """Wide char-level MLP LM: inputs LongTensor ``[B, 32]``, next-character logits ``[B, V]``."""
    return build_char_mlp_workload(
        CHAR_MLP_CONFIG,
        name="char_mlp",
        seed=seed,
        cache_dir=cache_dir,
        n_calib=n_calib,
        n_test=n_test,
        batch_size=batch_size,
    )
