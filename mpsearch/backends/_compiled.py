"""The ``cpu-inductor`` backend: the ``cpu`` backend's kernels, the whole quantized model then
compiled by Inductor (``torch.compile``, static shapes, frozen weights).

Inductor fuses what lies between the real low-precision layers (casts, activation quantization,
activations, pooling, residual adds) into C++ kernels and calls the same oneDNN / aten int8 and
bf16 kernels as the eager model, on the same packed weights, traced from the eager model itself
in one graph (the int8 layers keep a dynamic activation range's scale and zero point as
tensors).

Inductor needs example shapes, so a model compiles on its first call for each input signature
(shapes, dtypes, strides; ``warmup`` compiles ahead of time), and checks that first compiled
output against the eager model's. Where compiling or that check fails (no C++ compiler, a
module Dynamo cannot trace, outputs that differ) the model falls back to the eager quantized
model, with a warning, and says why in ``mpsearch_compile``; so it does where the compiled model
is not faster than the eager one on the first input (:data:`RACE_CALLS` calls each, in turn).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from mpsearch._data import output_tensor
from mpsearch.backends._cpu import CpuBackend
from mpsearch.backends._kernels import FbgemmInt8Linear, onednn_twin, onednn_u8s8_saturates

CHECK_RTOL = 1e-2
"""Largest relative L2 difference between the compiled and the eager output of the check run
(``||compiled - eager|| / ||eager||``): fused bf16 casts and int8 codes rounded after a fused
op move outputs by far less; a wrong kernel by far more."""


AUTOTUNE_SETTINGS: dict[str, Any] = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "fx_graph_cache": False,
}
"""Inductor's settings for ``max-autotune`` compiling on the CPU: each matrix product (fp32 and
bf16 linears, ``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) gets the
faster, measured on this machine for its shapes, of ATen's kernel and Inductor's C++ GEMM
template (micro-kernels for the CPU's vector units, weights prepacked). Inductor's compiled-graph
cache is off: it keys frozen weights by name and stores the templates' prepacked copies of them
by value, so a second model of the same architecture got the first one's weights (int8 Llama
decoders with other seeds: logits off by 1.3 relative L2)."""


@contextmanager
def _compile_settings(*, autotune: bool = False) -> Iterator[None]:
    """Settings while Dynamo traces and Inductor compiles: frozen weights (Inductor's oneDNN
    int8 lowerings take their packed weights as constants only), and with ``autotune``
    :data:`AUTOTUNE_SETTINGS`. Torch's own advice on copying tensors, from those lowerings, is
    silenced."""
    settings = {"freezing": True, **(AUTOTUNE_SETTINGS if autotune else {})}
    with inductor_config.patch(settings), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
        yield


Swaps = list[tuple[nn.Module, str, nn.Module]]
"""Layers replaced in a model: (parent, attribute name, the layer it held before)."""


def lowerable_int8(model: nn.Module) -> Swaps:
    """Replace, in place, each fbgemm int8 Linear layer of ``model`` by its oneDNN twin
    (:func:`onednn_twin`: same codes, scales and bytes), which Inductor lowers, where oneDNN's
    u8 x s8 products do not saturate; the swaps made, for :func:`undo_swaps`. The cost model's
    autotuner picks kernels eagerly: on the Xeon with AMX (1 thread) fbgemm decoded a w8a8
    stdlib_lm token in 3.9 ms eagerly against oneDNN's 6.1 ms, but compiled it broke the graph
    at each layer (10.7 ms, eager kept), while oneDNN's compiled max-autotune took 1.2 ms."""
    if onednn_u8s8_saturates():
        return []
    swaps: Swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is FbgemmInt8Linear:
                setattr(parent, name, onednn_twin(child))
                swaps.append((parent, name, child))
    return swaps


