"""Capturing a model as one graph for the graph runner: torch.fx, else torch.export.

The captures in :data:`CAPTURES` are tried in order (the runner then checks that the graph
reproduces the model's output on the first batch):

- ``fx``: ``torch.fx.symbolic_trace``. Each quantizable layer is a ``call_module`` node.
- ``fx(concrete_args)``: the same, with every ``forward`` parameter the batches leave out and
  whose default is a constant (``forward(x, embed=False)`` with ``if embed:``) fixed to that
  default.
- ``export``: ``torch.export.export(..., strict=False)`` on the first batch, the batch
  dimension and every dimension that differs between the batches dynamic: models fx cannot
  trace (Hugging Face transformers). While exporting, each quantizable layer's forward is the opaque custom op
  ``mpsearch::layer`` (so the layer stays one node with one input); those nodes are then made
  ``call_module`` nodes of the layer itself, the rest of the graph being ATen operations.

A capture is the graph module, how a batch binds to its placeholders and where the main output
tensor is in what its output node holds.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from mpsearch._data import Batch, call_args, output_tensor

CONSTANT_TYPES: tuple[type, ...] = (bool, int, float, str, type(None))
"""Defaults of ``forward`` parameters that ``fx(concrete_args)`` fixes."""


Inputs = Callable[[Batch], list[Any]]
"""A batch -> its graph placeholders' values, in graph order."""


class Unsupported(Exception):
    """The graph runner cannot handle this model (the next capture, or the hook runner)."""


@dataclass(frozen=True)
class Capture:
    """A model as one graph module: ``inputs(batch)`` gives its placeholders' values (in graph
    order), ``output(value)`` the main output tensor from its output node's value, and
    ``folds_batchnorm`` whether BatchNorm modules are nodes that can be folded."""

    gm: fx.GraphModule
    inputs: Inputs
    output: Callable[[Any], Tensor] = output_tensor
    folds_batchnorm: bool = True


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


# -- torch.fx ---------------------------------------------------------------------------------
def _signature_inputs(signature: inspect.Signature, gm: fx.GraphModule) -> Inputs:
    """Placeholder values bound by name from ``forward``'s signature (fx placeholders are
    named after its parameters; a fixed parameter's placeholder holds its value)."""
    placeholders = _placeholders(gm)

    def inputs(batch: Batch) -> list[Any]:
        args, kwargs = call_args(batch)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = []
        for node in placeholders:
            name = node.target.lstrip("*")
            if name in bound.arguments:
                values.append(bound.arguments[name])
            elif node.args:
                values.append(node.args[0])
            else:
                raise Unsupported(f"cannot bind the model input {name!r}")
        return values

    return inputs


def constant_defaults(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """``forward``'s parameters that ``batch`` leaves out and whose default is a constant.

    >>> class Net(nn.Module):
    ...     def forward(self, x, embed=False, scale=None): ...
    >>> constant_defaults(Net(), torch.zeros(1))
    {'embed': False, 'scale': None}
    """
    signature = inspect.signature(model.forward)
    args, kwargs = call_args(batch)
    given = signature.bind_partial(*args, **kwargs).arguments
    return {
        name: param.default
        for name, param in signature.parameters.items()
        if name not in given and isinstance(param.default, CONSTANT_TYPES)
    }


def capture_fx(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]) -> Capture:
    """``torch.fx.symbolic_trace(model)``."""
    gm = fx.symbolic_trace(model)
    return Capture(gm, _signature_inputs(inspect.signature(model.forward), gm))


def capture_fx_concrete(
    model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]
) -> Capture:
    """``torch.fx.symbolic_trace`` with :func:`constant_defaults` as ``concrete_args``."""
    concrete = constant_defaults(model, batches[0])
    if not concrete:
        raise Unsupported("forward has no parameter with a constant default to fix")
    gm = fx.symbolic_trace(model, concrete_args=concrete)
    return Capture(gm, _signature_inputs(inspect.signature(model.forward), gm))


# -- torch.export -----------------------------------------------------------------------------
_OPAQUE: dict[str, nn.Module] = {}
"""The layers replaced by ``mpsearch::layer`` while a model is exported, by name."""


def _original_forward(layer: nn.Module, x: Tensor) -> Tensor:
    return type(layer).forward(layer, x)


@torch.library.custom_op("mpsearch::layer", mutates_args=())
def _layer_op(x: Tensor, name: str) -> Tensor:
    """Quantizable layer ``name`` applied to ``x``, one opaque node in an exported graph."""
    return _original_forward(_OPAQUE[name], x)


@_layer_op.register_fake
def _(x: Tensor, name: str) -> Tensor:
    return _original_forward(_OPAQUE[name], x)


def _opaque_call(name: str, x: Tensor) -> Tensor:
    return torch.ops.mpsearch.layer(x, name)


