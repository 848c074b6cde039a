"""Reduced-precision layers of the ``simulate`` backend, evaluated fast on CPUs without bf16 units.

A ``simulate`` layer whose scheme computes in bf16 or fp16 (``bf16``, ``w4a16``, ``w8a16``...)
runs a real bf16/fp16 convolution. On a CPU without native bf16 support (AVX2 only) PyTorch
takes a slow reference path for it: measured on this project's 2-core machine, 10-45x a float32
convolution of the same shape, which alone made the profile of a ResNet-18 cost more than its
end-to-end errors. On a CPU with bf16 units the real kernel is the fast one (AMD EPYC Zen 4,
AVX-512 BF16: 0.5-0.8x a float32 Linear or convolution, the emulation 1.1-1.3x). Which one
the profiler runs follows the CPU's bf16 / fp16 units (:func:`native_is_faster`): the same
choice in every process on a machine, so profiles, their cache keys and a study's workers
agree. The emulation is exact-product:
inputs, weight and bias rounded to the compute dtype (as the layer does), the convolution in
float32, and the output rounded to the compute dtype. A product of two bf16 (or fp16) values is
exact in float32 and the hardware kernels accumulate in float32 too, so the result is the same
up to the order of the float32 sums (an output may round to the neighbouring bf16 value).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mpsearch.backends._recurrent import RNN_TYPES, SimulatedRNN
from mpsearch.backends._simulate import SimulateBackend, SimulatedLayer
from mpsearch.cost._timing import cpu_flags
from mpsearch.layers import layer_forward
from mpsearch.layers._expert_linears import ExpertLinears, follows_expert_interface
from mpsearch.layers._experts import is_expert_bank
from mpsearch.layers._layers import TRANSPOSED_CONV_TYPES, carry_hooks, with_own_forward
from mpsearch.schemes import Scheme, fake_quantize

_EMULATED = (torch.bfloat16, torch.float16)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EmulatedLayer(SimulatedLayer):
    """A :class:`SimulatedLayer` whose bf16/fp16 arithmetic runs as float32 on CPU tensors.

    >>> from mpsearch.schemes import get_scheme
    >>> conv = nn.Conv2d(8, 8, 3).eval()
    >>> x = torch.randn(2, 8, 6, 6)
    >>> bf16 = get_scheme("bf16")
    >>> fast, real = EmulatedLayer(conv, bf16), SimulatedLayer(conv, bf16)
    >>> bool(((fast(x) - real(x)).abs() <= 2**-7 * real(x).abs() + 1e-6).all())
    True
    """

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__(layer, scheme, act_range=act_range)
        self.weight_f32 = self.weight_q.float()
        self.bias_f32 = None if self.bias_c is None else self.bias_c.float()
        act = scheme.activation
        self._act_is_compute_dtype = (
            act is not None
            and not act.scaled
            and act.fmt.torch_dtype is not None
            and act.fmt.torch_dtype == self.compute_dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu or self.compute_dtype not in _EMULATED:
            return super().forward(x)
        out_dtype = x.dtype
        act = self.scheme.activation
        # an activation format that is the compute dtype itself is applied by the cast below
        if act is not None and not act.is_identity and not self._act_is_compute_dtype:
            lo, hi = self.act_range if self.act_range is not None else (None, None)
            x = fake_quantize(x.float(), act, lo=lo, hi=hi)
        xc = x.to(self.compute_dtype).float()
        y = layer_forward(self.inner, xc, self.weight_f32, self.bias_f32)
        return y.to(self.compute_dtype).to(out_dtype)


_EMULATED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_CONV_TYPES)
"""Layers :class:`EmulatedLayer` runs (one weight, a functional forward); LSTM and GRU layers
take :class:`SimulatedRNN`'s float32 loop, the others (Embedding, HF Conv1D) the backend's own
quantized layer."""

PROBE_ROUNDS = 3
"""Timed rounds (after one warm-up) of each probe operation in :func:`native_is_faster`."""


def _best_seconds(fn: Callable[[], object]) -> float:
    fn()
    best = float("inf")
    for _ in range(PROBE_ROUNDS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


NATIVE_UNITS: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}
"""The CPU flags (/proc/cpuinfo) of units that compute each dtype natively. Measured on C
(AVX-512 BF16): a bf16 Linear at 0.56-0.78x fp32's time, the emulation 1.2x; on B (AVX2
only): real bf16 convolutions 10-45x fp32, the emulation about 1.2x."""


@functools.cache
def native_is_faster(dtype: torch.dtype) -> bool:
    """Whether this CPU runs a ``dtype`` convolution and Linear layer faster natively than as
    :class:`EmulatedLayer` does (float32 on rounded operands).

    Where the CPU lists its flags, whether it has a unit for ``dtype``
    (:data:`NATIVE_UNITS`): a timing race between the two would be decided by the load of
    the moment, and two processes of one study (its workers) measured different profiles
    from it. Elsewhere measured once per process (:func:`_measured_native_is_faster`).

    >>> isinstance(native_is_faster(torch.bfloat16), bool)
    True
    """
    flags = cpu_flags()
    if flags:
        return any(unit in flags for unit in NATIVE_UNITS.get(dtype, ()))
    return _measured_native_is_faster(dtype)


def _measured_native_is_faster(dtype: torch.dtype) -> bool:
    """Whether a 3x3 convolution (32 channels, 16x16, batch 8) and a Linear layer (256 x 256,
    512 rows) both run faster natively in ``dtype`` than emulated, the best of
    :data:`PROBE_ROUNDS` each; a few milliseconds."""
    g = torch.Generator().manual_seed(0)
    cases = [
        (nn.Conv2d(32, 32, 3, padding=1), torch.randn(8, 32, 16, 16, generator=g)),
        (nn.Linear(256, 256), torch.randn(512, 256, generator=g)),
    ]
    with torch.inference_mode():
        for layer, x in cases:
            low = (
                layer.weight.to(dtype),
                layer.bias.to(dtype),
                layer.weight.to(dtype).float(),
                layer.bias.to(dtype).float(),
            )

            def native(layer: nn.Module = layer, x: Tensor = x, w: tuple = low) -> Tensor:
                return layer_forward(layer, x.to(dtype), w[0], w[1]).float()

            def emulated(layer: nn.Module = layer, x: Tensor = x, w: tuple = low) -> Tensor:
                y = layer_forward(layer, x.to(dtype).float(), w[2], w[3])
                return y.to(dtype).float()

            if _best_seconds(native) >= _best_seconds(emulated):
                return False
    return True


def emulates(scheme: Scheme) -> bool:
    """Whether the profiler runs ``scheme``'s Linear and convolution layers as
    :class:`EmulatedLayer` on CPU tensors: a bf16/fp16 compute dtype this CPU runs slower
    natively (:func:`native_is_faster`)."""
    dtype = _DTYPES.get(scheme.compute_dtype)
    return dtype in _EMULATED and not native_is_faster(dtype)


def compute_paths(impl: object, schemes: Sequence[Scheme]) -> dict[str, str]:
    """How the profile runs each bf16/fp16 compute dtype of ``schemes`` on the ``simulate``
    backend: ``"native"`` or ``"emulated"`` (:func:`emulates`); empty for other backends.

    >>> from mpsearch.backends import get_backend
    >>> from mpsearch.schemes import get_scheme
    >>> compute_paths(get_backend("simulate"), [get_scheme("w8a8")])
    {}
    """
    if type(impl) is not SimulateBackend:
        return {}
    paths = {}
    for scheme in schemes:
        if _DTYPES.get(scheme.compute_dtype) in _EMULATED:
            paths[scheme.compute_dtype] = "emulated" if emulates(scheme) else "native"
    return paths


def profile_layer(impl: object, layer: nn.Module, scheme: Scheme) -> nn.Module:
    """``impl.quantize_layer(layer, scheme)``, emulated where :func:`emulates` says so (a
    Mixture-of-Experts bank's expert Linear layers too).

    >>> from mpsearch.backends import get_backend
    >>> from mpsearch.schemes import get_scheme
    >>> bf16 = get_scheme("bf16")
    >>> got = type(profile_layer(get_backend("simulate"), nn.Linear(4, 4), bf16)).__name__
    >>> got == ("EmulatedLayer" if emulates(bf16) else "SimulatedLayer")
    True
    """
    module = None
    if type(impl) is SimulateBackend and emulates(scheme):
        if isinstance(layer, _EMULATED_LAYERS):
            module = EmulatedLayer(layer, scheme)
        elif isinstance(layer, RNN_TYPES):
            module = SimulatedRNN(layer, scheme, native=False)  # float32 loop, rounded operands
        elif is_expert_bank(layer) and follows_expert_interface(layer):  # its expert Linears
            module = ExpertLinears(layer, scheme, lambda linear, s: profile_layer(impl, linear, s))
    if module is None:
        module = impl.quantize_layer(layer, scheme)  # type: ignore[attr-defined]
    # Gemma's scaled embedding keeps its scale, and a layer its user's hooks
    return carry_hooks(layer, with_own_forward(layer, module))
