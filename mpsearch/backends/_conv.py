"""Further implementations of Conv1d / Conv2d on the ``cpu`` backend, for the autotuner to time
against the defaults (:attr:`KernelBackend.implementations`), and the weight-only convolutions.

Most run the convolution as a matrix product on the input unfolded into its receptive fields
("im2col"): the padded input viewed as ``[N, *out, C_in, *kernel]`` windows
(:meth:`Tensor.unfold`, no copy) and copied once into rows of ``C_in / groups * prod(kernel)``
values, the convolution's weight flattened the same way (``[C_out, C_in / groups *
prod(kernel)]``), so a Linear kernel runs it unchanged: the float GEMM, the int8 x int8 kernels
(:class:`Int8Linear` / :class:`FbgemmInt8Linear`) and the weight-only ones
(:class:`Int8WeightOnlyLinear`, :class:`Int4WeightOnlyLinear`, whose groups of 32 then run
along that flattened fan-in, as the simulation groups them). Any padding runs: numbers,
``'same'`` / ``'valid'`` and every ``padding_mode``.

The default weight-only convolution is :class:`DequantConv` instead: its packed codes
dequantized per call and the float convolution, faster than the weight-only GEMMs (built for
few rows) on the many rows of an unfolded input, and exact to the simulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch.backends._embedding import QuantizedEmbedding
from mpsearch.backends._kernels import (
    TORCH_DTYPES,
    ActRange,
    CastLayer,
    FbgemmInt8Linear,
    Implementations,
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8WeightOnlyLinear,
    Kernel,
    KernelTable,
    RealLayer,
    _ActQuant,
    fbgemm_int8_linear_preferred,
    int8_kernel_scheme,
)
from mpsearch.layers._layers import (
    TRANSPOSED_CONV_TYPES,
    from_rows,
    layer_forward,
    weight_rows,
    weight_shapes,
)
from mpsearch.schemes import Scheme
from mpsearch.schemes._fakequant import group_error

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
FLOAT_SCHEMES = ("fp32", "bf16", "fp16")
INT8_SCHEMES = ("w8a8", "w4a8_pc")
"""Schemes the int8 x int8 kernels run (``w4a8_pc``: 4-bit codes held in int8)."""


def int8_linear_type() -> type[Int8Linear] | type[FbgemmInt8Linear]:
    """The ``w8a8`` Linear kernel this CPU runs by default (:func:`fbgemm_int8_linear_preferred`)."""
    return FbgemmInt8Linear if fbgemm_int8_linear_preferred() else Int8Linear


@dataclass(frozen=True)
class ConvGeometry:
    """What a convolution does to its input's shape, for running it as a matrix product.

    ``pads`` is in :func:`F.pad` order (last dimension first, left then right), string paddings
    resolved as the layer resolves them (``'same'`` puts the odd pixel on the right).

    >>> g = ConvGeometry.of(nn.Conv1d(1, 8, 3, dilation=2, padding="same"))
    >>> g.pads, g.columns(g.pad(torch.arange(1.0, 5.0).reshape(1, 1, 4))).tolist()
    ((2, 2), [[[0.0, 1.0, 3.0], [0.0, 2.0, 4.0], [1.0, 3.0, 0.0], [2.0, 4.0, 0.0]]])
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    padding_mode: str
    groups: int

    @classmethod
    def of(cls, layer: nn.Module) -> ConvGeometry:
        return cls(
            tuple(layer.kernel_size),
            tuple(layer.stride),
            tuple(layer.dilation),
            tuple(layer._reversed_padding_repeated_twice),
            layer.padding_mode,
            layer.groups,
        )

    def pad(self, x: Tensor) -> Tensor:
        """``x`` padded as the layer pads it."""
        if not any(self.pads):
            return x
        if self.padding_mode == "zeros":
            return F.pad(x, self.pads)
        return F.pad(x, self.pads, mode=self.padding_mode)

    def columns(self, x: Tensor) -> Tensor:
        """The padded input ``[N, C, *size]`` as rows ``[N, *out, C * prod(kernel)]`` (one copy),
        each the receptive field of one output position in the weight's ``(C, *kernel)`` order."""
        nd = len(self.kernel)
        for i, (k, s, d) in enumerate(zip(self.kernel, self.stride, self.dilation, strict=True)):
            x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if any(d > 1 for d in self.dilation):
            x = x[(..., *(slice(None, None, d) for d in self.dilation))]
        # [N, C, *out, *kernel] -> [N, *out, C, *kernel]
        x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
        # contiguous even where a reshape is a view (C == 1): GEMMs on the overlapping windows'
        # strides ran 5x slower than one copy and a GEMM on it
        return x.reshape(*x.shape[: 1 + nd], -1).contiguous()

    def output(self, y: Tensor) -> Tensor:
        """Rows ``[N, *out, C_out]`` as the convolution's output ``[N, C_out, *out]``: channels-last
        for a 2-D convolution (the layout of the default kernels' outputs), contiguous for 1-D."""
        y = y.movedim(-1, 1)
        return y if y.dim() == 4 else y.contiguous()


