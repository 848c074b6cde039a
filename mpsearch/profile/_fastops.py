"""Exact, faster stand-ins for slow CPU operations, used when the graph runner executes a model.

The graph runner re-executes the part of a network downstream of every layer, once per scheme,
so an operation that PyTorch runs slowly costs the profile many times over. Max pooling is one:
on CPU, ``max_pool2d`` of a contiguous (NCHW) tensor runs a per-plane loop that, on this
project's 2-core machine, took 7-9x as long as the same maximum taken over the window's strided
views with ``torch.maximum`` (0.87 ms vs 0.12 ms for a ``[32, 64, 8, 8]`` input, 2x2 windows),
and as long as the convolution before it. A maximum is exact whatever the order it is taken in
(NaN propagates in both), so the stand-in returns bit-identical values.

A stand-in is chosen per graph node, from the node's constant arguments (:func:`fast_call`),
and checks its tensor input at run time: anything it does not handle (a tensor needing grad, a
non-CPU or non-floating tensor, other ranks) goes to the original operation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

MAX_WINDOW = 16
"""Windows of more elements than this keep the original kernel (one ``maximum`` per element)."""


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return (value[0], value[1])
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return _pair(value[0])
    return None


def window_max(
    x: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``F.max_pool2d(x, kernel, stride, padding, dilation)`` as a maximum of strided views.

    ``x``: ``[C, H, W]`` or ``[N, C, H, W]``; padding is ``-inf`` (as in ``max_pool2d``, which
    never picks a padded position); ``ceil_mode=False``. Bit-identical to ``max_pool2d``.

    >>> x = torch.randn(2, 3, 9, 9)
    >>> torch.equal(window_max(x, (3, 3), (2, 2), (1, 1), (1, 1)), F.max_pool2d(x, 3, 2, 1))
    True
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=-torch.inf)
    height, width = x.shape[-2:]
    oh = (height - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    views = [
        x[..., top : top + sh * (oh - 1) + 1 : sh, left : left + sw * (ow - 1) + 1 : sw]
        for top in range(0, kh * dh, dh)
        for left in range(0, kw * dw, dw)
    ]
    if len(views) == 1:
        return views[0].clone()
    out = torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.maximum(out, view, out=out)
    return out


def _pool_call(original: Callable[..., Any], params: inspect.BoundArguments) -> Callable | None:
    """A ``window_max`` stand-in for a max-pool call with these constant arguments, or None."""
    args = params.arguments
    kernel = _pair(args["kernel_size"])
    stride_arg = args.get("stride")
    stride = kernel if stride_arg in (None, [], ()) else _pair(stride_arg)
    padding, dilation = _pair(args.get("padding", 0)), _pair(args.get("dilation", 1))
    if kernel is None or stride is None or padding is None or dilation is None:
        return None
    if args.get("ceil_mode", False) is not False or args.get("return_indices", False) is not False:
        return None
    if min(*kernel, *stride, *dilation) < 1 or min(padding) < 0:
        return None
    if kernel[0] * kernel[1] > MAX_WINDOW or any(
        p > k // 2 for p, k in zip(padding, kernel, strict=True)
    ):
        return None

    def call(x: Any, *rest: Any, **kwargs: Any) -> Any:
        if (
            isinstance(x, Tensor)
            and x.dim() in (3, 4)
            and x.is_cpu
            and x.is_floating_point()
            and not x.requires_grad
            and x.shape[-2] + 2 * padding[0] >= dilation[0] * (kernel[0] - 1) + 1
            and x.shape[-1] + 2 * padding[1] >= dilation[1] * (kernel[1] - 1) + 1
        ):
            return window_max(x, kernel, stride, padding, dilation)
        return original(x, *rest, **kwargs)

    return call


def _max_pool2d_signature(
    input: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> None:
    """The signature of ``F.max_pool2d`` (which fx sees only as ``*args, **kwargs``)."""


_SIGNATURES: dict[Any, inspect.Signature] = {
    F.max_pool2d: inspect.signature(_max_pool2d_signature),
    torch.max_pool2d: inspect.signature(_max_pool2d_signature),
}


def _function_pool(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Callable | None:
    try:
        params = _SIGNATURES[target].bind(*args, **kwargs)
    except TypeError:
        return None
    return _pool_call(target, params)


def _module_pool(module: nn.Module) -> Callable | None:
    if type(module) is not nn.MaxPool2d:  # a subclass may compute something else
        return None
    params = _SIGNATURES[F.max_pool2d].bind(
        None,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.ceil_mode,
        module.return_indices,
    )
    return _pool_call(module, params)


FAST_FUNCTIONS: dict[Any, Callable[[Any, Sequence[Any], dict[str, Any]], Callable | None]] = {
    F.max_pool2d: _function_pool,
    torch.max_pool2d: _function_pool,
}
"""``call_function`` target -> factory of an exact stand-in from the node's constant arguments."""

FAST_MODULES: dict[type[nn.Module], Callable[[nn.Module], Callable | None]] = {
    nn.MaxPool2d: _module_pool,
}
"""``call_module`` module type -> factory of an exact stand-in for that module."""


def has_node(value: Any) -> bool:
    """Whether ``value`` (a node argument, possibly nested in containers) holds a graph value."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def fast_call(node: fx.Node, module: nn.Module | None = None) -> Callable | None:
    """An exact, faster stand-in for ``node``'s operation, or ``None`` to run the original.

    ``module``: the node's module for a ``call_module`` node. Only the tensor input may be a
    graph value; the other arguments must be constants for a stand-in to be chosen.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
    >>> [fast_call(n, gm.get_submodule(n.target)) is not None
    ...  for n in gm.graph.nodes if n.op == "call_module"]
    [False, True]
    """
    if node.op == "call_module" and module is not None and type(module) in FAST_MODULES:
        if len(node.args) != 1 or node.kwargs:
            return None
        return FAST_MODULES[type(module)](module)
    if node.op == "call_function" and node.target in FAST_FUNCTIONS:
        if any(has_node(a) for a in node.args[1:]) or any(
            has_node(v) for v in node.kwargs.values()
        ):
            return None
        return FAST_FUNCTIONS[node.target](node.target, node.args, dict(node.kwargs))
    return None
