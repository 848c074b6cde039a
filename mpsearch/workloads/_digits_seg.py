"""Semantic segmentation of scenes built from scikit-learn's digits.

A scene is a 24 x 24 grey image: a 3 x 3 grid of 8 x 8 cells, three of them holding a
handwritten digit, plus Gaussian noise of a per-scene strength (so some scenes are harder
than others). Every pixel's label is its digit's class where the digit's ink is (intensity
above ``INK``) and ``BACKGROUND`` (10) elsewhere. Train, calibration and test scenes draw their
digits from the disjoint splits of the digits classifiers. The model is a small
encoder-decoder returning ``{"out": logits [B, 11, 24, 24]}`` like torchvision's segmentation
models; quality is the mean intersection over union over the 11 classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch.workloads._base import (
    Task,
    Workload,
    labelled_workload,
    register_workload,
    split_indices,
    take,
)
from mpsearch.workloads._cache import fingerprint, load_or_train
from mpsearch.workloads._digits import SPLIT, TrainConfig, _digits, _train

GRID = 3
"""Cells per side of a scene (each 8 x 8 pixels)."""
DIGITS_PER_SCENE = 3
BACKGROUND = 10
NUM_CLASSES = 11
INK = 0.3
"""A digit's pixel above this intensity (of 1) is labelled with the digit's class."""
MAX_NOISE = 0.4
"""Each scene's noise standard deviation is drawn uniformly from ``[0, MAX_NOISE]``."""
SCENES = {"train": 3000, "calib": 512, "test": 512}
SEG_CONFIG = TrainConfig(epochs=10, lr=3e-3)


def digit_scenes(
    images: torch.Tensor, labels: torch.Tensor, n: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes ``[n, 1, 24, 24]`` and their pixel labels ``[n, 24, 24]`` from the digits
    ``images [N, 1, 8, 8]`` (in [0, 1]) with ``labels [N]``, seeded.

    >>> x, y = digit_scenes(torch.ones(4, 1, 8, 8), torch.arange(4), 2, seed=0)
    >>> x.shape, y.shape, int((y != BACKGROUND).sum(dim=(1, 2))[0])
    (torch.Size([2, 1, 24, 24]), torch.Size([2, 24, 24]), 192)
    """
    g = torch.Generator().manual_seed(seed)
    side = 8 * GRID
    x = torch.zeros(n, 1, side, side)
    y = torch.full((n, side, side), BACKGROUND, dtype=torch.int64)
    cells = torch.argsort(torch.rand(n, GRID * GRID, generator=g), dim=1)[:, :DIGITS_PER_SCENE]
    picks = torch.randint(len(images), (n, DIGITS_PER_SCENE), generator=g)
    for i in range(n):
        for cell, pick in zip(cells[i].tolist(), picks[i].tolist(), strict=True):
            row, col = divmod(cell, GRID)
            where = (slice(8 * row, 8 * row + 8), slice(8 * col, 8 * col + 8))
            digit = images[pick, 0]
            x[i, 0][where] = digit
            y[i][where] = torch.where(digit > INK, labels[pick], BACKGROUND)
    noise = MAX_NOISE * torch.rand(n, 1, 1, 1, generator=g)
    return x + noise * torch.randn(x.shape, generator=g), y


class DigitsSegNet(nn.Module):
    """Two pooled stages for what the digit is, one full-resolution stage for where its ink
    is, joined before the classifier: ``[B, 1, 24, 24]`` -> ``{"out": [B, 11, 24, 24]}``.

    >>> DigitsSegNet()(torch.zeros(2, 1, 24, 24))["out"].shape
    torch.Size([2, 11, 24, 24])
    """

    def __init__(self, *, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.conv4 = nn.Conv2d(5 * width, 2 * width, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.head = nn.Conv2d(2 * width, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fine = F.relu(self.bn1(self.conv1(x)))  # 24 x 24
        x = F.relu(self.bn2(self.conv2(F.max_pool2d(fine, 2))))  # 12 x 12
        x = F.relu(self.bn3(self.conv3(F.max_pool2d(x, 2))))  # 6 x 6
        x = F.interpolate(x, scale_factor=4, mode="nearest")
        x = F.relu(self.bn4(self.conv4(torch.cat([x, fine], dim=1))))
        return {"out": self.head(x)}


@dataclass(frozen=True)
class SceneTask:
    """A workload on digit scenes: what its model answers and how it trains."""

    name: str
    build: Callable[[], nn.Module]
    targets: Callable[[torch.Tensor], torch.Tensor]
    """Each scene's target from its pixel labels ``[n, 24, 24]``."""
    config: TrainConfig
    task: Task
    scenes: dict[str, int] = field(default_factory=lambda: dict(SCENES))
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy


def scene_workload(
    spec: SceneTask, *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None,
    batch_size: int,
) -> Workload:  # fmt: skip
    """The workload ``spec`` describes: scenes drawn from the disjoint splits of the digits
    classifiers' digits, its model trained on the train scenes (once, cached) and measured on
    the test scenes."""
    images, labels, digest = _digits()
    parts = dict(zip(spec.scenes, split_indices(len(images), SPLIT, seed=seed), strict=True))
    n_cal = take("n_calib", n_calib, spec.scenes["calib"])
    n_tst = take("n_test", n_test, spec.scenes["test"])
    data = {}
    for k, (part, idx) in enumerate(parts.items()):
        x, y = digit_scenes(images[idx], labels[idx], spec.scenes[part], seed=seed + k)
        data[part] = (x, spec.targets(y))
    key = fingerprint(
        spec.name, asdict(spec.config), digest, SPLIT, spec.scenes, GRID, INK, MAX_NOISE
    )
    model, info = load_or_train(
        spec.name,
        seed=seed,
        cache_dir=cache_dir,
        key=key,
        build=spec.build,
        train=lambda m: _train(m, *data["train"], spec.config, seed=seed, loss_fn=spec.loss_fn),
    )
    return labelled_workload(
        spec.name,
        model,
        calib=(data["calib"][0][:n_cal], data["calib"][1][:n_cal]),
        test=(data["test"][0][:n_tst], data["test"][1][:n_tst]),
        batch_size=batch_size,
        task=spec.task,
        info=info,
    )


@register_workload("digits_seg")
def build_digits_seg(
    *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
) -> Workload:
    """Segmentation of digit scenes: inputs ``[B, 1, 24, 24]``, ``{"out": [B, 11, 24, 24]}``
    per-pixel logits, mean IoU as quality (trained once, about 40 s on 2 cores, and cached)."""
    spec = SceneTask("digits_seg", DigitsSegNet, lambda y: y, SEG_CONFIG, "segmentation")
    return scene_workload(
        spec, seed=seed, cache_dir=cache_dir, n_calib=n_calib, n_test=n_test,
        batch_size=batch_size,
    )  # fmt: skip