def _as_linear(layer: nn.Module) -> nn.Linear:
    """``layer``'s weight flattened to ``[C_out, C_in / groups * prod(kernel)]`` and its bias,
    as the Linear the Linear kernels are built from (a view: nothing copied)."""
    weight = layer.weight.detach()
    linear = nn.Linear(1, 1, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.reshape(weight.shape[0], -1), requires_grad=False)
    linear.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), False)
    linear.out_features, linear.in_features = linear.weight.shape
    return linear


class Im2colConv(RealLayer):
    """A convolution in ``fp32`` / ``bf16`` / ``fp16`` as one GEMM on its unfolded input
    (``F.linear``; one batched GEMM over the groups where ``groups > 1``). Weight ``[groups,
    C_out / groups, C_in / groups * prod(kernel)]`` and bias stored in the scheme's dtype."""

    def __init__(self, layer: nn.Module, scheme: Scheme, *, act_range: ActRange = None) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.dtype = TORCH_DTYPES[scheme.compute_dtype]
        self.geometry = ConvGeometry.of(layer)
        g = layer.groups
        weight = layer.weight.detach().to(self.dtype)
        self.register_buffer("weight", weight.reshape(g, weight.shape[0] // g, -1).clone())
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.dtype).clone())

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        cols = self.geometry.columns(self.geometry.pad(x.to(self.dtype)))
        g, n_out, k = self.weight.shape
        if g == 1:
            y = F.linear(cols, self.weight[0], self.bias)
        else:  # [g, rows, k] x [g, k, n_out] -> rows [*, g * n_out]
            rows = cols.reshape(-1, g, k).transpose(0, 1)
            y = torch.bmm(rows, self.weight.transpose(1, 2)).transpose(0, 1).contiguous()
            y = y.view(*cols.shape[:-1], g * n_out)
            if self.bias is not None:
                y = y + self.bias
        return self.geometry.output(y).to(out_dtype)


