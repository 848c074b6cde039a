"""``RecoverOptions``: the less common knobs of ``recover``, in one frozen, validated object."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mpsearch._options import Check, Options, non_negative_int, positive_int, positive_number
from mpsearch._validation import invalid, unknown

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: tuple[str, ...] = ("auto", "kl", "kl_channels", "bernoulli_kl", "mse")
TRAIN_MODES: tuple[str, ...] = ("layers", "all")


def _loss(name: str, value: Any) -> str | LossFn:
    if isinstance(value, str):
        if value not in LOSSES:
            raise unknown(name, value, LOSSES, kind="option")
        return value
    if callable(value):
        return value
    raise invalid(
        name,
        value,
        f"one of {list(LOSSES)} or a callable (student, teacher) -> loss",
        kind="option",
    )


def _train(name: str, value: Any) -> str:
    if value not in TRAIN_MODES:
        raise unknown(name, value, TRAIN_MODES, kind="option")
    return value


def _non_negative_number(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise invalid(name, value, "a finite number >= 0", kind="option")
    return value


@dataclass(frozen=True)
class RecoverOptions(Options):
    """How :func:`~mpsearch.recover.recover` trains (the common knobs stay on the verb).

    - ``loss``: the distillation loss against the fp32 model's outputs: ``"kl"`` (KL divergence
      of the softmax over the last dimension, at ``temperature``, scaled by its square),
      ``"kl_channels"`` (the same over dimension 1: a segmentation model's ``[B, C, H, W]``),
      ``"bernoulli_kl"`` (a multi-label classifier's sigmoids: the KL of each label's
      Bernoulli at ``temperature``, the mean over labels, scaled by its square),
      ``"mse"``, ``"auto"`` (the profile's default metric:
      :func:`~mpsearch.profile.auto_metric`) or a callable
      ``(student_out, teacher_out) -> scalar tensor``;
    - ``temperature``: the temperature of the KL losses;
    - ``train``: ``"layers"`` (the weights and biases of the layers the plan quantizes) or
      ``"all"`` (every parameter but those of the layers left frozen);
    - ``eval_every``: steps between two held-out evaluations (and one at the end);
    - ``val_batches``: how many of the last calibration batches are held out for validation;
    - ``weight_decay``: AdamW's decoupled weight decay (0: Adam);
    - ``seed``: the batch order and torch's RNG inside the run;
    - ``checkpoint_every``: steps between two checkpoints (and one at the end);
    - ``min_samples``: the fewest calibration samples accepted.

    >>> RecoverOptions(loss="mse", eval_every=10).eval_every
    10
    >>> RecoverOptions(train="some")
    Traceback (most recent call last):
    ...
    ValueError: The 'train' option must be one of 'all', 'layers'. Got 'some' instead.
    """

    loss: str | LossFn = "auto"
    temperature: float = 1.0
    train: str = "layers"
    eval_every: int = 25
    val_batches: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    min_samples: int = 16

    CHECKS: ClassVar[dict[str, Check]] = {
        "loss": _loss,
        "temperature": positive_number,
        "train": _train,
        "eval_every": positive_int,
        "val_batches": positive_int,
        "weight_decay": _non_negative_number,
        "seed": non_negative_int,
        "checkpoint_every": positive_int,
        "min_samples": positive_int,
    }
    VERB: ClassVar[str] = "recover"
