"""Reduced-precision layers of the ``simulate`` backend, evaluated fast on CPUs without bf16 units.

A ``simulate`` layer whose scheme computes in bf16 or fp16 (``bf16``, ``w4a16``, ``w8a16``...)
runs a real bf16/fp16 convolution. On a CPU without native bf16 support (AVX2 only) PyTorch
takes a slow reference path for it: measured on this project's 2-core machine, 10-45x a float32
convolution of the same shape, which alone made the profile of a ResNet-18 cost more than its
end-to-end errors. The profiler therefore evaluates those layers as an exact-product emulation:
inputs, weight and bias rounded to the compute dtype (as the layer does), the convolution in
float32, and the output rounded to the compute dtype. A product of two bf16 (or fp16) values is
exact in float32 and the hardware kernels accumulate in float32 too, so the result is the same
up to the order of the float32 sums (an output may round to the neighbouring bf16 value).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpsearch.backends._simulate import SimulateBackend, SimulatedLayer
from mpsearch.layers import layer_forward
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


_EMULATED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layers :class:`EmulatedLayer` runs (one weight, a functional forward); the others (LSTM,
GRU, Embedding, HF Conv1D) take the backend's own quantized layer."""


def profile_layer(impl: object, layer: nn.Module, scheme: Scheme) -> nn.Module:
    """``impl.quantize_layer(layer, scheme)``, emulated where :class:`EmulatedLayer` applies.

    >>> from mpsearch.backends import get_backend
    >>> from mpsearch.schemes import get_scheme
    >>> type(profile_layer(get_backend("simulate"), nn.Linear(4, 4), get_scheme("bf16"))).__name__
    'EmulatedLayer'
    """
    emulated = _DTYPES.get(scheme.compute_dtype) in _EMULATED
    if type(impl) is SimulateBackend and emulated and isinstance(layer, _EMULATED_LAYERS):
        return EmulatedLayer(layer, scheme)
    return impl.quantize_layer(layer, scheme)  # type: ignore[attr-defined]
