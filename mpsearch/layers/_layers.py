"""Finding quantizable layers and swapping them in and out of a model."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import re
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.rnn import PackedSequence
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils import _pytree as pytree

from mpsearch._validation import check_module, wrong_type
from mpsearch.layers._experts import expert_rows, expert_weights, is_expert_bank

TRANSPOSED_CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Transposed convolutions: quantized per output channel (:func:`weight_rows`)."""

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    *TRANSPOSED_CONV_TYPES,
    nn.LSTM,
    nn.GRU,
    nn.LSTMCell,
    nn.GRUCell,
    nn.Embedding,
)

_UNSUPPORTED_FORMS: list[tuple[Callable[[nn.Module], bool], str]] = [
    (
        lambda m: isinstance(m, nn.LSTM) and m.proj_size > 0,
        "an LSTM with proj_size has no quantized kernel",
    ),
    (
        lambda m: isinstance(m, nn.Embedding) and m.max_norm is not None,
        "an Embedding with max_norm rewrites its weight at each lookup",
    ),
    (
        lambda m: (
            not _computes_as_its_base(m)
            and not routes_through_base(m)
            and effective_form(m) is None
        ),
        "a subclass whose own forward computes something else than its base layer, neither "
        "calling the base's forward on its one input nor only transforming its weight (OPT's "
        "positions from the attention mask, a convolution that pads its input itself), which "
        "a quantized layer would drop",
    ),
]
"""(recognise, reason): instances of :data:`QUANTIZABLE_TYPES` that are not quantizable."""

_SAME_AS_BASE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _probe_input(layer: nn.Module) -> Tensor | None:
    """A small input of ``layer``'s base type on its device and in its dtype (``None`` for a
    recurrent layer: not probed)."""
    weight = next(layer.parameters())
    if isinstance(layer, nn.Embedding):
        return torch.arange(6, device=weight.device).remainder(layer.num_embeddings).reshape(2, 3)
    if isinstance(layer, nn.Linear):
        shape = [2, layer.in_features]
    elif isinstance(layer, TRANSPOSED_CONV_TYPES):
        shape = [1, layer.in_channels, *(2 * p + 3 for p in layer.padding)]  # a non-empty output
    elif isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        sizes = zip(layer.kernel_size, layer.dilation, layer.stride, strict=True)
        shape = [1, layer.in_channels, *(d * (k - 1) + s + 1 for k, d, s in sizes)]
    else:
        return None
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return x.to(device=weight.device, dtype=weight.dtype)


_BASE_CALL = re.compile(r"super\([^)]*\)\.forward\(")


def routes_through_base(layer: nn.Module) -> bool:
    """Whether ``layer``'s class overrides its base type's forward with one that takes one
    input and calls the base's (``super().forward(x)``) on the way, as Gemma's scaled embedding
    does (``super().forward(ids) * self.embed_scale``): a quantized layer then keeps that
    forward, and runs the quantized base operation in its ``super().forward``
    (:func:`with_own_forward`).

    >>> class Scaled(nn.Embedding):
    ...     def forward(self, ids):
    ...         return super().forward(ids) * 2.0
    >>> routes_through_base(Scaled(4, 2)), routes_through_base(nn.Embedding(4, 2))
    (True, False)
    """
    return _routes_through_base(type(layer))


@functools.cache
def _routes_through_base(kind: type[nn.Module]) -> bool:
    """:func:`routes_through_base` of a class (its source read once, not per layer)."""
    base = next((t for t in QUANTIZABLE_TYPES if issubclass(kind, t)), None)
    forward = kind.forward
    if base is None or forward is base.forward:
        return False
    try:
        source = inspect.getsource(forward)
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (OSError, TypeError, ValueError):  # no source (built at run time)
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return bool(_BASE_CALL.search(source)) and len(params) == 1 and params[0].kind in positional


