"""Calibration data: any iterable of batches (tensors, tuples, dicts) or a DataLoader."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from mpsearch._validation import invalid

Batch = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]


def as_batches(data: Any, *, argument: str = "calib_data") -> list[Batch]:
    """Materialise calibration data as a list of batches, refusing empty or malformed input.

    >>> len(as_batches([torch.zeros(2, 3), torch.zeros(2, 3)]))
    2
    """
    if isinstance(data, torch.Tensor):
        batches: list[Batch] = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        batches = list(data)
    elif isinstance(data, Mapping):
        batches = [data]
    else:
        raise invalid(
            argument, data, "an iterable of batches (tensors, tuples or dicts) or a DataLoader"
        )
    if not batches:
        raise invalid(argument, data, "a non-empty iterable of batches")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
            raise invalid(
                f"{argument}[{i}]", batch, "a tensor, a tuple/list of tensors or a dict of tensors"
            )
    return batches


def call_args(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments a batch is passed as: ``(x,)``, ``batch`` or
    ``**batch``.

    >>> call_args({"input_ids": 1})
    ((), {'input_ids': 1})
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    return tuple(batch), {}


def run_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one batch: ``model(x)``, ``model(*batch)`` or ``model(**batch)``."""
    args, kwargs = call_args(batch)
    return model(*args, **kwargs)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output: the tensor itself; ``logits`` (or ``out``,
    ``output``) of a dict or a ``ModelOutput``; else the first floating-point tensor among a
    dict's values or a tuple's items, each taken as its own main tensor (the first tensor where
    none is floating: an audio codec's codes come before its waveform), passing over a loss (a
    field whose name ends in ``loss``: an audio codec's per-sample commitment loss) and a
    scalar (a loss, the batch's mean: a forecasting model's output holds one before its
    predicted distribution's parameters) where another output follows. One dict per sample (a
    detector's detections) raises ``TypeError`` saying what to profile instead
    (:func:`per_sample_message`).

    >>> output_tensor((torch.zeros(2, dtype=torch.long), torch.ones(2))).dtype
    torch.float32
    """
    return main_output(output)[0]


MULTI_LABEL_PROBLEM = "multi_label_classification"
"""A Hugging Face config's ``problem_type`` for classifiers with one sigmoid per label."""


def is_multi_label(model: Any) -> bool:
    """Whether ``model`` is a multi-label classifier: a Hugging Face model whose
    ``config.problem_type`` is :data:`MULTI_LABEL_PROBLEM` (its logits are one independent
    sigmoid per label, trained with ``BCEWithLogitsLoss``, not a softmax over classes).

    >>> is_multi_label(nn.Linear(2, 2))
    False
    """
    config = getattr(model, "config", None)
    return getattr(config, "problem_type", None) == MULTI_LABEL_PROBLEM


MASK_KEYS = ("decoder_attention_mask", "attention_mask")
"""Batch keys whose ``[B, T]`` 0/1 mask says which positions of a per-token output are real
tokens (a decoder's first: its logits follow the decoder's tokens)."""


def token_mask(batch: Batch, output: torch.Tensor) -> torch.Tensor | None:
    """Which positions of a per-token ``output`` ``[B, T, ...]`` hold real tokens: the batch's
    :data:`MASK_KEYS` mask (bool ``[B, T]``) whose shape is ``output``'s first two dimensions;
    ``None`` where there is none (a tensor batch, a mask of other positions, an output of one
    answer per sample), or where it masks nothing.

    >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> token_mask({"input_ids": mask, "attention_mask": mask}, torch.zeros(2, 3, 5)).tolist()
    [[True, True, False], [True, True, True]]
    >>> token_mask({"attention_mask": mask}, torch.zeros(2, 5)) is None
    True
    """
    if not isinstance(batch, Mapping) or output.dim() < 3:
        return None
    for key in MASK_KEYS:
        mask = batch.get(key)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(output.shape[:2]):
            mask = mask.bool().to(output.device)
            return None if bool(mask.all()) else mask
    return None


def main_output(output: Any) -> tuple[torch.Tensor, str | None]:
    """:func:`output_tensor` and the name it has in the output: the key of the dict or
    ``ModelOutput`` field holding it (the innermost), ``None`` for a tensor returned as it is
    or as a tuple's item (what the default metric reads: :func:`~mpsearch.profile.auto_metric`).

    >>> main_output({"loss": torch.tensor(0.5), "last_hidden_state": torch.ones(2, 3)})[1]
    'last_hidden_state'
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and all(isinstance(o, Mapping) for o in output):
        raise TypeError(per_sample_message(output))
    if isinstance(output, Mapping):
        for key in ("logits", "out", "output"):
            if key in output:
                return _named(output[key], key)
        items = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = [(None, item) for item in output]
    elif hasattr(output, "logits"):
        return _named(output.logits, "logits")
    else:
        items = []
    found = []
    for key, item in items:
        try:
            found.append(_named(item, key))
        except TypeError:  # None, a cache object...
            continue
    if not found:
        raise TypeError(
            f"Cannot find an output tensor in a model output of type {type(output).__name__}."
        )
    found = [f for f in found if not (f[1] or "").endswith("loss")] or found
    floating = [f for f in found if f[0].is_floating_point() or f[0].is_complex()]
    return next((f for f in floating if f[0].dim()), floating[0] if floating else found[0])


def _named(item: Any, key: Any) -> tuple[torch.Tensor, str | None]:
    tensor, name = main_output(item)
    return tensor, name if name is not None else (key if isinstance(key, str) else None)


def per_sample_message(output: Sequence[Mapping[str, Any]]) -> str:
    """Why an output of one dict per sample (a detector's detections) cannot be compared."""
    keys = ", ".join(repr(k) for k in list(output[0])[:4])
    return (
        f"The model returns one dict per sample (a {type(output).__name__} of {len(output)} "
        f"dicts with {keys}), as a detector returns its detections after post-processing: "
        "their number changes with the precision, so a quantized output cannot be compared "
        "with the fp32 one. Profile, search and quantize a module that returns the raw "
        "predictions before post-processing (for a torchvision SSD, RetinaNet or FCOS: "
        "head(list(backbone(images).values())); README, 'Detection models')."
    )


def batch_size(batch: Batch) -> int:
    """Number of samples in a batch (leading dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() else 1
    return 1


def copied(value: Any) -> Any:
    """``value`` with every tensor in it copied (detached): what a later in-place operation of
    the model cannot change."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)
