"""Multi-label tagging of scenes built from scikit-learn's digits: which digits a scene holds.

The scenes are :mod:`~mpsearch.workloads._digits_seg`'s (three handwritten digits on a 3 x 3
grid, with noise of a per-scene strength); a scene is tagged with each digit class whose ink
it shows, so it has 1 to 3 of the 10 labels. The model is a small CNN with global max pooling
and one logit per label, configured as a Hugging Face multi-label classifier is
(``config.problem_type``), trained with binary cross-entropy; quality is the share of test
scenes given exactly their set of labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch._data import MULTI_LABEL_PROBLEM
from mpsearch.workloads._base import Workload, register_workload
from mpsearch.workloads._digits import TrainConfig
from mpsearch.workloads._digits_seg import BACKGROUND, SCENES, SceneTask, scene_workload

NUM_LABELS = 10
TAG_SCENES = {**SCENES, "train": 10_000}
"""Scenes per split: more training scenes than the segmentation workload's (one label set per
scene says less than a label per pixel; with 3,000 the net fit them all and tagged 71 % of
the test scenes exactly, with 10,000 74 %)."""
TAGS_CONFIG = TrainConfig(epochs=6, lr=3e-3)


@dataclass(frozen=True)
class MultiLabelConfig:
    """What a Hugging Face classifier's config says of a multi-label model."""

    problem_type: str = MULTI_LABEL_PROBLEM


def scene_tags(pixel_labels: torch.Tensor) -> torch.Tensor:
    """Multi-hot tags ``[n, 10]`` (float) of scenes' pixel labels ``[n, H, W]``: the digit
    classes whose ink the scene shows.

    >>> y = torch.full((1, 2, 2), BACKGROUND)
    >>> y[0, 0, 0], y[0, 1, 1] = 3, 7
    >>> scene_tags(y).nonzero()[:, 1].tolist()
    [3, 7]
    """
    counts = F.one_hot(pixel_labels.flatten(1), BACKGROUND + 1).sum(1)
    return (counts[:, :NUM_LABELS] > 0).float()


class DigitsTagNet(nn.Module):
    """Three conv stages (two of them pooled), global max pooling (is the digit anywhere?), and
    a two-layer head with one logit per digit class: ``[B, 1, 24, 24]`` -> ``[B, 10]``.

    >>> DigitsTagNet()(torch.zeros(2, 1, 24, 24)).shape
    torch.Size([2, 10])
    """

    def __init__(self, *, width: int = 16) -> None:
        super().__init__()
        self.config = MultiLabelConfig()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc1 = nn.Linear(4 * width, 4 * width)
        self.fc2 = nn.Linear(4 * width, NUM_LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # 24 x 24
        x = F.relu(self.bn2(self.conv2(F.max_pool2d(x, 2))))  # 12 x 12
        x = F.relu(self.bn3(self.conv3(F.max_pool2d(x, 2))))  # 6 x 6
        return self.fc2(F.relu(self.fc1(x.amax(dim=(2, 3)))))


@register_workload("digits_tags")
def build_digits_tags(
    *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
) -> Workload:
    """Multi-label tagging of digit scenes: inputs ``[B, 1, 24, 24]``, logits ``[B, 10]`` (one
    sigmoid per digit class), the share of scenes tagged exactly right as quality (trained
    once and cached)."""
    spec = SceneTask(
        "digits_tags", DigitsTagNet, scene_tags, TAGS_CONFIG, "multilabel", scenes=TAG_SCENES,
        loss_fn=F.binary_cross_entropy_with_logits,
    )  # fmt: skip
    return scene_workload(
        spec, seed=seed, cache_dir=cache_dir, n_calib=n_calib, n_test=n_test,
        batch_size=batch_size,
    )  # fmt: skip