def base_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` that runs its base type's forward where ``layer``'s class
    routes through it (:func:`routes_through_base`: the subclass's own part runs outside, in
    :func:`with_own_forward`); a plain deep copy otherwise.

    >>> class Scaled(nn.Linear):
    ...     def forward(self, x):
    ...         return super().forward(x) * 2.0
    >>> type(base_copy(Scaled(2, 2))).__name__, type(base_copy(nn.Linear(2, 2))).__name__
    ('Linear', 'Linear')
    """
    folded = effective_form(layer)
    if folded is not None:  # a weight transform folded: the plain layer it computes
        return copy.deepcopy(folded)
    copied = copy.deepcopy(layer)
    if routes_through_base(layer):
        copied.__class__ = next(t for t in QUANTIZABLE_TYPES if isinstance(layer, t))
    return copied


class OwnForward(nn.Module):
    """Marks the modules :func:`with_own_forward` builds: a layer subclass's own forward over a
    quantized base operation (``quantized``). Their classes are made at run time, so a pickle
    names the layer's class and rebuilds them."""

    quantized: nn.Module

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _rebuild_own_forward, (type(self).__mro__[1], self.__dict__)


_OWN_FORWARD_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _own_forward_class(kind: type[nn.Module]) -> type[nn.Module]:
    """The class :func:`with_own_forward` gives a quantized layer of class ``kind``."""
    if kind not in _OWN_FORWARD_CLASSES:
        base = next(t for t in QUANTIZABLE_TYPES if issubclass(kind, t))
        call = type(f"_Quantized{base.__name__}Call", (base,), {"forward": _base_call})
        _OWN_FORWARD_CLASSES[kind] = type(f"Quantized{kind.__name__}", (kind, call, OwnForward), {})
    return _OWN_FORWARD_CLASSES[kind]


def _rebuild_own_forward(kind: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    return rebuilt(_own_forward_class(kind), state)


def rebuilt(cls: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    """An instance of ``cls`` holding ``state`` as its ``__dict__`` (``__init__`` not run):
    how a pickle restores a module whose class is made at run time."""
    module = cls.__new__(cls)
    module.__dict__.update(state)
    return module


def _base_call(self: OwnForward, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    return self.quantized(x)


def with_own_forward(layer: nn.Module, module: nn.Module) -> nn.Module:
    """``module`` (a quantized ``layer``) as ``layer``'s own class when that class routes its
    forward through its base's (:func:`routes_through_base`): an instance of a subclass of
    ``type(layer)`` whose base forward runs ``module``, holding ``layer``'s other tensors and
    settings (Gemma's ``embed_scale``); else ``module`` itself.

    >>> class Scaled(nn.Embedding):
    ...     def forward(self, ids):
    ...         return super().forward(ids) * 2.0
    >>> q = with_own_forward(Scaled(4, 2), nn.Embedding(4, 2))
    >>> isinstance(q, Scaled), torch.equal(q(torch.tensor([1])), q.quantized(torch.tensor([1])) * 2)
    (True, True)
    """
    if isinstance(module, OwnForward) or isinstance(layer, OwnForward):
        return module  # built already, or the original put back in its place
    if type(module) is type(layer) or not routes_through_base(layer):
        return module
    cls = _own_forward_class(type(layer))
    wrapped = cls.__new__(cls)
    nn.Module.__init__(wrapped)
    wrapped.quantized = module
    for name, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
        if name not in STAND_INS:
            persistent = name not in layer._non_persistent_buffers_set
            wrapped.register_buffer(name, t, persistent=persistent)
    stand_in(wrapped, layer)
    return wrapped.train(layer.training)


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


_WEIGHT_HOOKS: tuple[type, ...] = (prune.BasePruningMethod, WeightNorm, SpectralNorm)
"""Pre-hooks that recompute a layer's weight before each call (pruning masks, the old-style
weight and spectral norms): the quantized layer holds the weight they give, not the hook."""


def carry_hooks(layer: nn.Module, module: nn.Module) -> nn.Module:
    """``module`` (``layer`` quantized) with ``layer``'s forward hooks and pre-hooks too: what
    the user's hooks do to the layer's input and output, its quantized form does. Hooks that
    recompute the weight (:data:`_WEIGHT_HOOKS`) stay behind: their weight is quantized.

    >>> layer = nn.Linear(2, 2)
    >>> _ = layer.register_forward_hook(lambda m, args, out: torch.ones_like(out))
    >>> carry_hooks(layer, nn.Linear(2, 2))(torch.zeros(1, 2)).tolist()
    [[1.0, 1.0]]
    """
    if module is layer:
        return module
    weights = {
        key for key, hook in layer._forward_pre_hooks.items() if isinstance(hook, _WEIGHT_HOOKS)
    }
    for name in _HOOK_DICTS:
        kept = {k: v for k, v in getattr(layer, name).items() if k not in weights}
        getattr(module, name).update(kept)
    return module


def _computes_as_its_base(layer: nn.Module) -> bool:
    """Whether ``layer`` runs its base type's forward: its class does not override it, or its
    own forward gives the base's output on a probe input (timm's dtype-casting ``Linear``
    does; Gemma's scaled embedding does not). Measured once per module."""
    base = next((t for t in QUANTIZABLE_TYPES if isinstance(layer, t)), None)
    if base is None or type(layer).forward is base.forward:
        return True
    if layer not in _SAME_AS_BASE:
        x = _probe_input(layer)
        same = False
        if x is not None:
            try:
                with torch.no_grad():
                    own, plain = layer(x), base.forward(layer, x)
                same = isinstance(own, Tensor) and own.shape == plain.shape
                same = same and bool(torch.allclose(own, plain, rtol=1e-5, atol=1e-6))
            except Exception:  # another signature (OPT's positions from the mask)
                same = False
        _SAME_AS_BASE[layer] = same
    return _SAME_AS_BASE[layer]


def register_quantizable_type(module_type: type[nn.Module]) -> None:
    """Make layers of ``module_type`` quantizable (they need a ``weight`` and a backend handler)."""
    global QUANTIZABLE_TYPES
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise wrong_type("module_type", module_type, "an nn.Module subclass")
    if module_type not in QUANTIZABLE_TYPES:
        QUANTIZABLE_TYPES = (*QUANTIZABLE_TYPES, module_type)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose
    weight is stored transposed (``[in, out]``, ``y = addmm(bias, x, weight)``). Recognised by
    its behaviour (class name, ``nf`` attribute, 2-D weight), without importing transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, Tensor)
        and weight.dim() == 2
    )


def _hf_conv1d_as_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing ``layer`` (HF ``Conv1D``) on a transposed view of its weight
    (no copy)."""
    n_in, n_out = layer.weight.shape
    linear = nn.Linear(n_in, n_out, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.weight.detach().t(), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return linear.train(layer.training)


def output_major(weight: Tensor, groups: int) -> Tensor:
    """A transposed convolution's weight ``[in, out / groups, *kernel]`` as ``[out, in / groups,
    *kernel]``, a convolution's layout (one row per output channel); a copy.

    >>> w = torch.arange(24.0).reshape(4, 3, 2)  # 4 inputs, 2 groups of 3 outputs, kernel 2
    >>> output_major(w, groups=2).shape, torch.equal(input_major(output_major(w, 2), 2), w)
    (torch.Size([6, 2, 2]), True)
    """
    cin, cout_g, *kernel = weight.shape
    grouped = weight.reshape(groups, cin // groups, cout_g, *kernel).transpose(1, 2)
    return grouped.reshape(groups * cout_g, cin // groups, *kernel)


def input_major(weight: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`output_major`: ``[out, in / groups, *kernel]`` back to a
    transposed convolution's ``[in, out / groups, *kernel]``."""
    cout, cin_g, *kernel = weight.shape
    grouped = weight.reshape(groups, cout // groups, cin_g, *kernel).transpose(1, 2)
    return grouped.reshape(groups * cin_g, cout // groups, *kernel)


_BASE_FUNCTIONS = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
}
"""The functional call each base type's forward makes (``torch.nn.functional``'s name)."""

_EFFECTIVE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], nn.Module | None]] = (
    weakref.WeakKeyDictionary()
)


class _BaseCalls(torch.overrides.TorchFunctionMode):
    """Records the calls of one functional (``conv2d``...) made inside it: args, output."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == self.name:
            self.calls.append((tuple(args), dict(kwargs or {}), out))
        return out


def effective_form(layer: nn.Module) -> nn.Module | None:
    """The plain base layer that ``layer`` computes, where its class transforms its weight in
    ``forward`` and then makes its base's one call on the input as given (timm's
    ``StdConv2d`` / ``ScaledStdConv2d``, weight standardization, in BiT and NFNet): a copy of
    the base type holding the weight and bias that call received (in eval mode the weight is
    fixed, so the transform folds, as a BatchNorm does). ``None`` otherwise. Found once per
    module, by running it on a probe input and recording its functional calls.

    >>> class Doubled(nn.Linear):
    ...     def forward(self, x):
    ...         return nn.functional.linear(x, 2 * self.weight, self.bias)
    >>> layer = Doubled(3, 2)
    >>> torch.equal(effective_form(layer).weight, 2 * layer.weight)
    True
    """
    base = next((t for t in _BASE_FUNCTIONS if isinstance(layer, t)), None)
    if base is None or type(layer).forward is base.forward or is_hf_conv1d(layer):
        return None
    tensors = [*layer.parameters(), *layer.buffers()]
    state = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)
    if layer not in _EFFECTIVE or _EFFECTIVE[layer][0] != state:  # refolded once trained
        _EFFECTIVE[layer] = (state, _fold_weight_transform(layer, base))
    return _EFFECTIVE[layer][1]


def _fold_weight_transform(layer: nn.Module, base: type[nn.Module]) -> nn.Module | None:
    x = _probe_input(layer)
    if x is None:
        return None
    recorder = _BaseCalls(_BASE_FUNCTIONS[base])
    try:
        with torch.no_grad(), recorder:
            out = layer(x)
    except Exception:  # another signature: not a weight transform
        return None
    if len(recorder.calls) != 1:
        return None
    args, kwargs, y = recorder.calls[0]
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    if bound.get("input") is not x or y is not out or not isinstance(bound.get("weight"), Tensor):
        return None  # the input padded or the output changed first: not the base's call
    if base is not nn.Linear:
        geometry = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        n = len(layer.kernel_size)
        for key, default in geometry.items():
            if _ntuple(bound.get(key, default), n) != _ntuple(getattr(layer, key), n):
                return None
    folded = copy.deepcopy(layer)
    folded.__class__ = base
    weight, bias = bound["weight"], bound.get("bias")
    folded.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    folded.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    for name in list(folded._parameters):  # the transform's own tensors (a gain) are folded in
        if name not in ("weight", "bias"):
            del folded._parameters[name]
    return folded.train(layer.training)


def _ntuple(value: Any, n: int) -> Any:
    """A conv setting as ``n`` values (``2`` -> ``(2, 2)``; ``"same"`` as it is)."""
    if isinstance(value, str):
        return value
    return tuple(value) if isinstance(value, tuple | list) else (value,) * n


_STANDARD_FORMS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = [
    (is_hf_conv1d, _hf_conv1d_as_linear),
    (lambda m: effective_form(m) is not None, lambda m: effective_form(m)),  # type: ignore[return-value,arg-type]
]
"""(recognise, convert): layers quantizable by behaviour, and the standard layer they are."""


def standard_form(layer: nn.Module) -> nn.Module:
    """``layer`` as the standard layer the backends quantize: itself for Linear / Conv (and
    their subclasses), an ``nn.Linear`` on the transposed weight (a view) for HF ``Conv1D``,
    the plain layer a weight-transforming subclass computes (:func:`effective_form`).
    Shapes (``standard_form(layer).weight.shape``: ``[out, in, ...]``) are read from it.

    >>> standard_form(nn.Linear(4, 2)).weight.shape
    torch.Size([2, 4])
    """
    for recognise, convert in _STANDARD_FORMS:
        if recognise(layer):
            return convert(layer)
    return layer


def unsupported_form(module: nn.Module) -> str | None:
    """Why ``module``, of a quantizable type, is not quantizable (``None`` when it is or when
    its type is not quantizable at all)."""
    return next((why for recognise, why in _UNSUPPORTED_FORMS if recognise(module)), None)


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a quantizable layer: an instance (subclasses included) of
    :data:`QUANTIZABLE_TYPES` (an LSTM with ``proj_size`` or an Embedding with ``max_norm``
    excepted), or a layer recognised by behaviour (HF ``Conv1D``)."""
    if isinstance(module, QUANTIZABLE_TYPES):
        return unsupported_form(module) is None
    return is_expert_bank(module) or any(recognise(module) for recognise, _ in _STANDARD_FORMS)


def layer_weights(layer: nn.Module) -> dict[str, Tensor]:
    """The weight matrices a scheme quantizes in ``layer``, by parameter name, each ``[out,
    in, ...]`` so that a per-channel scale is one per row:

    - Linear, Conv, Embedding: ``weight`` (an Embedding's rows are its tokens: per-row scales);
      HF ``Conv1D``: its transposed weight (:func:`standard_form`); a transposed convolution:
      its weight by output channel (:func:`weight_rows`);
    - LSTM / GRU: every ``weight_ih_l{k}`` and ``weight_hh_l{k}`` (``_reverse`` too), each
      ``[gates * hidden, in]``: one row per gate row (4 gates for an LSTM, 3 for a GRU); an
      LSTM / GRU cell: ``weight_ih`` and ``weight_hh``;
    - a Mixture-of-Experts bank (:mod:`mpsearch.layers._experts`): each 3-D expert weight as
      ``[experts * out, in]``, one row per expert's output channel.

    >>> {n: tuple(w.shape) for n, w in layer_weights(nn.GRU(4, 8)).items()}
    {'weight_ih_l0': (24, 4), 'weight_hh_l0': (24, 8)}
    """
    if isinstance(layer, nn.RNNBase):
        return {
            name: getattr(layer, name)
            for names in layer._all_weights
            for name in names
            if name.startswith("weight")
        }
    if isinstance(layer, nn.RNNCellBase):
        return {"weight_ih": layer.weight_ih, "weight_hh": layer.weight_hh}
    if is_expert_bank(layer):
        return {name: expert_rows(layer, w) for name, w in expert_weights(layer).items()}
    return {"weight": weight_rows(standard_form(layer))}


def same_weights(a: nn.Module, b: nn.Module, names: Iterable[str]) -> bool:
    """Whether layers ``names`` of ``a`` and ``b`` (e.g. a model and its captured graph) are
    quantizable in both and hold equal weights (:func:`layer_weights`)."""
    la, lb = quantizable_layers(a, require=False), quantizable_layers(b, require=False)
    return all(
        n in la
        and n in lb
        and all(
            torch.equal(x, y)
            for x, y in zip(
                layer_weights(la[n]).values(), layer_weights(lb[n]).values(), strict=True
            )
        )
        for n in names
    )


def weight_rows(layer: nn.Module) -> Tensor:
    """``layer.weight`` with one row per output channel (``[out, in / groups, ...]``): the
    weight itself, or a transposed convolution's as :func:`output_major` (a copy).

    >>> weight_rows(nn.ConvTranspose1d(4, 6, 3)).shape
    torch.Size([6, 4, 3])
    """
    if isinstance(layer, TRANSPOSED_CONV_TYPES):
        return output_major(layer.weight, layer.groups)
    return layer.weight


def from_rows(layer: nn.Module, weight: Tensor) -> Tensor:
    """The inverse of :func:`weight_rows`: a weight by output channel in ``layer``'s own
    layout (what :func:`layer_forward` takes)."""
    if isinstance(layer, TRANSPOSED_CONV_TYPES):
        return input_major(weight, layer.groups)
    return weight


def weight_shapes(layer: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of :func:`layer_weights` (what a scheme's applicability and storage depend on).

    >>> weight_shapes(nn.Linear(4, 2)), weight_shapes(nn.LSTM(4, 8))
    ([(2, 4)], [(32, 4), (32, 8)])
    >>> weight_shapes(nn.ConvTranspose2d(4, 6, 3, groups=2))
    [(6, 2, 3, 3)]
    """
    if isinstance(layer, TRANSPOSED_CONV_TYPES):  # without copying the weight by rows
        return [(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)]
    return [tuple(w.shape) for w in layer_weights(layer).values()]


def quantizable_layers(model: nn.Module, *, require: bool = True) -> dict[str, nn.Module]:
    """``{name: module}`` of the quantizable layers, in model order: Linear, Conv1d / 2d / 3d,
    ConvTranspose1d / 2d / 3d and their subclasses (e.g. ``nn.MultiheadAttention``'s
    ``out_proj``), LSTM and GRU and their cells (every weight matrix quantized per gate
    row), Embedding
    (weight-only), Hugging Face's ``Conv1D`` (GPT-2), run as a Linear on its transposed
    weight (:func:`standard_form`), and Mixture-of-Experts banks (3-D expert weights, one
    layer per bank: :mod:`mpsearch.layers._experts`).

    Names are those of ``model.named_modules()``. A model with none is refused unless
    ``require=False``. What they leave out (norms, biases, bare parameters such as
    ``MultiheadAttention.in_proj_weight``) and the share of parameters they cover:
    :func:`mpsearch.layers.coverage`.

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
    """Put each module of ``replacements`` at its name in ``model``; return the modules replaced.

    An ``nn.MultiheadAttention``'s ``out_proj`` is read by its parent (weight and bias passed
    to ``F.multi_head_attention_forward``), never called: a replacement that is not a Linear
    is put there inside :class:`CalledOutProj`, which the attention module then calls.

    A replacement without the ``weight`` / ``bias`` the replaced layer had gets stand-ins
    (:func:`stand_in`): model code that reads ``self.proj.weight.dtype`` keeps working.
    """
    previous: dict[str, nn.Module] = {}
    for name, module in replacements.items():
        previous[name] = model.get_submodule(name)
        module = with_own_forward(previous[name], module)
        stand_in(module, previous[name])
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
            _set_out_proj(parent, module)
        else:
            model.set_submodule(name, module)
    return previous


def enclosing_layer(name: str, layers: Collection[str]) -> str | None:
    """The outermost of ``layers`` that module ``name`` lies strictly inside (a weight-normed
    layer's ``parametrizations`` hold its tensors), else ``None``.

    >>> enclosing_layer("conv.parametrizations.weight", {"conv", "fc"}), enclosing_layer("fc", {"fc"})
    ('conv', None)
    """
    parts = name.split(".")
    return next((p for i in range(1, len(parts)) if (p := ".".join(parts[:i])) in layers), None)


NEVER_CALLED = "the layer is never called in the model's forward pass"
"""Why the profile skips a quantizable layer the model never calls (it reads the weights
directly, as Mamba's ``dt_proj``, or the layer is a tied copy never run, as T5's ``shared``);
the search keeps such a layer in fp32."""

READ_BESIDES_CALLS = (
    "the model reads the layer's weight directly besides calling it (an output projection "
    "tied to an embedding through F.linear(h, embed.weight), say), and a quantized layer keeps "
    "no float weight to read"
)
"""Why a called layer stays fp32: the search keeps it so, and ``quantize`` too."""

STAYS_FP32 = frozenset({NEVER_CALLED, READ_BESIDES_CALLS})
"""The profile's reasons for skipping a layer that make the search keep it in fp32."""

TENSOR_METADATA = frozenset(
    {"dtype", "shape", "device", "requires_grad", "ndim", "layout", "is_cuda", "is_meta"}
    | {"size", "dim", "numel", "stride", "is_floating_point", "is_contiguous", "element_size"}
    | {"nelement", "data_ptr", "storage_offset", "untyped_storage", "get_device", "__len__"}
)
"""Tensor attributes and methods that read a tensor's metadata, not its values (reading a
layer's ``weight.shape`` is not a read of its weight)."""

STAND_INS = ("weight", "bias")
"""The tensors of a replaced layer that model code reads besides calling it (Hugging Face
ViT and T5 cast their input to ``proj.weight.dtype``, CLIP reads
``position_embedding.weight.shape[0]``)."""

_SETTING_TYPES = (bool, int, float, str, type(None), tuple)
_STAND_INS: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def is_stand_in(t: Tensor) -> bool:
    """Whether ``t`` is a stand-in tensor :func:`stand_in` made: no bytes of the model.

    >>> q = nn.Identity(); stand_in(q, nn.Linear(2, 2))
    >>> is_stand_in(q.weight), is_stand_in(q.weight.clone())
    (True, False)
    """
    return _STAND_INS.get(id(t)) is t


def stand_in_tensor(original: Tensor) -> Tensor:
    """A stand-in for ``original``: its shape, dtype and device, one NaN broadcast to that
    shape (:func:`is_stand_in`).

    >>> t = stand_in_tensor(torch.zeros(3, 2, dtype=torch.float16))
    >>> t.shape, t.dtype, is_stand_in(t), t.untyped_storage().nbytes()
    (torch.Size([3, 2]), torch.float16, True, 2)
    """
    nan = torch.full((1,) * original.dim(), math.nan, device=original.device)
    broadcast = nan.to(original.dtype).expand(original.shape)
    _STAND_INS[id(broadcast)] = broadcast
    return broadcast


def stand_in(module: nn.Module, layer: nn.Module) -> None:
    """Give ``module``, which replaces ``layer`` in a model, what model code reads of ``layer``
    besides calling it, where ``module`` lacks it:

    - each :data:`STAND_INS` tensor, as a non-persistent buffer of the layer's shape, dtype
      and device that holds one NaN broadcast to that shape (:func:`is_stand_in`: not in
      the state dict, no bytes counted; code that computes with it gets NaN, not stale
      values; converting the model's dtype or device materialises it, and then counts);
    - the layer's settings: its plain attributes (``num_embeddings``, ``in_features``,
      ``kernel_size``, GPT-2 ``Conv1D``'s ``nf``...; Whisper reads
      ``embed_positions.num_embeddings``).

    >>> q = nn.Identity(); stand_in(q, nn.Embedding(10, 4).double())
    >>> q.weight.shape, q.weight.dtype, q.num_embeddings, list(q.state_dict())
    (torch.Size([10, 4]), torch.float64, 10, [])
    """
    for name in STAND_INS:
        original = getattr(layer, name, None)
        if isinstance(original, Tensor) and not hasattr(module, name):
            module.register_buffer(name, stand_in_tensor(original), persistent=False)
    for name, value in vars(layer).items():
        if (
            not name.startswith("_")
            and isinstance(value, _SETTING_TYPES)
            and not hasattr(module, name)
        ):
            setattr(module, name, value)


class CalledOutProj(nn.Module):
    """An ``nn.MultiheadAttention``'s ``out_proj`` that is a module, not a Linear (a quantized
    layer): the attention module projects with an identity weight (exact in float32) and a
    forward hook then runs ``layer`` on its output. The identity is made per call, not stored.
    """

    def __init__(self, layer: nn.Module, embed_dim: int, like: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.embed_dim = embed_dim
        self.register_buffer("anchor", like.new_empty(0), persistent=False)  # device and dtype

    @property
    def weight(self) -> Tensor:
        return torch.eye(self.embed_dim, dtype=self.anchor.dtype, device=self.anchor.device)

    @property
    def bias(self) -> Tensor:
        return self.anchor.new_zeros(self.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _run_out_proj(mha: nn.Module, _args: Any, output: tuple[Tensor, Any]) -> tuple[Tensor, Any]:
    attn, weights = output
    return mha.out_proj(attn), weights


def _set_out_proj(mha: nn.MultiheadAttention, module: nn.Module) -> None:
    hooks = mha._forward_hooks
    ours = [key for key, hook in hooks.items() if hook is _run_out_proj]
    if isinstance(module, nn.Linear):
        mha.out_proj = module
        for key in ours:
            del hooks[key]
        return
    if not isinstance(module, CalledOutProj):
        module = CalledOutProj(module, mha.embed_dim, mha.out_proj.weight.detach())
    mha.out_proj = module  # type: ignore[assignment]
    if not ours:
        mha.register_forward_hook(_run_out_proj)


def make_plain(module: nn.Module) -> None:
    """Make ``module`` the plain layer it computes, in place, holding the weight it computes
    with: a parametrized weight (``weight_norm``) becomes a plain parameter (the module its
    base type), and a weight-transforming subclass (:func:`effective_form`: timm's
    ``StdConv2d``) its base type, its transform folded. A weight set on it afterwards is the
    weight it computes with. torch's deepcopy of a parametrized module shares its injected
    class with the original, and ``remove_parametrizations`` deletes the weight's property
    from that class: the module first gets a class of its own, so the original (the user's
    model) keeps its weight."""
    if parametrize.is_parametrized(module, "weight"):
        cls = type(module)
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    folded = effective_form(module)
    if folded is not None:
        module.__class__ = type(folded)
        module._parameters = dict(folded._parameters)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode within; every module's own mode is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def watched(
    model: nn.Module, callbacks: Mapping[str, Callable[[Any], None]], *, whole: bool = False
) -> Iterator[nn.Module]:
    """Within, each named layer passes its input to its callback before it runs (``whole``: a
    :class:`LayerCall` where it is called with more than one input, as a Mixture-of-Experts
    bank is).

    Layers are swapped for a recorder (not hooked), so a layer its parent never calls as a
    module (``MultiheadAttention.out_proj``) is watched too.

    >>> net = nn.Sequential(nn.Linear(4, 2))
    >>> seen = []
    >>> with watched(net, {"0": lambda x: seen.append(x.shape)}):
    ...     _ = net(torch.zeros(3, 4))
    >>> seen
    [torch.Size([3, 4])]
    """
    recorders = {n: _Recorder(model.get_submodule(n), cb, whole) for n, cb in callbacks.items()}
    with swapped(model, recorders):
        yield model


@dataclass
class LayerCall:
    """A layer's whole call where its first input is not all it takes (a Mixture-of-Experts
    bank's hidden states and their routing) or not a tensor (an RNN's PackedSequence): what
    :func:`watched` gives such a layer's callback, and :func:`call_layer` calls a module with.
    ``shape``, ``dtype`` and ``stride()`` are the first input's (a PackedSequence's data's)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def first(self) -> Tensor:
        """The first input (a PackedSequence's data)."""
        x = self.args[0]
        return x.data if isinstance(x, PackedSequence) else x

    @property
    def shape(self) -> torch.Size:
        return self.first.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.first.dtype

    def stride(self) -> tuple[int, ...]:
        return self.first.stride()

    def detached(self) -> LayerCall:
        """A copy whose tensors are detached clones (kept past the call)."""
        return LayerCall(
            *pytree.tree_map_only(
                Tensor,
                lambda t: t.detach().clone(memory_format=torch.preserve_format),
                (self.args, self.kwargs),
            )
        )


def call_layer(module: nn.Module, x: Tensor | LayerCall) -> Any:
    """``module`` called on ``x``: one input, or a :class:`LayerCall`'s whole call."""
    return module(*x.args, **x.kwargs) if isinstance(x, LayerCall) else module(x)


def _pre_hooked(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments ``layer``'s forward gets once its forward pre-hooks (the user's) ran."""
    for hook_id, hook in layer._forward_pre_hooks.items():
        if hook_id in layer._forward_pre_hooks_with_kwargs:
            result = hook(layer, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(layer, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


class _Recorder(nn.Module):
    """``layer`` with ``callback`` called on its input, as its forward gets it from the
    user's pre-hooks (a PackedSequence's data; ``whole``: a :class:`LayerCall` where the call
    has more inputs or a PackedSequence); the
    layer's own attributes read through (model code that
    checks ``self.proj.weight.dtype``, as Hugging Face ViT and T5 do)."""

    def __init__(self, layer: nn.Module, callback: Callable[[Any], None], whole: bool) -> None:
        super().__init__()
        self.layer = layer
        self.callback = callback
        self.whole = whole

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        seen, seen_kwargs = _pre_hooked(self.layer, (x, *args), kwargs)
        call = LayerCall(seen, dict(seen_kwargs))
        more = len(seen) > 1 or seen_kwargs or not isinstance(seen[0], Tensor)
        self.callback(call if self.whole and more else call.first)
        return self.layer(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


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
    nn.Conv3d: lambda layer, x, w, b: layer._conv_forward(x, w, b),
    **{
        kind: lambda layer, x, w, b, conv=conv: conv(
            x, w, b, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
        )
        for kind, conv in zip(
            TRANSPOSED_CONV_TYPES,
            (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
            strict=True,
        )
    },
}