def tree_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree: every module that has submodules copied shallowly
    (its own table of submodules), the leaves and every parameter, buffer and other attribute
    shared. Swapping a layer in the copy leaves ``model`` as it was, at the cost of the module
    objects alone (a leaf is not copied: copying a packed int8 layer repacks its weight)."""
    copies: dict[int, nn.Module] = {}

    def copied(module: nn.Module) -> nn.Module:
        if not module._modules:
            return module
        if id(module) not in copies:
            twin = copy.copy(module)
            copies[id(module)] = twin
            twin._modules = {
                k: None if v is None else copied(v) for k, v in module._modules.items()
            }
        return copies[id(module)]

    return copied(model)


def lowered_copy(model: nn.Module) -> tuple[nn.Module, Swaps]:
    """``model`` as Inductor lowers best: a :func:`tree_copy` with :func:`lowerable_int8`'s
    swaps made in it, ``model`` itself and no swaps where there is nothing to swap. ``model``
    stays as it is."""
    if onednn_u8s8_saturates() or not any(type(m) is FbgemmInt8Linear for m in model.modules()):
        return model, []
    tree = tree_copy(model)
    return tree, lowerable_int8(tree)


def undo_swaps(swaps: Swaps) -> None:
    """Put back the layers :func:`lowerable_int8` replaced."""
    for parent, name, original in swaps:
        setattr(parent, name, original)


def swapped_note(swaps: Swaps) -> str:
    """What the compiled model says of the swaps (empty when none)."""
    if not swaps:
        return ""
    return f"; {len(swaps)} fbgemm int8 Linear layer(s) on oneDNN's kernel, which Inductor lowers"


def _signature(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes Dynamo compile again under static shapes: each tensor's shape, dtype and
    strides, other values themselves, and whether inference mode is on."""
    leaves = pytree.tree_leaves((args, dict(kwargs)))
    return (
        torch.is_inference_mode_enabled(),
        *(
            (tuple(v.shape), v.dtype, v.stride()) if isinstance(v, torch.Tensor) else repr(v)
            for v in leaves
        ),
    )


INPUT_NOISE = 1e-5
"""Relative size of the seeded input perturbation that gives a check its noise floor
(:func:`rounding_floor`)."""


