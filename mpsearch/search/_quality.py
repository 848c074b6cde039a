"""Quality of a plan: the user's ``evaluate(model)`` or fidelity to the fp32 model."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mpsearch._data import (
    as_batches,
    is_multi_label,
    main_output,
    output_tensor,
    run_model,
    token_mask,
)
from mpsearch.backends import get_backend
from mpsearch.layers import quantizable_layers, swapped
from mpsearch.profile._metrics import (
    AGREEMENT,
    CLASS_DIMS,
    E2E_METRICS,
    answers_agree,
    auto_metric,
)
from mpsearch.rounding import Rounder
from mpsearch.schemes import get_scheme


def quality_value(value: Any) -> float:
    """``value`` as a float when it is a finite number, else ``ValueError`` (what ``evaluate``
    must return).

    >>> quality_value(np.float32(0.5))
    0.5
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating))
        or not math.isfinite(value)
    ):
        raise ValueError(f"evaluate returned {value!r}; it must return a finite number")
    return float(value)


class Fidelity:
    """Agreement of a model with the fp32 model's outputs on held-out data (no labels needed).

    Scored as a profile with end-to-end ``metric`` compares outputs (``None`` or a callable's
    name: the metric :func:`~mpsearch.profile.auto_metric` picks for the fp32 output of
    ``reference``, a multi-label classifier or not). Class scores (``"kl"``: classes in the
    last dimension, ``"kl_channels"``: in dimension 1, a segmentation model's pixels) score the
    fraction of positions whose arg-max agrees; a multi-label classifier's logits
    (``"bernoulli_kl"``) the fraction of samples given the same set of labels; other outputs
    (``"mse"``, or ``regression=True``: raw box predictions, hidden states, several regression
    targets) score ``1 - MSE / Var(reference)`` (1 is perfect). Per-token answers leave out
    the padding a dict batch's ``attention_mask`` marks (:func:`~mpsearch._data.token_mask`).
    A batch on which ``model``'s
    output has another shape than the reference's (a length the model predicts changed)
    agrees nowhere, or counts as predicting the reference's mean (``1 - MSE / Var`` of 0 on
    it).

    >>> net = nn.Linear(4, 3).eval()
    >>> Fidelity(net, [torch.randn(16, 4)])(net)
    1.0
    """

    def __init__(
        self,
        reference: nn.Module,
        data: Iterable[Any],
        *,
        metric: str | None = None,
        regression: bool = False,
    ) -> None:
        self.batches = as_batches(data, argument="eval_data")
        with torch.inference_mode():
            outputs = [main_output(run_model(reference, b)) for b in self.batches]
        self.reference = [out.float() for out, _ in outputs]
        if regression:
            metric = "mse"
        elif metric not in E2E_METRICS:
            metric = auto_metric(
                outputs[0][0], outputs[0][1], multi_label=is_multi_label(reference)
            )
        first = self.reference[0]
        dim = CLASS_DIMS.get(metric)  # class scores need 2 classes (a forced "kl" on [B, 1])
        answers = metric in AGREEMENT and first.dim() >= 2
        self.answers = metric if answers and (dim is None or first.shape[dim] >= 2) else None
        self.positions: list[torch.Tensor] = []  # per batch: the positions counted (real tokens)
        if self.answers is not None:
            for batch, ref in zip(self.batches, self.reference, strict=True):
                every = answers_agree(ref, ref, self.answers)
                mask = token_mask(batch, ref)
                self.positions.append(
                    mask if mask is not None and mask.shape == every.shape else every
                )
        if not all(torch.isfinite(r).all() for r in self.reference):
            raise ValueError(
                "The fp32 model gives NaN or inf outputs on 'eval_data'; check the data."
            )

    def __call__(self, model: nn.Module) -> float:
        agree, total, sq, var = 0.0, 0, 0.0, 0.0
        with torch.inference_mode():
            for b, (batch, ref) in enumerate(zip(self.batches, self.reference, strict=True)):
                out = output_tensor(run_model(model, batch)).float()
                same = out.shape == ref.shape  # else a decision in the model (a length) changed
                if self.answers is not None:
                    counted = self.positions[b]
                    if same:
                        agree += float((answers_agree(out, ref, self.answers) & counted).sum())
                    total += int(counted.sum())
                else:
                    spread = float(((ref - ref.mean()) ** 2).sum())
                    sq += float(((out - ref) ** 2).sum()) if same else spread
                    var += spread
        if self.answers is not None:
            return agree / total
        return 1.0 - sq / max(var, 1e-12)


class PlanRunner:
    """Runs ``evaluate`` on ``model`` with a plan's layers swapped in, restoring them after.

    Quantized layers are built once per (layer, choice) and reused across plans, so a trial
    costs one evaluation, never a re-quantization of the whole model. A choice with a
    calibrated rounding (``"w4a16+gptq"``) takes its rounded weights from ``rounder`` (e.g. the
    profile's). A lock serialises evaluations that share the model.
    """

    def __init__(
        self, model: nn.Module, *, backend: str = "simulate", rounder: Rounder | None = None
    ) -> None:
        self.model = model
        self.rounder = rounder
        self.backend = get_backend(backend)
        self.layers = quantizable_layers(model)
        self._cache: dict[tuple[str, str], nn.Module] = {}
        self._lock = threading.Lock()

    def layer(self, name: str, scheme: str) -> nn.Module:
        key = (name, scheme)
        if key not in self._cache:
            chosen = get_scheme(scheme)
            layer = self.layers[name]
            # the profile's rounder knows the layers its graph calls: not a never-called layer
            # that follows its tied copy's scheme (round to nearest, nothing to correct)
            known = self.rounder is not None and name in self.rounder.layers
            if chosen.rounding != "rtn" and not known:
                raise ValueError(
                    f"Layer {name!r} in {scheme!r} needs calibrated rounding, but the search "
                    "has no rounder for it: profile with that choice (the profile's rounder is "
                    "used)."
                )
            if known:
                assert self.rounder is not None
                layer = self.rounder.layer(name, chosen)
            self._cache[key] = self.backend.quantize_layer(layer, chosen)
        return self._cache[key]

    def __call__(
        self, assignment: Mapping[str, str], evaluate: Callable[[nn.Module], float]
    ) -> float:
        with self._lock:
            swaps = {n: self.layer(n, s) for n, s in assignment.items() if s != "fp32"}
            with swapped(self.model, swaps):
                return evaluate(self.model)
