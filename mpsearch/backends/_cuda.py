"""The ``cuda`` backend: bf16/fp16 casts and torchao's fp8, int8 and int4 kernels on a GPU.

Nothing here touches CUDA at import; the backend checks for a device only when asked
(``unavailable_reason``), and ``quantize`` refuses to start without one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from mpsearch.backends._kernels import CastLayer, Kernel, KernelBackend, KernelTable, RealLayer
from mpsearch.layers._layers import TRANSPOSED_CONV_TYPES, base_copy
from mpsearch.schemes import Scheme


class TorchaoLinear(RealLayer):
    """A Linear quantized in place by a torchao config (its weight becomes a torchao tensor
    subclass that dispatches to the GPU kernel); input cast to the config's activation dtype."""

    def __init__(self, layer: nn.Linear, scheme: Scheme, config: object, dtype: torch.dtype):
        super().__init__()
        from torchao.quantization import quantize_

        self.scheme_name = scheme.name
        self.dtype = dtype
        inner = base_copy(layer).to(device="cuda", dtype=dtype)
        quantize_(inner, config)
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.to(self.dtype)).to(x.dtype)


def _torchao(make_config: Callable[[Scheme], object], dtype: torch.dtype):
    def build(layer: nn.Module, scheme: Scheme, *, act_range=None) -> nn.Module:
        return TorchaoLinear(layer, scheme, make_config(scheme), dtype)

    return build


def _fp8_config(scheme: Scheme) -> object:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _int8_config(scheme: Scheme) -> object:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int8_weight_only_config(scheme: Scheme) -> object:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4_config(scheme: Scheme) -> object:
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=scheme.weight.group_size or 32)


def _cast(layer: nn.Module, scheme: Scheme, *, act_range=None) -> nn.Module:
    return CastLayer(layer, scheme, device="cuda")


_CAST = Kernel(_cast, "the layer in the scheme's dtype on the GPU")

CUDA_KERNELS: KernelTable = {
    **{(kind, s): _CAST for kind in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_CONV_TYPES)
       for s in ("fp32", "bf16", "fp16")},
    (nn.Linear, "fp8"): Kernel(_torchao(_fp8_config, torch.bfloat16), "torchao float8 dynamic, per row (torch._scaled_mm)"),
    (nn.Linear, "w8a8"): Kernel(_torchao(_int8_config, torch.float32), "torchao int8 dynamic activation, int8 weight"),
    (nn.Linear, "w8a16"): Kernel(_torchao(_int8_weight_only_config, torch.bfloat16), "torchao int8 weight-only"),
    (nn.Linear, "w4a16"): Kernel(_torchao(_int4_config, torch.bfloat16), "torchao int4 weight-only"),
}  # fmt: skip


class CudaBackend(KernelBackend):
    """Real kernels on an NVIDIA GPU; refused (with the reason) where there is none.

    >>> CudaBackend().name
    'cuda'
    """

    name = "cuda"
    kernels = CUDA_KERNELS

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is present (torch.cuda.is_available() is False)"
        return None

    def finalize(self, model: nn.Module, assignment: Mapping[str, str]) -> nn.Module:
        """Move the rest of the model (norms, embeddings...) to the GPU with its layers."""
        return model.to("cuda")


__all__ = ["CUDA_KERNELS", "CudaBackend"]
