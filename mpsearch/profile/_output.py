"""Which output of a model is scored: :func:`select_output` makes a model return one field of
its output (or what a function computes from it), with its layers' names unchanged."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from mpsearch._validation import check_module, wrong_type
from mpsearch.layers._layers import rebuilt

OutputSelector = str | Callable[[Any], Any]


class SelectedOutput(nn.Module):
    """Marks the models :func:`select_output` builds. Their classes are made at run time (a
    subclass of the model's own class), so a pickle names the model's class and rebuilds them;
    a callable selector must be picklable for that (a module-level function, not a lambda)."""

    _mps_output: OutputSelector

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _rebuild, (type(self).__mro__[1], self.__dict__)


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _selected_class(kind: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``kind`` whose ``forward`` returns the selected output; it keeps
    ``kind.forward``'s signature (``functools.wraps``: the graph captures read it)."""
    if kind not in _CLASSES:

        @functools.wraps(kind.forward)
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return _select(kind.forward(self, *args, **kwargs), self._mps_output)

        _CLASSES[kind] = type(kind.__name__, (kind, SelectedOutput), {"forward": forward})
    return _CLASSES[kind]


def _rebuild(kind: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    return rebuilt(_selected_class(kind), state)


def _select(output: Any, selector: OutputSelector) -> Any:
    if callable(selector):
        return selector(output)
    if isinstance(output, Mapping) and selector in output:
        return {selector: output[selector]}
    if not isinstance(output, Mapping) and hasattr(output, selector):
        return {selector: getattr(output, selector)}
    fields = list(output) if isinstance(output, Mapping) else []
    raise KeyError(
        f"select_output: the model's output ({type(output).__name__}) has no field "
        f"{selector!r}" + (f"; its fields: {', '.join(map(repr, fields))}" if fields else "")
    )


def select_output(model: nn.Module, output: OutputSelector) -> nn.Module:
    """``model`` returning only the output that profile, search, recover, export checks and the
    controller should compare: the field ``output`` of its dict or ``ModelOutput`` (returned
    as ``{output: value}``, so the default metric reads its name: ``"pred_boxes"`` is
    compared by MSE, :func:`~mpsearch.profile.auto_metric`), or what ``output(model_output)``
    returns (a tensor, or a dict naming it).

    Without it the ``logits`` are compared, else the first floating-point tensor. The returned
    model shares ``model``'s layers and parameters and is an instance of a subclass of its
    class: layer names, plans and state dicts are the same, so a plan searched on it
    quantizes ``model`` itself. The user's model is not changed.

    >>> import torch
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 6)
    ...     def forward(self, x):
    ...         y = self.fc(x)
    ...         return {"logits": y[:, :2], "boxes": y[:, 2:]}
    >>> net = Net()
    >>> boxes = select_output(net, "boxes")
    >>> list(boxes(torch.zeros(1, 4))), [n for n, _ in boxes.named_modules()], boxes.fc is net.fc
    (['boxes'], ['', 'fc'], True)
    """
    check_module(model)
    if not (isinstance(output, str) or callable(output)):
        raise wrong_type(
            "output", output, "a field name of the model's output or a callable(output) -> tensor"
        )
    kind = type(model).__mro__[1] if isinstance(model, SelectedOutput) else type(model)
    selected = copy.copy(model)  # shares the layers
    selected.__class__ = _selected_class(kind)
    for name, value in vars(model).items():  # its own children, parameters and hooks tables
        if isinstance(value, (dict, set)):
            selected.__dict__[name] = copy.copy(value)
    selected.__dict__["_mps_output"] = output
    return selected
