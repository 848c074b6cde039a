"""Finding quantizable layers and swapping them in and out of a model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch._validation import check_module, wrong_type

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def register_quantizable_type(module_type: type[nn.Module]) -> None:
    """Make layers of ``module_type`` quantizable (they need a ``weight`` and a backend handler)."""
    global QUANTIZABLE_TYPES
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise wrong_type("module_type", module_type, "an nn.Module subclass")
    if module_type not in QUANTIZABLE_TYPES:
        QUANTIZABLE_TYPES = (*QUANTIZABLE_TYPES, module_type)


def is_quantizable(module: nn.Module) -> bool:
    return type(module) in QUANTIZABLE_TYPES


def quantizable_layers(model: nn.Module, *, require: bool = True) -> dict[str, nn.Module]:
    """``{name: module}`` of the quantizable layers (Linear, Conv1d, Conv2d), in model order.

    Names are those of ``model.named_modules()``. A model with none is refused unless
    ``require=False``.

    >>> list(quantizable_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))))
    ['0', '2']
    """
    check_module(model)
    found = {name: m for name, m in model.named_modules() if name and is_quantizable(m)}
    if require and not found:
        kinds = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
        raise ValueError(
            f"The model ({type(model).__name__}) has no quantizable layers: mpsearch quantizes {kinds}. "
            "Register other layer types with mpsearch.layers.register_quantizable_type."
        )
    return found


def replace_layers(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module of ``replacements`` at its name in ``model``; return the modules replaced."""
    previous: dict[str, nn.Module] = {}
    for name, module in replacements.items():
        previous[name] = model.get_submodule(name)
        model.set_submodule(name, module)
    return previous


@contextmanager
def swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily swap layers of ``model``; the originals are put back in ``finally``.

    The original modules are re-inserted as they were (same objects), so their parameters
    are bit-identical afterwards.
    """
    previous = replace_layers(model, replacements)
    try:
        yield model
    finally:
        replace_layers(model, previous)


def layer_forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run ``layer``'s own operation on ``x`` with a substitute ``weight`` and ``bias``."""
    for kind, forward in _FORWARDS.items():
        if isinstance(layer, kind):
            return forward(layer, x, weight, bias)
    raise TypeError(f"No functional forward is registered for {type(layer).__name__}.")


_FORWARDS: dict[type[nn.Module], Callable[[Any, Tensor, Tensor, Tensor | None], Tensor]] = {
    nn.Linear: lambda layer, x, w, b: F.linear(x, w, b),
    nn.Conv1d: lambda layer, x, w, b: layer._conv_forward(x, w, b),
    nn.Conv2d: lambda layer, x, w, b: layer._conv_forward(x, w, b),
}