@contextmanager
def _opaque_layers(model: nn.Module, layers: Sequence[str]) -> Iterator[None]:
    """Each of ``layers`` calls ``mpsearch::layer`` instead of its own forward, meanwhile."""
    for name in layers:
        layer = model.get_submodule(name)
        _OPAQUE[name] = layer
        layer.forward = partial(_opaque_call, name)
    try:
        yield
    finally:
        for name in layers:
            del model.get_submodule(name).forward
            _OPAQUE.pop(name, None)


def _dynamic(batches: Sequence[Batch]) -> dict[str, Any]:
    """Dynamic shapes by forward argument: the batch dimension of every tensor, and every other
    dimension that differs between the batches (e.g. a padded sequence length); the rest
    static, which keeps the export fast (all dimensions dynamic costs about 2x more)."""
    args, kwargs = call_args(batches[0])
    flats = [pytree.tree_flatten(call_args(b))[0] for b in batches]

    def varying(i: int, t: Tensor) -> dict[int, Any]:
        shapes = {tuple(f[i].shape) for f in flats if i < len(f) and isinstance(f[i], Tensor)}
        dims = {0} | {d for d in range(t.dim()) if len({s[d] for s in shapes if len(s) > d}) > 1}
        return dict.fromkeys(sorted(d for d in dims if d < t.dim()), Dim.AUTO)

    leaves, spec = pytree.tree_flatten((args, kwargs))
    specs = [
        varying(i, t) if isinstance(t, Tensor) and t.dim() else None for i, t in enumerate(leaves)
    ]
    dyn_args, dyn_kwargs = pytree.tree_unflatten(specs, spec)
    return dyn_args, dyn_kwargs


def _flat_inputs(in_spec: pytree.TreeSpec, gm: fx.GraphModule) -> Inputs:
    """Placeholder values: the batch's ``(args, kwargs)`` flattened, in the structure and in
    the static dimensions the graph was exported with."""
    placeholders = _placeholders(gm)

    def inputs(batch: Batch) -> list[Any]:
        args, kwargs = call_args(batch)
        flat, spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
        if spec != in_spec:
            raise Unsupported(f"a batch of structure {spec} where the graph takes {in_spec}")
        for node, value in zip(placeholders, flat, strict=True):
            example = node.meta.get("val")
            if isinstance(value, Tensor) and isinstance(example, Tensor):
                static = [d if isinstance(d, int) else None for d in example.shape]
                if len(static) != value.dim() or any(
                    s is not None and s != d for s, d in zip(static, value.shape, strict=True)
                ):
                    raise Unsupported(
                        f"input {node.name!r} of shape {tuple(value.shape)} where the graph "
                        f"was exported for {tuple(example.shape)}"
                    )
        return flat

    return inputs


def _unflattened_output(out_spec: pytree.TreeSpec, value: Any) -> Tensor:
    return output_tensor(pytree.tree_unflatten(list(value), out_spec))


def _mutates(gm: fx.GraphModule) -> bool:
    return any(
        isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
        for node in gm.graph.nodes
    )


def capture_export(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]) -> Capture:
    """``torch.export.export(model, strict=False)`` on the first batch, layers kept opaque."""
    args, kwargs = call_args(batches[0])
    kwargs = dict(sorted(kwargs.items()))
    dyn_args, dyn_kwargs = _dynamic(batches)
    bound = inspect.signature(model.forward).bind(*dyn_args, **dyn_kwargs)
    dynamic = dict(bound.arguments)
    with _opaque_layers(model, layers):
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        if _mutates(program.graph_module):
            with warnings.catch_warnings():  # torch's own deprecation notice, not the user's
                warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)
                program = program.run_decompositions({})  # functional: cached values stay intact
    gm = program.module()
    # ``module()`` makes train()/eval() raise; the graph is fixed in eval mode either way and
    # ``evaluate`` callables call eval()
    del gm.train, gm.eval
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.mpsearch.layer.default:
            x, name = node.args
            node.op, node.target, node.args = "call_module", name, (x,)
            gm.add_submodule(name, model.get_submodule(name))
        elif node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)  # e.g. a layer's weight: the layer may be swapped out
    gm.recompile()
    spec = program.call_spec
    output = partial(_unflattened_output, spec.out_spec)
    return Capture(gm, _flat_inputs(spec.in_spec, gm), output, folds_batchnorm=False)


CAPTURES: dict[str, Callable[[nn.Module, Sequence[Batch], Sequence[str]], Capture]] = {
    "fx": capture_fx,
    "fx(concrete_args)": capture_fx_concrete,
    "export": capture_export,
}
"""The ways a model is captured as a graph, tried in this order: ``name -> capture(model,
batches, layers)`` (the model is the runner's own copy, which the capture may keep)."""
