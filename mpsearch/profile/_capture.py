"""Capturing a model as one graph for the graph runner: torch.fx, else torch.export.

The captures in :data:`CAPTURES` are tried in order (the runner then checks that the graph
reproduces the model's output on the first batch):

- ``fx``: ``torch.fx.symbolic_trace``. Each quantizable layer is a ``call_module`` node.
- ``fx(concrete_args)``: the same, with every ``forward`` parameter the batches leave out and
  whose default is a constant (``forward(x, embed=False)`` with ``if embed:``) fixed to that
  default.
- ``fx(values)``: torch.fx tracing of a forward that takes only what the batches give (so
  ``forward(input_ids=None, ..., **kwargs)`` traces), with each graph value also computed on two
  small examples (the first batch's first 2 and first 3 samples). Python control flow, ``len``
  and indexing on a traced value take its value on the examples: only where that value depends
  on shapes and constants, never on the input data, and is the same on both examples (not on
  the batch size); anything else ends the trace. Models fx cannot trace symbolically (Hugging
  Face transformers: checks on ``attention_mask.ndim``, ``query.shape[2] > 1``...) trace in
  a fraction of ``export``'s time (hf_llama: about 0.1 s of CPU time against 0.5-0.8 s).
  Needs batches that differ in their first dimension only.
- ``export``: ``torch.export.export(..., strict=False)`` on the first batch, the batch
  dimension and every dimension that differs between the batches dynamic, and caches off
  (``use_cache=False`` where ``forward`` takes it and the batches leave it out): models the fx
  captures cannot trace. While exporting, each quantizable layer's forward is the opaque custom
  op ``mpsearch::layer`` (so the layer stays one node with one input); those nodes are then made
  ``call_module`` nodes of the layer itself, the rest of the graph being ATen operations.

A capture is the graph module, how a batch binds to its placeholders and where the main output
tensor is in what its output node holds.
"""

from __future__ import annotations

import inspect
import operator
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

from mpsearch._data import Batch, batch_size, call_args, output_tensor
from mpsearch._torch_export import quiet_export
from mpsearch.layers._batchnorm import attributes_kept

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


class _LayerTracer(fx.Tracer):
    """``torch.fx`` tracing that keeps ``layers`` as ``call_module`` nodes: a layer subclass
    outside ``torch.nn`` (Gemma's scaled embedding) would otherwise be traced through."""

    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__()
        self.layers = set(layers)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.layers or super().is_leaf_module(
            m, module_qualified_name
        )


def _symbolic_trace(
    model: nn.Module, layers: Sequence[str], concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model, concrete_args)`` with ``layers`` kept as leaves."""
    with attributes_kept(model):
        graph = _LayerTracer(layers).trace(model, concrete_args=concrete_args)
    return fx.GraphModule(model, graph, type(model).__name__)


def capture_fx(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]) -> Capture:
    """``torch.fx.symbolic_trace(model)`` (``layers`` kept as leaves), for a ``forward`` with
    no parameter left to a constant default: those are traced fixed by
    :func:`capture_fx_concrete` (a flag traced as a graph input fails at its first ``if``, a
    ``None`` default is taken for a tensor), without a first trace that fails."""
    fixed = constant_defaults(model, batches[0])
    if fixed:
        raise Unsupported(
            f"forward's {', '.join(map(repr, fixed))} keep a constant default: "
            "traced fixed by fx(concrete_args)"
        )
    gm = _symbolic_trace(model, layers)
    return Capture(gm, _signature_inputs(inspect.signature(model.forward), gm))


def capture_fx_concrete(
    model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]
) -> Capture:
    """``torch.fx.symbolic_trace`` with :func:`constant_defaults` as ``concrete_args``."""
    concrete = constant_defaults(model, batches[0])
    if not concrete:
        raise Unsupported("forward has no parameter with a constant default to fix")
    gm = _symbolic_trace(model, layers, concrete)
    return Capture(gm, _signature_inputs(inspect.signature(model.forward), gm))


# -- torch.fx with example values -------------------------------------------------------------
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda"})
SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point"})
"""Attributes and methods of a traced tensor that give its metadata (not its data): values that
``fx(values)`` may take concretely for control flow."""

CONSTANT_ATTRIBUTES = frozenset({"dtype", "device", "layout", "is_cuda"})
"""Tensor attributes ``fx(values)`` takes as constants where both examples agree: they never
depend on the batch, and code passes them to functions fx cannot trace (``torch.finfo``)."""

SIZED_FACTORIES = ("ones", "zeros", "empty")
"""``torch`` functions taking a size as separate ints, which fx cannot trace when those are
traced values (``torch.ones(batch, length)`` in OPT): called with the size as one tuple while
``fx(values)`` traces."""

DATA_FACTORIES = ("tensor", "as_tensor")
"""``torch`` functions making a tensor from Python data, which cannot read a traced value: a
call on data holding one is traced while ``fx(values)`` traces."""

EXAMPLE_SIZES = (2, 3)
"""Batch sizes of ``fx(values)``'s two examples (no size 1: broadcasting special-cases it)."""


