"""The digit-scenes segmentation workload's data, model and metric (its training, about 40 s,
is run by ``benchmarks/bench_segmentation.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.profile import auto_metric
from mpsearch.workloads import _digits_seg as digits_seg
from mpsearch.workloads._base import mean_iou
from mpsearch.workloads._digits_seg import (
    BACKGROUND,
    DIGITS_PER_SCENE,
    INK,
    MAX_NOISE,
    NUM_CLASSES,
    DigitsSegNet,
    digit_scenes,
)


def test_scenes_hold_three_digits_labelled_where_their_ink_is(monkeypatch) -> None:
    """Digit k is a checkerboard of intensity 0.4 + 0.05 k: without noise, every scene holds
    three of them in distinct cells, labelled k on their ink and background elsewhere; the
    noise is per scene, of standard deviation up to ``MAX_NOISE``; a seed fixes the scenes."""
    checker = (torch.arange(8).view(8, 1) + torch.arange(8)).remainder(2).float()
    images = torch.stack([checker * (0.4 + 0.05 * k) for k in range(10)]).unsqueeze(1)
    labels = torch.arange(10)
    noisy, y = digit_scenes(images, labels, 40, seed=3)
    monkeypatch.setattr(digits_seg, "MAX_NOISE", 0.0)
    x, y_clean = digit_scenes(images, labels, 40, seed=3)
    assert x.shape == (40, 1, 24, 24) and torch.equal(y, y_clean)
    cells = lambda t: t.reshape(-1, 3, 8, 3, 8).transpose(2, 3).reshape(-1, 9, 8, 8)  # noqa: E731
    for image, label in zip(cells(x[:, 0]), cells(y), strict=True):
        held = [c for c in range(9) if image[c].any()]
        assert len(held) == DIGITS_PER_SCENE
        for c in range(9):
            k = round((float(image[c].max()) - 0.4) / 0.05) if c in held else BACKGROUND
            expected = torch.where(image[c] > INK, k, BACKGROUND)
            assert torch.equal(label[c], expected)
    spread = (noisy - x).flatten(1).std(dim=1)
    assert float(spread.max()) <= 1.2 * MAX_NOISE and float(spread.min()) < 0.2 * MAX_NOISE
    assert torch.equal(digit_scenes(images, labels, 40, seed=3)[0], x)
    assert not torch.equal(digit_scenes(images, labels, 40, seed=4)[1], y)


def test_mean_iou_counts_every_batch_and_skips_absent_classes() -> None:
    """Two batches, 3 classes (class 2 never occurs): class 0 is predicted at 3 pixels, labelled
    at 3, right at 2 (IoU 2 / 4); class 1 predicted at 2, labelled at 2, right at 1 (1 / 3)."""
    one_hot = lambda classes: nn.functional.one_hot(torch.tensor(classes), 3).float()  # noqa: E731
    logits = [one_hot([[[0, 0, 1]]]).permute(0, 3, 1, 2), one_hot([[[1, 0]]]).permute(0, 3, 1, 2)]
    labels = [torch.tensor([[[0, 0, 0]]]), torch.tensor([[[1, 1]]])]
    assert mean_iou(nn.Identity(), logits, labels) == pytest.approx((2 / 4 + 1 / 3) / 2, abs=1e-15)
    assert mean_iou(nn.Identity(), logits[:1], labels[:1]) == pytest.approx(
        (2 / 3 + 0 / 1) / 2, abs=1e-15
    )


def test_the_model_answers_per_pixel_logits_like_torchvision() -> None:
    out = DigitsSegNet().eval()(torch.zeros(2, 1, 24, 24))
    assert list(out) == ["out"] and out["out"].shape == (2, NUM_CLASSES, 24, 24)
    assert auto_metric(out["out"], "out") == "kl_channels"
