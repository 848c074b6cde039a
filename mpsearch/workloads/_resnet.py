"""A ResNet-18-shaped network with seeded random weights, judged by agreement with itself."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch.workloads._base import Workload, batched, register_workload, take

IMAGE_SIZE = 64
N_TEST = 128
N_MAX = 4096
N_WARMUP = 128


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN stages with an identity (or 1x1 Conv-BN) shortcut, as in ResNet-18."""

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 layout (BasicBlocks ``[2, 2, 2, 2]``, widths 64-512) for ``[B, 3, H, W]``.

    Layer names follow torchvision (``conv1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
    ``fc``), so plans written for torchvision's ResNet-18 apply unchanged.

    >>> ResNet18()(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    """

    def __init__(self, *, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            stage = nn.Sequential(
                BasicBlock(in_channels, width, stride=stride), BasicBlock(width, width)
            )
            self.add_module(f"layer{index}", stage)
            in_channels = width
        self.n_stages = len(widths)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for index in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def synthetic_images(n: int, *, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``n`` image-like inputs ``[n, 3, size, size]``: smooth random fields plus fine noise.

    >>> synthetic_images(2, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3, 64, 64])
    """
    coarse = torch.randn(n, 3, size // 8, size // 8, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.25 * torch.randn(n, 3, size, size, generator=generator)


def _calibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, batch_size: int) -> None:
    """Give BatchNorm layers non-trivial statistics (exact averages over ``images``) and affines."""
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the warm-up batches
            norm.weight.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
        model.train()
        for batch in torch.split(images, batch_size):
            model(batch)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


@register_workload("resnet18")
def build_resnet18(
    *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
) -> Workload:
    """Random ResNet-18 on synthetic 3x64x64 images; quality is top-1 agreement with fp32.

    Nothing is trained, so nothing is cached (``cache_dir`` is unused): building from the seed
    takes about as long as reading 45 MB of weights would.
    """
    del cache_dir
    n_cal = take("n_calib", n_calib, N_MAX)
    n_tst = take("n_test", n_test, N_MAX, default=N_TEST)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet18()
    data = torch.Generator().manual_seed(seed)
    warmup = synthetic_images(N_WARMUP, generator=data)
    calib = synthetic_images(n_cal, generator=data)
    test = synthetic_images(n_tst, generator=data)
    _calibrate_batchnorm(model, warmup, batch_size=32)
    test_batches = batched(test, batch_size)
    with torch.inference_mode():
        reference = [model(batch).argmax(dim=-1) for batch in test_batches]
    predicted = torch.cat(reference)
    counts = torch.bincount(predicted, minlength=10)
    workload = Workload(
        name="resnet18",
        model=model,
        calib=batched(calib, batch_size),
        test=test_batches,
        test_labels=None,
        example_input=test_batches[0].clone(),
        task="classification",
        calib_labels=None,
        reference=[r.clone() for r in reference],
        info={
            "from_cache": False,
            "train_seconds": 0.0,
            "image_size": IMAGE_SIZE,
            "reference_class_counts": counts.tolist(),
        },
    )
    workload.info["fp32_quality"] = workload.evaluate(model)
    return workload
