"""The ``Workload`` record, its quality measures, and the registry of workload builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from mpsearch._data import output_tensor, run_model
from mpsearch._validation import invalid, unknown
from mpsearch.workloads._cache import resolve_cache_dir

Task = Literal["classification", "language_model", "multilabel", "regression", "segmentation"]
TASKS: tuple[str, ...] = (
    "classification",
    "language_model",
    "multilabel",
    "regression",
    "segmentation",
)


@dataclass
class Workload:
    """A model with its data splits and its quality measure, ready for profiling and search.

    ``calib`` and ``test`` hold model inputs only (a tensor, or a tuple of tensors, per batch);
    ``calib_labels`` / ``test_labels`` hold the targets aligned batch by batch with them, or
    ``None`` where the task has no labels. ``reference`` holds the full-precision model's
    top-1 predictions on ``test`` for workloads without labels, and ``evaluate`` then
    measures agreement with them.

    >>> wl = load_workload("mlp", cache_dir=tmp)  # doctest: +SKIP
    >>> round(wl.evaluate(wl.model), 2)  # doctest: +SKIP
    0.97
    """

    name: str
    model: nn.Module
    calib: list[Any]
    test: list[Any]
    test_labels: list[torch.Tensor] | None
    example_input: torch.Tensor
    task: Task
    calib_labels: list[torch.Tensor] | None = None
    reference: list[torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise unknown("task", self.task, TASKS)
        for argument, labels, batches in (
            ("test_labels", self.test_labels, self.test),
            ("calib_labels", self.calib_labels, self.calib),
            ("reference", self.reference, self.test),
        ):
            if labels is not None and len(labels) != len(batches):
                raise invalid(
                    argument, f"{len(labels)} batches", f"aligned with {len(batches)} batches"
                )

    def evaluate(self, model: nn.Module) -> float:
        """Task quality of ``model`` on the ``test`` batches; higher is better.

        Top-1 accuracy against ``test_labels`` (per token for a language model; a multi-label
        classifier's: the share of samples given exactly their set of labels), or, where no
        labels exist, top-1 agreement with ``reference``; negative mean squared error for
        regression. Runs under ``torch.inference_mode`` and accepts any module with the same
        call signature as ``self.model`` (quantized copies included); the module's
        train/eval mode is restored afterwards.

        >>> wl.evaluate(wl.model) == wl.info["fp32_quality"]  # doctest: +SKIP
        True
        """
        targets = self.test_labels if self.test_labels is not None else self.reference
        if targets is None:
            raise ValueError(
                f"Workload {self.name!r} has neither test_labels nor reference predictions, "
                "so it cannot be evaluated; build it with one of them."
            )
        metric = METRICS[self.task]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                return metric(model, self.test, targets)
        finally:
            model.train(was_training)


Metric = Callable[[nn.Module, list[Any], list[torch.Tensor]], float]


def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
    return output_tensor(run_model(model, batch)).float()


def top1_accuracy(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    """Fraction of positions where ``argmax`` of the last output dimension equals the target.

    Works for classifier logits ``[B, C]`` against ``[B]`` and language-model logits
    ``[B, T, V]`` against ``[B, T]``.

    >>> top1_accuracy(nn.Identity(), [torch.eye(3)], [torch.tensor([0, 1, 0])])
    0.6666666666666666
    """
    correct = 0
    total = 0
    for batch, target in zip(batches, targets, strict=True):
        predicted = _logits(model, batch).argmax(dim=-1)
        correct += int((predicted == target).sum())
        total += target.numel()
    return correct / total


def negative_mse(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    """Negative mean squared error over all batches (so that higher is better).

    >>> negative_mse(nn.Identity(), [torch.zeros(2)], [torch.ones(2)])
    -1.0
    """
    total = 0.0
    count = 0
    for batch, target in zip(batches, targets, strict=True):
        output = _logits(model, batch)
        total += float(((output - target.float()) ** 2).sum())
        count += target.numel()
    return -total / count


def mean_iou(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    """Mean intersection over union of per-pixel classes (``argmax`` over dimension 1 of
    ``[B, C, H, W]`` logits against ``[B, H, W]`` labels), over the classes that occur in
    the labels or the predictions, counted over all batches.

    >>> logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # one image, 2 classes, 1 x 2
    >>> mean_iou(nn.Identity(), [logits], [torch.tensor([[[0, 0]]])])
    0.25
    """
    hits, unions = [], []
    for batch, target in zip(batches, targets, strict=True):
        logits = _logits(model, batch)
        classes = logits.shape[1]
        predicted, target = logits.argmax(dim=1).flatten(), target.flatten()
        hit = torch.bincount(predicted[predicted == target], minlength=classes)
        hits.append(hit)
        unions.append(
            torch.bincount(predicted, minlength=classes)
            + torch.bincount(target, minlength=classes)
            - hit
        )
    if not hits:
        raise invalid("batches", batches, "at least one batch")
    intersection, union = torch.stack(hits).sum(0), torch.stack(unions).sum(0)
    present = union > 0
    return float((intersection[present].double() / union[present]).mean())


def subset_accuracy(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    """Fraction of samples whose predicted set of labels (``logit > 0`` of a multi-label
    classifier's ``[B, L]``) is exactly the target's (multi-hot ``[B, L]``).

    >>> logits = torch.tensor([[2.0, -1.0], [1.0, 1.0]])
    >>> subset_accuracy(nn.Identity(), [logits], [torch.tensor([[1, 0], [1, 0]])])
    0.5
    """
    correct = 0
    total = 0
    for batch, target in zip(batches, targets, strict=True):
        predicted = _logits(model, batch) > 0
        correct += int((predicted == target.bool()).all(dim=-1).sum())
        total += len(target)
    return correct / total


METRICS: dict[str, Metric] = {
    "classification": top1_accuracy,
    "language_model": top1_accuracy,
    "multilabel": subset_accuracy,
    "regression": negative_mse,
    "segmentation": mean_iou,
}


class WorkloadBuilder(Protocol):
    """What ``load_workload`` calls to build one named workload."""

    def __call__(
        self,
        *,
        seed: int,
        cache_dir: Path,
        n_calib: int,
        n_test: int | None,
        batch_size: int,
    ) -> Workload: ...


WORKLOADS: dict[str, WorkloadBuilder] = {}


def register_workload(name: str) -> Callable[[WorkloadBuilder], WorkloadBuilder]:
    """Decorator adding a builder to ``WORKLOADS`` under ``name``.

    >>> @register_workload("my_model")  # doctest: +SKIP
    ... def build(*, seed, cache_dir, n_calib, n_test, batch_size): ...
    """
    if not isinstance(name, str) or not name:
        raise invalid("name", name, "a non-empty string")

    def decorate(builder: WorkloadBuilder) -> WorkloadBuilder:
        if name in WORKLOADS:
            raise ValueError(f"A workload named {name!r} is already registered; pick another name.")
        WORKLOADS[name] = builder
        return builder

    return decorate


def batched(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``data`` along its first dimension into contiguous batches of ``batch_size``."""
    return [chunk.clone() for chunk in torch.split(data, batch_size)]


def labelled_workload(
    name: str,
    model: nn.Module,
    *,
    calib: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    task: Task = "classification",
    info: dict[str, Any],
) -> Workload:
    """A workload from ``(inputs, labels)`` calibration and test splits, cut into batches of
    ``batch_size``, with its fp32 quality measured into ``info["fp32_quality"]``."""
    test_batches = batched(test[0], batch_size)
    workload = Workload(
        name=name,
        model=model,
        calib=batched(calib[0], batch_size),
        test=test_batches,
        test_labels=batched(test[1], batch_size),
        example_input=test_batches[0].clone(),
        task=task,
        calib_labels=batched(calib[1], batch_size),
        info=info,
    )
    workload.info["fp32_quality"] = workload.evaluate(model)
    return workload


def check_int(argument: str, value: Any, *, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(argument, value, f"an integer >= {minimum}")


def take(argument: str, value: int | None, available: int, *, default: int | None = None) -> int:
    """How many samples to take: ``value`` (checked against ``available``) or ``default``."""
    if value is None:
        return available if default is None else min(default, available)
    check_int(argument, value, minimum=1)
    if value > available:
        raise invalid(argument, value, f"at most {available} (the samples this workload has)")
    return value


def split_indices(n: int, fractions: tuple[float, ...], *, seed: int) -> list[torch.Tensor]:
    """Split ``range(n)`` into disjoint random index sets with the given ``fractions``.

    The permutation is drawn from a generator seeded with ``seed``, so the split is the same
    on every call and every machine; the last set takes the rounding remainder.

    >>> [len(s) for s in split_indices(10, (0.6, 0.2, 0.2), seed=0)]
    [6, 2, 2]
    """
    check_int("n", n, minimum=len(fractions))
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise invalid("fractions", fractions, "positive numbers summing to 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(f * n) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    return list(torch.split(order, sizes))


def load_workload(
    name: str,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    n_calib: int = 256,
    n_test: int | None = None,
    batch_size: int = 32,
) -> Workload:
    """Build one of the bundled reference workloads (see ``WORKLOADS``), training it if needed.

    ``seed`` fixes the data split, the initialisation and the training run. Trained weights
    are cached in ``cache_dir`` (default ``$MPSEARCH_CACHE/workloads`` or
    ``~/.cache/mpsearch/workloads``), so later calls are fast. ``n_calib`` is the number of
    calibration samples (sequences for the language model), ``n_test`` the number of test
    samples (``None``: the workload's default), ``batch_size`` the samples per batch.

    >>> wl = load_workload("digits_cnn", seed=0)  # doctest: +SKIP
    >>> wl.evaluate(wl.model) >= 0.95  # doctest: +SKIP
    True
    """
    if not isinstance(name, str) or name not in WORKLOADS:
        raise unknown("name", name, WORKLOADS)
    check_int("seed", seed, minimum=0)
    check_int("n_calib", n_calib, minimum=1)
    if n_test is not None:
        check_int("n_test", n_test, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    directory = resolve_cache_dir(cache_dir)
    return WORKLOADS[name](
        seed=seed, cache_dir=directory, n_calib=n_calib, n_test=n_test, batch_size=batch_size
    )
