"""The ``cpu`` backend: real low-precision kernels on x86 CPUs (oneDNN int8, aten packed int8
and int4 weight-only matmuls, bf16/fp16 with channels-last convolutions).

Kernel choices were measured (1 thread, 6 x Linear(2048); ResNet-18 convolutions at batch 8):

=========================  =====================================  ===========================
(layer, scheme)            chosen kernel                          measured against
=========================  =====================================  ===========================
Linear w8a8                oneDNN ``qlinear_pointwise`` (2.3 ms    ``quantize_dynamic`` 4.1 ms,
                           at batch 32); fbgemm where oneDNN      torchao int8 dynamic 6.2 ms;
                           lacks VNNI (AVX2 EPYC, 4096x4096:      oneDNN 8.1 / 13.8 ms
                           0.72 ms at batch 1, 7.5 at batch 32)   (fp32 4.3 / 30 ms)
Conv w8a8                  oneDNN ``qconv_pointwise``             (fp32 channels-last 0.9 ms)
                           (0.46 ms, 64ch 16x16)
Conv bf16                  channels-last bf16 (0.15 ms)           NCHW bf16 0.37 ms
Linear w8a16 / w4a16       ``_weight_int8pack_mm`` /              dequantize + bf16 matmul
                           ``_weight_int4pack_mm_for_cpu``        (9 ms: slower than fp32)
Conv w8a16 / w4a16         packed codes dequantized per call +    im2col + the Linear kernels
                           the bf16 convolution (14 ms, 64ch 3x3  above (112 ms): built for
                           56x56 batch 8, 2 threads, Zen 4)       few rows, a conv has many
LSTM / GRU w8a8           PyTorch's dynamic int8 RNN             (see the benchmark figures
                           (``torch.quantized_lstm`` / ``_gru``,  in the module
                           fbgemm packed weights)                 ``_recurrent``)
Embedding int8/int4/int2   codes packed in bytes + per-row (or    (a lookup: memory, not
(weight-only)              per-group) scales, gathered rows       speed)
                           dequantized
fp8                        none: ``torch._scaled_mm`` on CPU is a reference path, ~20x slower
                           than fp32, so fp8 is refused (``simulate`` runs it)
=========================  =====================================  ===========================

fp32 runs the user's own layer (an fp32 plan is the user's model). Further implementations
(:data:`CPU_IMPLEMENTATIONS`: NCHW, channels-last and im2col convolutions, the other int8
Linear engine) are timed against these by the autotuner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mpsearch._validation import wrong_type
from mpsearch.backends._conv import (
    CONV_IMPLEMENTATIONS,
    CONV_KERNELS,
    INT8_SCHEMES,
    int8_linear_type,
)
from mpsearch.backends._embedding import CastEmbedding, QuantizedEmbedding
from mpsearch.backends._experts import QuantizedExperts
from mpsearch.backends._kernels import (
    CastLayer,
    FbgemmInt8Linear,
    Implementations,
    Int4WeightOnlyLinear,
    Int8Conv,
    Int8Linear,
    Int8WeightOnlyLinear,
    Kernel,
    KernelBackend,
    KernelTable,
    conv_int8_check,
)
from mpsearch.backends._recurrent import INT8_RNN_SCHEMES, RNN_TYPES, CastRNN, Int8DynamicRNN
from mpsearch.layers._expert_linears import ExpertLinears, ExpertRanges, follows_expert_interface
from mpsearch.layers._experts import ExpertBank
from mpsearch.layers._layers import TRANSPOSED_CONV_TYPES
from mpsearch.schemes import Scheme


def _cast(layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None):
    return CastLayer(layer, scheme)


def _int8_linear(layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None):
    return int8_linear_type()(layer, scheme, act_range=act_range)


def _own_layer(layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None):
    return layer


_CAST = Kernel(_cast, "the layer in the scheme's dtype (2-D convolutions channels-last)")


def _fbgemm_check(layer: nn.Module, scheme: Scheme) -> str | None:
    if "fbgemm" in torch.backends.quantized.supported_engines:
        return None
    return "PyTorch's dynamic int8 RNN kernel needs the fbgemm engine, absent from this build"


_RNN_INT8 = Kernel(
    Int8DynamicRNN,
    "PyTorch's dynamic int8 RNN (torch.quantized_lstm / quantized_gru, fbgemm): int8 weights "
    "per gate row x uint8 per-tensor dynamic activations, float32 gates and cell state",
    _fbgemm_check,
)
_EMBEDDING_INT = Kernel(
    QuantizedEmbedding,
    "weight-only integer table (codes packed in bytes, per-row or per-group scales), gathered "
    "rows dequantized; the scheme's activation format does not apply to token ids",
)
EMBEDDING_INT_SCHEMES = (
    "w8a8", "w8a16", "w4a16", "w4a16_pc", "w4a8", "w4a8_pc", "w4a4", "w4a4_pc", "w2a16",
    "w2a16_pc",
)  # fmt: skip
"""Schemes an embedding runs in for real on CPU: their integer weight format, weight-only."""

_OWN = Kernel(_own_layer, "the user's layer as it is (fp32, no copy)", name="module")


def _experts(layer: nn.Module, scheme: Scheme, *, act_range: ExpertRanges | None = None):
    if follows_expert_interface(layer):
        return ExpertLinears(layer, scheme, CpuBackend().quantize_layer, act_range=act_range)
    return QuantizedExperts(layer, scheme)


def _experts_check(layer: nn.Module, scheme: Scheme) -> str | None:
    if follows_expert_interface(layer):
        up = "gate_up_proj" if layer.has_gate else "up_proj"
        shapes = [getattr(layer, n).shape[1:] for n in (up, "down_proj")]
        for out, inp in (reversed(s) if layer.is_transposed else s for s in shapes):
            why = CpuBackend().unsupported_reason(nn.Linear(inp, out, device="meta"), scheme)
            if why:
                return f"its expert Linear layers: {why}"
        return None
    if scheme.name in EXPERT_SCHEMES:
        return None
    return (
        f"a bank outside Hugging Face's expert interface runs its own forward on dequantized "
        f"weights, in {', '.join(EXPERT_SCHEMES)}"
    )


_EXPERTS = Kernel(
    _experts,
    "a bank of Hugging Face's expert interface: each expert's Linear layers on the Linear "
    "kernels of this table, routed as the interface's eager forward; another bank: its own "
    "forward on its expert weights stored as packed integer codes with per-channel or "
    "per-group scales (or bf16 / fp16), dequantized at each call",
    _experts_check,
)
EXPERT_SCHEMES = (
    "bf16", "fp16", "w8a8", "w8a16", "w4a16", "w4a16_pc", "w4a8", "w4a8_pc", "w4a4", "w4a4_pc",
    "w2a16", "w2a16_pc",
)  # fmt: skip
"""Schemes a Mixture-of-Experts bank may run in on CPU: a bank of Hugging Face's expert
interface those its expert Linear layers' kernels take; another bank their weight format,
weight-only (the activation format does not apply: ``mpsearch.backends._experts``)."""

FLOAT_ONLY_TYPES = (nn.Conv3d, *TRANSPOSED_CONV_TYPES)
"""Layers the ``cpu`` backend runs in float and weight-only schemes only (fp32, bf16, fp16;
w8a16, w4a16, w4a16_pc as :class:`DequantConv`): PyTorch's int8 x int8 CPU kernels are for
Linear and 1-D / 2-D convolutions."""

CPU_KERNELS: KernelTable = {
    # fp32: the user's own layer, so an fp32 plan is the user's model (shared weights stay shared)
    **{
        (kind, "fp32"): _OWN
        for kind in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *FLOAT_ONLY_TYPES)
    },
    **{(kind, s): _CAST for kind in (nn.Linear, nn.Conv1d, nn.Conv2d, *FLOAT_ONLY_TYPES)
       for s in ("bf16", "fp16")},
    (nn.Linear, "w8a8"): Kernel(
        _int8_linear,
        "u8 x s8 -> fp32: fbgemm on CPUs without VNNI, else oneDNN qlinear_pointwise",
    ),
    (nn.Conv1d, "w8a8"): Kernel(Int8Conv, "oneDNN qconv_pointwise (as 2-D)", conv_int8_check),
    (nn.Conv2d, "w8a8"): Kernel(Int8Conv, "oneDNN qconv_pointwise, channels-last", conv_int8_check),
    **CONV_KERNELS,
    (nn.Linear, "w8a16"): Kernel(Int8WeightOnlyLinear, "aten._weight_int8pack_mm (bf16 x s8)"),
    (nn.Linear, "w4a16"): Kernel(Int4WeightOnlyLinear, "aten._weight_int4pack_mm_for_cpu"),
    (nn.Linear, "w4a16_pc"): Kernel(
        Int4WeightOnlyLinear, "aten._weight_int4pack_mm_for_cpu, the channel's scale repeated per group"
    ),
    **{(kind, s): Kernel(CastRNN, "the LSTM / GRU in the scheme's dtype")
       for kind in RNN_TYPES for s in ("fp32", "bf16", "fp16")},
    **{(kind, s): _RNN_INT8 for kind in RNN_TYPES for s in INT8_RNN_SCHEMES},
    **{(nn.Embedding, s): Kernel(CastEmbedding, "the table in the scheme's dtype")
       for s in ("bf16", "fp16")},
    **{(nn.Embedding, s): _EMBEDDING_INT for s in EMBEDDING_INT_SCHEMES},
    (ExpertBank, "fp32"): _OWN,
    **{(ExpertBank, s): _EXPERTS for s in EXPERT_SCHEMES},
    **{
        (kind, "w4a8_pc"): Kernel(
            build, "the w8a8 kernels on 4-bit codes held in int8: the scheme's arithmetic, "
            "int8 memory and speed", check,
        )
        for kind, build, check in (
            (nn.Linear, _int8_linear, None),
            (nn.Conv1d, Int8Conv, conv_int8_check),
            (nn.Conv2d, Int8Conv, conv_int8_check),
        )
    },
}  # fmt: skip

_MISSING: dict[str, str] = {
    "fp8": "torch._scaled_mm only has a slow reference path on CPU",
    "fp4": "no fp4 matmul kernel on CPU",
    "w2a16": "no 2-bit kernel on CPU",
    "w4a8": "no int4 x int8 kernel on CPU",
    "w4a4": "no int4 x int4 kernel on CPU",
    "w4a4_pc": "no int4 x int4 kernel on CPU",
    "w2a16_pc": "no 2-bit kernel on CPU",
    "fp4_pc": "no fp4 matmul kernel on CPU",
}


def _not_default(kind: type[nn.Module]) -> Callable[[nn.Module, Scheme], str | None]:
    """The check of a Linear int8 kernel offered beside the default: refused where it is the
    default (no second timing of one kernel) or where its engine is missing."""

    def check(layer: nn.Module, scheme: Scheme) -> str | None:
        if kind is FbgemmInt8Linear and "fbgemm" not in torch.backends.quantized.supported_engines:
            return "fbgemm is absent from this PyTorch build"
        if int8_linear_type() is kind:
            return f"{kind.__name__} already is the default int8 Linear kernel on this CPU"
        return None

    return check


_INT8_LINEARS = (
    Kernel(Int8Linear, "oneDNN qlinear_pointwise (u8 x s8 -> fp32)", _not_default(Int8Linear),
           name="onednn"),
    Kernel(FbgemmInt8Linear, "fbgemm (u8 x s8 -> fp32)", _not_default(FbgemmInt8Linear),
           name="fbgemm"),
)  # fmt: skip


def _on_expert_linears(kernel: Kernel) -> Kernel:
    """``kernel`` (a Linear layer's) for each expert Linear layer of an interface bank."""

    def build(
        layer: nn.Module, scheme: Scheme, *, act_range: ExpertRanges | None = None
    ) -> nn.Module:
        return ExpertLinears(layer, scheme, kernel.build, act_range=act_range)

    def check(layer: nn.Module, scheme: Scheme) -> str | None:
        if not follows_expert_interface(layer):
            return "a bank outside Hugging Face's expert interface has no expert Linear layers"
        return _experts_check(layer, scheme) or (kernel.check and kernel.check(layer, scheme))

    described = f"each expert's Linear layers on {kernel.description}"
    return Kernel(build, described, check, name=kernel.name)


CPU_IMPLEMENTATIONS: Implementations = {
    **CONV_IMPLEMENTATIONS,
    (nn.Conv2d, "fp32"): (  # 'direct' (an NCHW copy) would time the user's layer again
        *(k for k in CONV_IMPLEMENTATIONS[(nn.Conv2d, "fp32")] if k.name != "direct"),
        Kernel(_cast, "a copy of the layer, channels-last", name="channels_last"),
    ),
    **{(nn.Linear, s): _INT8_LINEARS for s in INT8_SCHEMES},
    **{(ExpertBank, s): tuple(_on_expert_linears(k) for k in _INT8_LINEARS) for s in INT8_SCHEMES},
}
"""Alternatives to :data:`CPU_KERNELS`' defaults by (layer type, scheme), each with its own
name, timed against the default by the autotuner. A bank of Hugging Face's expert interface
takes each int8 Linear kernel for its experts' Linear layers: on the Xeon with AMX (2 threads),
a Mixtral-size w8a8 bank decoding one token ran 1.5-1.7x faster on fbgemm's than on the
default oneDNN's (``benchmarks/bench_experts.py``)."""


_MISSING_BY_KIND: dict[type[nn.Module], str] = {
    **{
        kind: f"{kind.__name__} runs in float and weight-only schemes (no int8 x int8 kernel "
        "for it)"
        for kind in FLOAT_ONLY_TYPES
    },
    nn.RNNBase: "PyTorch's dynamic int8 RNN (w8a8, w4a8_pc) is the only quantized LSTM / GRU "
    "kernel on CPU",
    nn.RNNCellBase: "PyTorch's dynamic int8 RNN (w8a8, w4a8_pc) is the only quantized LSTM / "
    "GRU kernel on CPU",
    nn.Embedding: "no kernel for this weight format on an embedding",
    ExpertBank: "a Mixture-of-Experts bank runs schemes with an integer or bf16 / fp16 weight",
}


def register_cpu_kernel(layer_type: type[nn.Module], scheme: str, kernel: Kernel) -> None:
    """Make the ``cpu`` backend run ``layer_type`` layers in ``scheme`` with ``kernel``.

    >>> register_cpu_kernel(nn.Linear, "bf16", CPU_KERNELS[(nn.Linear, "bf16")])
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise wrong_type("layer_type", layer_type, "an nn.Module subclass")
    if not isinstance(kernel, Kernel):
        raise wrong_type("kernel", kernel, "a Kernel")
    CPU_KERNELS[(layer_type, scheme)] = kernel


class CpuBackend(KernelBackend):
    """Real kernels on the CPU: ``fp32``, ``bf16``, ``fp16`` and ``w8a8`` for Linear, Conv1d,
    Conv2d, LSTM and GRU; ``w8a16``, ``w4a16`` and ``w4a16_pc`` weight-only for Linear (HF
    ``Conv1D`` runs as a Linear), Conv1d and Conv2d; ``w4a8_pc`` on the int8 kernels (4-bit
    codes, 8-bit storage); embeddings weight-only in every integer scheme of
    :data:`EMBEDDING_INT_SCHEMES`. Every other (layer, scheme) is refused, by name. Further
    implementations of a (layer, scheme) (:data:`CPU_IMPLEMENTATIONS`) are built where
    ``choices`` names them.

    >>> import torch
    >>> from mpsearch.schemes import get_scheme
    >>> layer = CpuBackend().quantize_layer(nn.Linear(64, 32), get_scheme("w8a8"))
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    """

    name = "cpu"
    kernels = CPU_KERNELS
    implementations = CPU_IMPLEMENTATIONS

    def missing_reason(self, layer_type: type[nn.Module], scheme: Scheme) -> str | None:
        for kind, why in _MISSING_BY_KIND.items():
            if issubclass(layer_type, kind):
                return why
        return _MISSING.get(scheme.name)


__all__ = [
    "CPU_IMPLEMENTATIONS",
    "CPU_KERNELS",
    "EMBEDDING_INT_SCHEMES",
    "CpuBackend",
    "register_cpu_kernel",
]