def _relative(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def rounding_floor(fn: Callable[..., Any], args: Any, kwargs: Any, eager_out: Any) -> float:
    """How far ``fn``'s output (relative L2 from ``eager_out``) moves when its floating-point
    inputs move by :data:`INPUT_NOISE` (relative, seeded), a stand-in for the float rounding
    a compiled graph's fusions change at every layer. An int8 plan's moves by much more than
    a float one's, its activation codes flipping and the flips carried through its depth (a
    timm ViT-Tiny in ``w8a8``: 2.6-2.8 % over five seeds, fp32 7e-6; its compiled output was
    1.1 % from the eager one, 3.2 % from fp32 against the eager plan's 3.1 %); ``0.0`` for
    inputs with nothing to perturb."""
    generator = torch.Generator().manual_seed(0)

    def nudged(t: Tensor) -> Tensor:
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        return t * (1 + INPUT_NOISE * noise.to(t.device, t.dtype))

    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
        return 0.0
    a, k = pytree.tree_map_only(
        Tensor, lambda t: nudged(t) if t.is_floating_point() else t, (args, kwargs)
    )
    got, want = output_tensor(fn(*a, **k)).float(), output_tensor(eager_out).float()
    return _relative(got, want) if got.shape == want.shape else 0.0


def _check_close(
    compiled: Any, eager: Any, *, rtol: float = CHECK_RTOL, floor: float = 0.0
) -> str | None:
    """Why the compiled output does not match the eager one within ``rtol`` or the eager
    model's own ``floor`` (:func:`rounding_floor`), whichever is larger (relative L2; ``None``
    when it does)."""
    got, want = output_tensor(compiled).float(), output_tensor(eager).float()
    if got.shape != want.shape:
        return f"compiled output shape {tuple(got.shape)} != eager {tuple(want.shape)}"
    diff, allowed = _relative(got, want), max(rtol, floor)
    if not diff <= allowed:
        said = f"{rtol}" if allowed == rtol else f"the eager output's own move {floor:.3g}"
        return f"compiled output differs from eager by {diff:.3g} (relative L2 > {said})"
    return None


def check_against(
    eager: Callable[..., Any],
    got: Any,
    expected: Any,
    args: Any,
    kwargs: Any,
    *,
    rtol: float = CHECK_RTOL,
) -> str | None:
    """:func:`_check_close` of a compiled output ``got`` against ``expected = eager(*args,
    **kwargs)``; where it fails, again within the eager function's :func:`rounding_floor`
    (measured only then: one more eager call)."""
    reason = _check_close(got, expected, rtol=rtol)
    if reason is None:
        return None
    floor = rounding_floor(eager, args, kwargs, expected)
    return _check_close(got, expected, rtol=rtol, floor=floor)


def failed(what: str, error: Exception) -> str:
    """A fallback's reason: ``what`` failed, with the error's type and first line.

    >>> failed("compilation", ValueError("bad shape\\nmore"))
    'compilation failed (ValueError: bad shape)'
    """
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{what} failed ({type(error).__name__}: {first_line})"


def _cpp_compiler_missing() -> str | None:
    """Why Inductor cannot build its C++ kernels here (``None`` when a compiler is found)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as error:
        return f"no C++ compiler for Inductor ({type(error).__name__}: {error})"
    return None


RACE_CALLS = 5
"""Calls of the compiled and the eager model, interleaved, timed on the first input."""


def _race(
    compiled: Any,
    eager: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    after: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Median ms of the compiled and the eager model on the same input, called in turn
    (``after`` runs after each call, untimed: e.g. to undo what the call wrote)."""
    times: dict[Any, list[float]] = {compiled: [], eager: []}
    for _ in range(RACE_CALLS):
        for model, samples in times.items():
            start = time.perf_counter()
            model(*args, **kwargs)
            samples.append((time.perf_counter() - start) * 1e3)
            if after is not None:
                after()
    return statistics.median(times[compiled]), statistics.median(times[eager])


def slower_reason(compiled_ms: float, eager_ms: float) -> str | None:
    """Why the eager model is kept: the compiled one was not faster on the first input
    (``None``: it was).

    >>> slower_reason(1.0, 2.0) is None
    True
    >>> slower_reason(2.5, 2.0)
    'compiled 2.5 ms vs eager 2 ms on the first input: the eager model is kept'
    """
    if compiled_ms < eager_ms:
        return None
    return f"compiled {compiled_ms:.3g} ms vs eager {eager_ms:.3g} ms on the first input: the eager model is kept"


_PENDING = {"mode": "pending", "reason": "compiled by Inductor on the first call (or warmup)"}


class CompiledModel(nn.Module):
    race = True

    """A quantized model run through Inductor, falling back to itself in eager mode.

    It holds the quantized model ``eager`` and shares its layers, parameters and buffers (the
    same names, state dict and bytes: :func:`storage_bytes`); ``mpsearch_compile`` says what
    happened: ``{"mode": "pending" | "inductor" | "eager", "reason": ...}``. It runs without
    autograd; the compiled graphs freeze the weights as they were at compile time, and do not
    see hooks added after compiling nor those of the ``w8a8`` layers (``eager`` does).
    ``race`` (default ``True``): time the compiled and the eager model on the first input and
    keep the faster (``timings_ms``); ``False`` keeps the compiled one whenever it compiles.

    >>> net = CompiledModel(nn.Sequential(nn.Linear(4, 2)).eval())
    >>> net.mpsearch_compile["mode"], list(net.state_dict())
    ('pending', ['0.weight', '0.bias'])
    """

    def __init__(self, eager: nn.Module) -> None:
        super().__init__()
        self._modules = eager._modules
        self._parameters = eager._parameters
        self._buffers = eager._buffers
        object.__setattr__(self, "eager", eager)  # not a submodule: its parts are this one's
        self._swaps = lowerable_int8(eager)  # undone if it runs eagerly
        self.mpsearch_compile = dict(_PENDING)
        self.timings_ms: dict[str, float] = {"compiled": float("nan"), "eager": float("nan")}
        self._reset()

    def _reset(self) -> None:
        compiled = torch.compile(self.eager, backend="inductor", dynamic=False)
        object.__setattr__(self, "_compiled", compiled)
        self._compiled_for: set[tuple[Any, ...]] = set()

    def _fall_back(self, reason: str) -> None:
        undo_swaps(self._swaps)
        self._swaps = []
        self.mpsearch_compile = {"mode": "eager", "reason": reason}
        warnings.warn(
            f"cpu-inductor: running the quantized model eagerly: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if self.mpsearch_compile["mode"] == "eager":
                return self.eager(*args, **kwargs)
            key = _signature(args, kwargs)
            if key in self._compiled_for:
                try:
                    return self._compiled(*args, **kwargs)
                except Exception:  # Dynamo compiled again (a guard beyond the signature
                    self._compiled_for.discard(key)  # failed, e.g. a hook added) unfrozen
            return self._compile_and_check(key, args, kwargs)

    def _compile_and_check(
        self, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        expected = self.eager(*args, **kwargs)
        reason = _cpp_compiler_missing()
        if reason is None:
            try:
                with _compile_settings():
                    got = self._compiled(*args, **kwargs)
            except Exception as error:
                reason = failed("compilation", error)
            else:
                reason = check_against(self.eager, got, expected, args, kwargs)
        if reason is None and self.race and not self._compiled_for:  # the first input decides
            compiled_ms, eager_ms = _race(self._compiled, self.eager, args, kwargs)
            reason = slower_reason(compiled_ms, eager_ms)
            self.timings_ms = {"compiled": compiled_ms, "eager": eager_ms}
        if reason is not None:
            self._fall_back(reason)
            return expected
        self._compiled_for.add(key)
        said = f"compiled by Inductor for {len(self._compiled_for)} input signature(s)"
        said += swapped_note(self._swaps)
        timed = self.timings_ms
        if timed["compiled"] == timed["compiled"]:  # raced (not NaN)
            said += f"; {timed['compiled']:.3g} ms vs {timed['eager']:.3g} ms eager on the first"
        self.mpsearch_compile = {"mode": "inductor", "reason": said}
        return got

    def warmup(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        """Compile (and check) for the inputs ``args`` / ``kwargs`` now; what happened."""
        self(*args, **kwargs)
        return dict(self.mpsearch_compile)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_compiled"], state["_compiled_for"]
        state["_swaps"] = []  # the twins stay; the layers they replaced are not copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset()
        if self.mpsearch_compile["mode"] == "inductor":  # compiled graphs are not copied
            self.mpsearch_compile = dict(_PENDING)


class CpuInductorBackend(CpuBackend):
    """The ``cpu`` backend's kernels and choices, the whole model compiled by Inductor
    (:class:`CompiledModel`: on the first call, falling back to eager with the reason).

    >>> import mpsearch as mps
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    >>> mps.quantize(net, "bf16", backend="cpu-inductor").mpsearch_compile["mode"]
    'pending'
    """

    name = "cpu-inductor"

    def finalize(self, model: nn.Module, assignment: Mapping[str, str]) -> nn.Module:
        return CompiledModel(super().finalize(model, assignment))


__all__ = [
    "CHECK_RTOL",
    "RACE_CALLS",
    "CompiledModel",
    "CpuInductorBackend",
    "Swaps",
    "failed",
    "lowerable_int8",
    "lowered_copy",
    "slower_reason",
    "swapped_note",
    "tree_copy",
    "undo_swaps",
]