class Im2colInt8Conv(RealLayer):
    """``w8a8`` / ``w4a8_pc`` Conv1d/Conv2d as an int8 x int8 GEMM on the unfolded activation
    codes (``groups == 1``): the input padded, then quantized per tensor as the convolution
    quantizes it (its own range, not its windows': an input a stride skips still counts; zero
    padding adds nothing to a range that always holds 0, and quantizes to the zero point
    exactly), then the Linear kernel (``linear``: the CPU's default, :func:`int8_linear_type`)
    on the rows."""

    def __init__(
        self,
        layer: nn.Module,
        scheme: Scheme,
        *,
        act_range: ActRange = None,
        linear: type[Int8Linear] | type[FbgemmInt8Linear] | None = None,
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.geometry = ConvGeometry.of(layer)
        kind = linear or int8_linear_type()
        self.linear = kind(_as_linear(layer), scheme, act_range=act_range)
        self.act = _ActQuant(int8_kernel_scheme(scheme), act_range)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        geometry = self.geometry
        q, scale, zero = self.act(geometry.pad(x.float()))
        cols = geometry.columns(q)
        y = self.linear.matmul_codes(cols.reshape(-1, cols.shape[-1]), scale, zero)
        return geometry.output(y.reshape(*cols.shape[:-1], -1)).to(out_dtype)


class Im2colWeightOnlyConv(RealLayer):
    """``w8a16`` / ``w4a16`` / ``w4a16_pc`` Conv1d/Conv2d (``groups == 1``): the weight-only
    Linear kernel (``linear``) on the bf16 input unfolded, the weight flattened to ``[C_out,
    C_in * prod(kernel)]`` (``w4a16``'s groups of 32 run along that fan-in)."""

    def __init__(
        self,
        layer: nn.Module,
        scheme: Scheme,
        *,
        act_range: ActRange = None,
        linear: type[Int8WeightOnlyLinear] | type[Int4WeightOnlyLinear],
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.geometry = ConvGeometry.of(layer)
        self.linear = linear(_as_linear(layer), scheme)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        cols = self.geometry.columns(self.geometry.pad(x.to(torch.bfloat16)))
        return self.geometry.output(self.linear(cols)).to(out_dtype)


_CONV_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_CONV_TYPES)


def settings_of(layer: nn.Module) -> nn.Module:
    """``layer`` without its tensors, as its plain convolution type (a weight-normed layer's
    parametrized class cannot be copied): the settings :func:`layer_forward` and
    :func:`from_rows` read (stride, padding and its mode, groups...), holding no weight."""
    kind = next(k for k in _CONV_KINDS if isinstance(layer, k))
    shell = kind.__new__(kind)
    tensors = ("_parameters", "_buffers", "_modules")
    shell.__dict__.update({k: v for k, v in vars(layer).items() if k not in tensors})
    shell.__dict__.update({k: {} for k in tensors})
    return shell


class DequantConv(RealLayer):
    """A weight-only convolution of any type (Conv1d / 2d / 3d, ConvTranspose1d / 2d / 3d;
    any groups and padding): the weight held as a :class:`QuantizedEmbedding` table of its
    ``C_out`` output-channel rows (codes packed ``8 // bits`` to a byte, the scheme's scales
    and zero points), dequantized whole per call and run by the layer's own convolution in
    the scheme's compute dtype: the simulation's arithmetic exactly, at the float
    convolution's speed plus one dequantization of the (small) weight."""

    def __init__(self, layer: nn.Module, scheme: Scheme, *, act_range: ActRange = None) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.dtype = TORCH_DTYPES[scheme.compute_dtype]
        rows = weight_rows(layer).detach()  # one row per output channel, as simulated
        self.rows_shape = tuple(rows.shape)
        flat = rows.reshape(rows.shape[0], -1)
        self.table = QuantizedEmbedding(nn.Embedding(*flat.shape, _weight=flat), scheme)
        self.settings = [settings_of(layer)]  # in a list: not a submodule (it holds no tensor)
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.dtype).clone())

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        settings = self.settings[0]
        rows = torch.arange(self.rows_shape[0], device=x.device)
        weight = from_rows(settings, self.table(rows).reshape(self.rows_shape)).to(self.dtype)
        return layer_forward(settings, x.to(self.dtype), weight, self.bias).to(out_dtype)


def ungrouped_check(layer: nn.Module, scheme: Scheme) -> str | None:
    """The Linear kernels run one GEMM on the whole fan-in: a grouped convolution is refused."""
    if layer.groups == 1:
        return None
    return (
        f"the im2col kernels for {scheme.name!r} run one Linear kernel on the whole unfolded "
        f"input, not one per group (this layer has groups={layer.groups})"
    )