class _ValueProxy(fx.Proxy):
    """A traced value whose ``len``, ``int``, ``__index__`` and (where the examples agree)
    :data:`CONSTANT_ATTRIBUTES` are taken from the examples."""

    def __getattr__(self, name: str) -> Any:
        if name in CONSTANT_ATTRIBUTES:  # torch.finfo(x.dtype) needs the dtype itself (BLOOM)
            first, second = (getattr(v, name, None) for v in self.tracer.examples_of(self.node))
            if first is not None and first == second:
                return first
        return _ValueAttribute(self, name)

    def __setitem__(self, key: Any, value: Any) -> None:  # rewritten on a copy by the runner
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:  # a tensor's first dimension, a tuple's structure: not data
        return self.tracer.concrete(self.node, len, "len()", data=True)

    def __index__(self) -> int:
        return self.tracer.concrete(self.node, operator.index, "an index")

    def __int__(self) -> int:
        return self.tracer.concrete(self.node, int, "int()")


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    """A traced value's attribute (``x.shape``), with :class:`_ValueProxy`'s ``len``: Python
    asks for it when the attribute is unpacked as arguments (``x.new_zeros(n, *a.shape)`` in
    Mamba's scan)."""


class _ValueTracer(fx.Tracer):
    """fx tracing with every node's value on the examples alongside (see ``fx(values)``).

    ``examples``: each placeholder's values on the two examples; ``leaves``: module names kept
    as ``call_module`` nodes (besides torch.nn's own modules).
    """

    def __init__(self, leaves: set[str], examples: dict[str, tuple[Any, Any]]) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # ops on buffers are traced, not run once
        self.leaves = leaves
        self.examples = examples
        self.values: dict[fx.Node, tuple[Any, ...]] = {}
        self.static: set[fx.Node] = set()  # nodes computed from shapes and constants only
        self.computing = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> Any:
        if self.computing:
            return forward(*args, **kwargs)
        try:
            self.path_of_module(m)
        except NameError:  # a module object outside the model's tree: traced through
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def _value(self, node: fx.Node, i: int) -> Any:
        return self.values[node][i]

    def examples_of(self, node: fx.Node) -> tuple[Any, Any]:
        """``node``'s values on the two examples (parameters and buffers as themselves)."""
        was, self.computing = self.computing, True
        try:
            return self._value(node, 0), self._value(node, 1)
        finally:
            self.computing = was

    def _compute(self, node: fx.Node, i: int) -> Any:
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.root)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._value(n, i))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.root.get_submodule(node.target)(*args, **kwargs)

    def create_node(
        self,
        kind: str,
        target: Any,
        args: Any,
        kwargs: Any,
        name: str | None = None,
        type_expr: Any = None,
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            self.values[node] = self.examples[target]
        elif kind != "output":  # a get_attr (parameter or buffer, static) is read now: the
            # trace may set the attribute to a proxy next (Wav2Vec2-Conformer's ``self.pe = ...``)
            self.computing = True
            try:
                self.values[node] = tuple(self._compute(node, i) for i in range(2))
            finally:
                self.computing = False
            if (
                (kind == "call_function" and target is getattr and args[1] in SHAPE_ATTRIBUTES)
                or (kind == "call_method" and target in SHAPE_METHODS)
                or all(n in self.static for n in node.all_input_nodes)
            ):
                self.static.add(node)
        return node

    def concrete(
        self, node: fx.Node, read: Callable[[Any], Any], what: str, *, data: bool = False
    ) -> Any:
        """``read(value of node)``, the same on both examples, else a ``TraceError``; so is
        reading a value computed from the input data unless ``data`` (``read`` takes no data)."""
        if not data and node not in self.static:
            raise fx.proxy.TraceError(f"{what} of a value computed from the input data")
        first, second = (read(self._value(node, i)) for i in range(2))
        if first != second:
            raise fx.proxy.TraceError(f"{what} of a value that depends on the batch size")
        return first

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concrete(obj.node, bool, "control flow")

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter([obj[i] for i in range(len(obj))])


def _main_output(out: Any) -> Any:
    """What :func:`output_tensor` picks in a traced output (a proxy in the tensor's place)."""
    proxies: dict[int, fx.Proxy] = {}

    def mark(leaf: Any) -> Any:
        if not isinstance(leaf, fx.Proxy):
            return leaf
        examples = getattr(leaf.tracer, "examples_of", None)  # fx(values): the value's dtype
        example = examples(leaf.node)[0] if examples is not None else None
        dtype = example.dtype if isinstance(example, Tensor) else torch.float32
        marker = torch.empty(0, dtype=dtype)
        proxies[id(marker)] = leaf
        return marker

    main = output_tensor(pytree.tree_map(mark, out, is_leaf=lambda x: isinstance(x, fx.Proxy)))
    if id(main) not in proxies:
        raise Unsupported("the model's main output is not a traced value")
    return proxies[id(main)]


def _first(batch: Batch, n: int) -> Batch:
    full = batch_size(batch)

    def cut(t: Any) -> Any:
        return t[:n] if isinstance(t, Tensor) and t.dim() and t.shape[0] == full else t

    return pytree.tree_map(cut, batch)


def _trailing_shapes(batch: Batch) -> tuple[Any, list[Any]]:
    leaves, spec = pytree.tree_flatten(call_args(batch))
    return spec, [tuple(t.shape[1:]) if isinstance(t, Tensor) else t for t in leaves]


@contextmanager
def _traceable_factories() -> Iterator[None]:
    """Meanwhile, :data:`SIZED_FACTORIES` called with traced sizes get them as one tuple, and
    :data:`DATA_FACTORIES` called on data holding traced values (``torch.tensor(x.size(-1))``
    in DeBERTa-v2) are traced as a call (restored after)."""
    originals = {name: getattr(torch, name) for name in (*SIZED_FACTORIES, *DATA_FACTORIES)}

    def sized(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*size: Any, **kwargs: Any) -> Any:
            if len(size) > 1 and any(isinstance(v, fx.Proxy) for v in size):
                return fn(tuple(size), **kwargs)
            return fn(*size, **kwargs)

        return call

    def traced(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(data: Any, *args: Any, **kwargs: Any) -> Any:
            proxies = [v for v in pytree.tree_leaves(data) if isinstance(v, fx.Proxy)]
            if proxies:
                return proxies[0].tracer.create_proxy("call_function", fn, (data, *args), kwargs)
            return fn(data, *args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(torch, name, sized(fn) if name in SIZED_FACTORIES else traced(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def capture_fx_values(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]) -> Capture:
    """fx tracing with example values (``fx(values)`` in the module docstring)."""
    if len({repr(_trailing_shapes(b)) for b in batches}) > 1:
        raise Unsupported("the batches differ in more than their first dimension")
    if batch_size(batches[0]) < max(EXAMPLE_SIZES):
        raise Unsupported(f"a first batch of fewer than {max(EXAMPLE_SIZES)} samples")
    signature = inspect.signature(model.forward)
    bound = []
    for n in EXAMPLE_SIZES:
        args, kwargs = call_args(_first(batches[0], n))
        bound.append(signature.bind(*args, **kwargs).arguments)
    names = list(bound[0])
    for name in names:
        if signature.parameters[name].kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            raise Unsupported(f"the batches fill forward's variadic parameter {name!r}")
    # a forward taking exactly the batch's arguments by name: fx cannot trace ``**kwargs``
    namespace = {"_forward": type(model).forward, "_main_output": _main_output}
    call = ", ".join(f"{name}={name}" for name in names)
    source = f"def forward(self, {', '.join(names)}):\n"
    source += f"    return _main_output(_forward(self, {call}))\n"
    exec(source, namespace)
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"]})
    tracer = _ValueTracer(set(layers), {n: (bound[0][n], bound[1][n]) for n in names})
    try:
        with torch.inference_mode(), _traceable_factories(), attributes_kept(model):
            graph = tracer.trace(model)
    finally:
        model.__class__ = cls
    gm = fx.GraphModule(model, graph, cls.__name__)
    return Capture(gm, _signature_inputs(signature, gm))


# -- torch.export -----------------------------------------------------------------------------
_OPAQUE: dict[str, nn.Module] = {}
"""The layers replaced by ``mpsearch::layer`` while a model is exported, by name."""


def _original_forward(layer: nn.Module, *xs: Tensor) -> Tensor:
    return type(layer).forward(layer, *xs)


@torch.library.custom_op("mpsearch::layer", mutates_args=())
def _layer_op(xs: list[Tensor], name: str) -> Tensor:
    """Quantizable layer ``name`` applied to ``xs`` (its input; a Mixture-of-Experts bank's
    hidden states and routing), one opaque node in an exported graph."""
    return _original_forward(_OPAQUE[name], *xs)


@_layer_op.register_fake
def _(xs: list[Tensor], name: str) -> Tensor:
    return _original_forward(_OPAQUE[name], *xs)


def _opaque_call(name: str, *args: Any, **kwargs: Any) -> Tensor:
    if kwargs:  # in the order forward takes them
        forward = type(_OPAQUE[name]).forward
        bound = inspect.signature(forward).bind(_OPAQUE[name], *args, **kwargs)
        args = tuple(bound.arguments.values())[1:]
    if not all(isinstance(a, Tensor) for a in args):
        raise Unsupported(f"layer {name!r} is called with arguments that are not tensors")
    return torch.ops.mpsearch.layer(list(args), name)


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


@contextmanager
def _no_stack_traces() -> Iterator[None]:
    """fx nodes without their source stack trace, meanwhile: hf_llama's export 0.52 -> 0.47 s
    (median of 5, AMD EPYC Zen 4, 2 threads)."""
    before = fx.config.do_not_emit_stack_traces
    fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx.config.do_not_emit_stack_traces = before


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


def _flat_inputs(
    in_spec: pytree.TreeSpec, gm: fx.GraphModule, extra: dict[str, Any] | None = None
) -> Inputs:
    """Placeholder values: the batch's ``(args, kwargs)`` (with the ``extra`` keyword
    arguments the graph was exported with) flattened, in the structure and in the static
    dimensions the graph was exported with."""
    placeholders = _placeholders(gm)

    def inputs(batch: Batch) -> list[Any]:
        args, kwargs = call_args(batch)
        kwargs.update(extra or {})
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


NO_CACHE = {"use_cache": False}
"""Keyword arguments ``export`` adds where ``forward`` takes them and the batches leave them
out: one forward's main output does not depend on them, and a cache it would return
(Mamba's, a ``DynamicCache``) is no type ``torch.export`` can output."""


def _no_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The :data:`NO_CACHE` arguments ``model.forward`` takes that ``kwargs`` leave out."""
    parameters = inspect.signature(model.forward).parameters
    return {k: v for k, v in NO_CACHE.items() if k in parameters and k not in kwargs}


def _add_keywords(
    extra: dict[str, Any], _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with the ``extra`` keywords the graph was exported with."""
    return args, {**extra, **kwargs}


def capture_export(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str]) -> Capture:
    """``torch.export.export(model, strict=False)`` on the first batch, layers kept opaque
    (caches off: :data:`NO_CACHE`)."""
    args, kwargs = call_args(batches[0])
    extra = _no_cache(model, kwargs)
    kwargs = dict(sorted({**kwargs, **extra}.items()))
    dyn_args, dyn_kwargs = _dynamic(batches)
    dyn_kwargs.update(dict.fromkeys(extra))
    bound = inspect.signature(model.forward).bind(*dyn_args, **dyn_kwargs)
    dynamic = dict(bound.arguments)
    with _opaque_layers(model, layers), _no_stack_traces():
        program = quiet_export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        if _mutates(program.graph_module):
            with warnings.catch_warnings():  # torch's own deprecation notice, not the user's
                warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)
                program = program.run_decompositions({})  # functional: cached values stay intact
    gm = program.module()
    # ``module()`` makes train()/eval() raise; the graph is fixed in eval mode either way and
    # ``evaluate`` callables call eval()
    del gm.train, gm.eval
    if extra:  # ``evaluate``, the Hessian's loss and rounding call it with the user's batches
        gm.register_forward_pre_hook(partial(_add_keywords, extra), with_kwargs=True, prepend=True)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.mpsearch.layer.default:
            xs, name = node.args
            node.op, node.target, node.args = "call_module", name, tuple(xs)
            gm.add_submodule(name, model.get_submodule(name))
        elif node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)  # e.g. a layer's weight: the layer may be swapped out
    gm.recompile()
    spec = program.call_spec
    output = partial(_unflattened_output, spec.out_spec)
    return Capture(gm, _flat_inputs(spec.in_spec, gm, extra), output, folds_batchnorm=False)


CAPTURES: dict[str, Callable[[nn.Module, Sequence[Batch], Sequence[str]], Capture]] = {
    "fx": capture_fx,
    "fx(concrete_args)": capture_fx_concrete,
    "fx(values)": capture_fx_values,
    "export": capture_export,
}
"""The ways a model is captured as a graph, tried in this order: ``name -> capture(model,
batches, layers)`` (the model is the runner's own copy, which the capture may keep)."""
