"""Example and check inputs of an export: positional tensors or keyword tensors (a dict batch,
e.g. ``input_ids`` and ``attention_mask``), as one ``ModelCall``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from mpsearch._data import call_args
from mpsearch._validation import invalid

ACCEPTED = "a tensor, a tuple of tensors or a dict of tensors (keyword inputs)"


class ModelCall(NamedTuple):
    """How to call the model on one input: ``model(*args, **kwargs)``."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]

    def __call__(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def dynamic_shapes(self, dim: Any) -> Any:
        """``torch.export`` dynamic shapes: ``dim`` on the leading dimension of every tensor."""

        def spec(value: Any) -> Any:
            return {0: dim} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

        if self.kwargs:
            return {name: spec(value) for name, value in self.kwargs.items()}
        return tuple(spec(a) for a in self.args)

    def keeping(self, names: Collection[str]) -> ModelCall:
        """This call with only the keywords ``names`` (those an exported program takes: it
        drops the ones the model swallowed in ``**kwargs``)."""
        return ModelCall(self.args, {k: v for k, v in self.kwargs.items() if k in names})

    def tensors(self) -> list[torch.Tensor]:
        """The input tensors in call order (ONNX feeds them in this order)."""
        values = [*self.args, *self.kwargs.values()]
        return [v for v in values if isinstance(v, torch.Tensor)]


def as_call(example: Any, argument: str, *, model: nn.Module | None = None) -> ModelCall:
    """``example`` as a :class:`ModelCall`; a dict batch becomes keyword inputs, with the
    model's ``use_cache`` turned off where its ``forward`` takes one and the batch does not
    say (exported programs and ONNX graphs hold no cache objects)."""
    if not isinstance(example, (torch.Tensor, Mapping, tuple, list)):
        raise invalid(argument, example, ACCEPTED)
    args, kwargs = call_args(example)
    values = [*args, *kwargs.values()]
    named = all(isinstance(k, str) for k in kwargs)
    if not values or not named or not all(isinstance(v, torch.Tensor) for v in values):
        raise invalid(argument, example, ACCEPTED)
    if kwargs and model is not None and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return ModelCall(args, kwargs)


def check_same_shape(i: int, got: torch.Tensor, want: torch.Tensor) -> None:
    """``ValueError`` where an exported file's output ``got`` on check input ``i`` has another
    shape than ``want``, the output of the model it was written from (a length the model
    predicts changed with the precision): compared, they would broadcast or raise."""
    if got.shape != want.shape:
        raise ValueError(
            f"on check input {i}, the file's output has shape {tuple(got.shape)} where the "
            f"model it was written from gives {tuple(want.shape)}"
        )