def fan_in_group_check(layer: nn.Module, scheme: Scheme) -> str | None:
    """``w4a16``'s groups of 32 must divide the flattened fan-in ``C_in / groups * prod(kernel)``."""
    return group_error(weight_shapes(layer)[0], scheme.weight)


def weight_only_conv_check(layer: nn.Module, scheme: Scheme) -> str | None:
    """Ungrouped, and (``w4a16``) groups of the scheme's size along the flattened fan-in."""
    return ungrouped_check(layer, scheme) or fan_in_group_check(layer, scheme)


def _weight_only(linear: type[RealLayer]) -> Callable[..., nn.Module]:
    def build(layer: nn.Module, scheme: Scheme, *, act_range: ActRange = None) -> nn.Module:
        return Im2colWeightOnlyConv(layer, scheme, linear=linear)

    return build


def _direct(layer: nn.Module, scheme: Scheme, *, act_range: ActRange = None) -> nn.Module:
    return CastLayer(layer, scheme, channels_last=False)


_WEIGHT_ONLY_LINEAR = {
    "w8a16": (Int8WeightOnlyLinear, "aten._weight_int8pack_mm (bf16 x s8)"),
    "w4a16": (Int4WeightOnlyLinear, "aten._weight_int4pack_mm_for_cpu (groups along the fan-in)"),
    "w4a16_pc": (Int4WeightOnlyLinear, "aten._weight_int4pack_mm_for_cpu, per-channel scales"),
}

CONV_KERNELS: KernelTable = {
    (kind, scheme): Kernel(
        DequantConv,
        "codes packed in bytes, dequantized per call + the float convolution (any groups)",
        fan_in_group_check,
    )
    for kind in _CONV_KINDS
    for scheme in _WEIGHT_ONLY_LINEAR
}
"""The default weight-only convolution kernels of the ``cpu`` backend, for every convolution
type: the simulation's arithmetic exactly, and (Conv1d / Conv2d) faster than the weight-only GEMMs on the unfolded input at every shape
measured (AMD EPYC Zen 4, 2 threads: 64ch 3x3 56x56 batch 8, 14 ms against 112 ms for w8a16;
Conv1d(1, 64, 512, stride=4) on 16 x 16,000 samples, 51 ms against 166 ms)."""

_IM2COL = Kernel(
    Im2colConv, "im2col + one GEMM (batched over groups) in the scheme's dtype", name="im2col"
)
_DIRECT = Kernel(
    _direct, "the layer in the scheme's dtype, NCHW (not channels-last)", name="direct"
)
_IM2COL_INT8 = Kernel(
    Im2colInt8Conv,
    "im2col on the uint8 activation codes + the CPU's int8 Linear kernel (any padding)",
    ungrouped_check,
    name="im2col",
)


CONV_IMPLEMENTATIONS: Implementations = {
    **{(nn.Conv1d, s): (_IM2COL,) for s in FLOAT_SCHEMES},
    **{
        (kind, s): (
            Kernel(
                _weight_only(linear), f"im2col + {words}", weight_only_conv_check, name="im2col"
            ),
        )
        for kind in CONV_TYPES
        for s, (linear, words) in _WEIGHT_ONLY_LINEAR.items()
    },
    **{(nn.Conv2d, s): (_DIRECT, _IM2COL) for s in FLOAT_SCHEMES},
    **{(kind, s): (_IM2COL_INT8,) for kind in CONV_TYPES for s in INT8_SCHEMES},
}
"""Alternatives to the ``cpu`` backend's default convolution kernels, by (layer type, scheme)."""

__all__ = [
    "CONV_IMPLEMENTATIONS",
    "CONV_KERNELS",
    "ConvGeometry",
    "DequantConv",
    "Im2colConv",
    "Im2colInt8Conv",
    "Im2colWeightOnlyConv",
    "fan_in_group_check",
    "int8_linear_type",
    "ungrouped_check",
    "weight_only_conv_check",
]
