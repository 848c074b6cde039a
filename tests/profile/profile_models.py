"""Fake models with known sensitivities, and models with dict / several-tensor inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

SENSITIVITY = {"b0": 3, "b1": 1, "b2": 4, "b3": 2}
"""Branch name -> k: branch k's quantization error is k times branch 1's (up to rounding)."""


class KnownSensitivity(nn.Module):
    """``out = sum_k L_k(sqrt(k) x)`` with identical ``L_k`` (same weight, a bf16-exact bias).

    Every branch quantizes the same weight the same way, and its input is scaled by sqrt(k), so
    its output error (local and end to end) is k times branch 1's: MSE, e2e MSE, task drop and
    the Hessian score grow as k; the shared bias makes SQNR fall with k.
    """

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(d, d, generator=g) / math.sqrt(d)
        bias = torch.randint(-8, 8, (d,), generator=g).float() / 4
        self.names = list(SENSITIVITY)
        for name in self.names:
            layer = nn.Linear(d, d)
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for name in self.names:
            out = out + getattr(self, name)(x * math.sqrt(SENSITIVITY[name]))
        return out


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(8, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(image) + self.b(extra)))


class DataDependent(DictInput):
    """Same as :class:`DictInput` but with a data-dependent branch (torch.fx cannot trace it)."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        if image.abs().sum() >= 0:  # always true, but not traceable
            return super().forward(image, extra)
        return torch.zeros(image.shape[0], 4)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(32, 10)
        g = torch.Generator().manual_seed(3)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.copy_(torch.randn(32, generator=g))
            bn.running_var.copy_(torch.rand(32, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(32, generator=g))
            bn.bias.data.copy_(torch.randn(32, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y += x  # in-place residual
        y = self.relu(y)
        return self.fc(y.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Embeddings, layer norm, attention reading the batch size as an int, an MLP and a head."""

    def __init__(self, vocab: int = 32, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.tok(tokens) + self.pos(torch.arange(t))
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        shape = (b, t, self.heads, -1)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return self.out(torch.nn.functional.gelu(self.fc(x)))


def chain(n: int = 6, d: int = 32) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(n - 1):
        layers += [nn.Linear(d, d), nn.ReLU()]
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers).eval()


def batches(n: int, *shape: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]
