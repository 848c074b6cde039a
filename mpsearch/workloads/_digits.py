"""Classifiers trained on scikit-learn's bundled 8x8 handwritten digits: a small CNN, an MLP,
and a ResNet-18 on the digits upscaled to 3x64x64 (a >= 1 GFLOP-per-batch conv net with
trained weights, for speed benchmarks whose quality must mean something)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch._data import output_tensor
from mpsearch.workloads._base import (
    Workload,
    labelled_workload,
    register_workload,
    split_indices,
    take,
)
from mpsearch.workloads._cache import fingerprint, load_or_train
from mpsearch.workloads._resnet import IMAGE_SIZE, ResNet18

SPLIT = (0.6, 0.2, 0.2)
"""Fractions of the 1797 digits used for training, calibration and test."""


class DigitsCNN(nn.Module):
    """Three Conv-BN-ReLU stages and two Linear layers for ``[B, 1, 8, 8]`` images in [0, 1].

    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, *, width: int = 32, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 2 * 2, hidden)  # 256 inputs: a multiple of 32 and 128
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # 8x8
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 4x4
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 2x2
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    """``64 -> 256 -> 256 -> 10`` with ReLU, for ``[B, 64]`` flattened images in [0, 1].

    >>> DigitsMLP()(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """

    def __init__(self, *, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a digits training run (part of the cache key)."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0


CNN_CONFIG = TrainConfig(epochs=20, lr=3e-3)
MLP_CONFIG = TrainConfig(epochs=60, lr=1e-3)
RESNET_CONFIG = TrainConfig(epochs=4, lr=2e-3, batch_size=32)


def upscaled(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, 1, 8, 8]`` digits as ``[N, 3, size, size]`` images (bilinear, grey in 3 channels).

    >>> upscaled(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 3, 64, 64])
    """
    big = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return big.expand(-1, 3, -1, -1).contiguous()


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """All digits as ``[1797, 1, 8, 8]`` floats in [0, 1], their labels, and a data digest."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    return images, labels, digest[:16]


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, Any]:
    """Adam on ``loss_fn`` (cross-entropy: per pixel for a segmentation model's
    ``{"out": [B, C, H, W]}`` against ``y [B, H, W]``) for ``config.epochs`` seeded shuffles of
    ``(x, y)``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(x) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    loss = torch.zeros(())
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for index in torch.split(order, config.batch_size):
            loss = loss_fn(output_tensor(model(x[index])), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return {"final_train_loss": round(float(loss.detach()), 6), "n_train": len(x)}


def _register(
    name: str,
    model_factory: type[nn.Module],
    config: TrainConfig,
    inputs: Callable[[torch.Tensor], torch.Tensor],
    doc: str,
) -> None:
    """Register the digits workload ``name``: ``model_factory`` trained by ``config`` on
    ``inputs(images)`` of the train split, cached; accuracy as quality."""

    def build(
        *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
    ) -> Workload:
        images, labels, digest = _digits()
        x = inputs(images)
        train_idx, calib_idx, test_idx = split_indices(len(x), SPLIT, seed=seed)
        n_cal = take("n_calib", n_calib, len(calib_idx))
        n_tst = take("n_test", n_test, len(test_idx))
        calib_idx, test_idx = calib_idx[:n_cal], test_idx[:n_tst]
        model, info = load_or_train(
            name,
            seed=seed,
            cache_dir=cache_dir,
            key=fingerprint(name, asdict(config), digest, SPLIT),
            build=model_factory,
            train=lambda m: _train(m, x[train_idx], labels[train_idx], config, seed=seed),
        )
        return labelled_workload(
            name,
            model,
            calib=(x[calib_idx], labels[calib_idx]),
            test=(x[test_idx], labels[test_idx]),
            batch_size=batch_size,
            info=info,
        )

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = doc
    register_workload(name)(build)


_register(
    "digits_cnn",
    DigitsCNN,
    CNN_CONFIG,
    lambda images: images,
    "The digits CNN: inputs ``[B, 1, 8, 8]``, 10-class logits, accuracy as quality.",
)
_register(
    "mlp",
    DigitsMLP,
    MLP_CONFIG,
    lambda images: images.flatten(1),
    "The digits MLP: inputs ``[B, 64]``, 10-class logits, accuracy as quality.",
)
_register(
    "digits_resnet18",
    ResNet18,
    RESNET_CONFIG,
    upscaled,
    "ResNet-18 trained on the digits upscaled to ``[B, 3, 64, 64]``: 10-class logits, accuracy "
    "as quality (about 0.3 GFLOP per image; trained once, about a minute, and cached).",
)
