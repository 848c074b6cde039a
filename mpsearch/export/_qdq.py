"""Export-friendly twins of simulated layers: stored codes plus QuantizeLinear/DequantizeLinear.

A :class:`QDQLayer` computes what a ``SimulatedLayer`` computes, but holds its weight as the
integer (or fp8) *codes* with their scales and zero points, and expresses every quantization
step as one of four small custom ops (namespace ``mpsearch_export``). Each op runs in eager
PyTorch with the same math as :mod:`mpsearch.schemes` and has an ONNX translation to the
standard operators (:data:`ONNX_TRANSLATIONS`), so ``torch.onnx.export(..., dynamo=True)``
writes a graph of ``DequantizeLinear`` (weights), ``DynamicQuantizeLinear`` /
``QuantizeLinear`` + ``DequantizeLinear`` (activations) and ``Cast`` (bf16/fp16 rounding).

What ONNX can express (:func:`onnx_refusal` says why a scheme cannot):

==============================  ============================================================
weights                         int8/int4/int2 per-channel (``axis=0``) or per-group (blocked,
                                ``axis=1, block_size``), symmetric (signed codes) or asymmetric
                                (unsigned codes + zero point); fp8 e4m3/e5m2 per-tensor or
                                per-channel; bf16/fp16 (stored in that dtype, ``Cast``)
activations                     int8 per-tensor, asymmetric (dynamic: ``DynamicQuantizeLinear``)
                                or symmetric; fp8 per-tensor; static (calibrated) or dynamic;
                                bf16/fp16 (``Cast`` round trip)
refused                         fp4 e2m1 and power-of-two (e8m0) scales: ONNX Runtime has no
                                ``DequantizeLinear`` for FLOAT4E2M1 (``fp4``, ``fp4_pc``);
                                activation formats other than 8-bit (``w4a4``, ``w4a4_pc``)
==============================  ============================================================

bf16/fp16 *arithmetic* (the weight-only schemes' ``compute_dtype``) is emulated: inputs,
weights, bias and output are rounded to that dtype by ``Cast`` round trips and the matmul or
convolution runs in float32 (ONNX Runtime's CPU provider has no bf16 ``Gemm``/``Conv``), so
only the accumulation differs from PyTorch's bf16 kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpsearch.backends._simulate import SimulatedLayer
from mpsearch.layers import layer_forward, replace_layers
from mpsearch.schemes import QuantSpec, Scheme, fake_quantize
from mpsearch.schemes._fakequant import qparams, quantize_codes
from mpsearch.schemes._formats import int_range

_ROUND_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_INT_BITS = (8, 4, 2)


# ---------------------------------------------------------------- the custom ops (eager math)


def _dequantize_weight(
    codes: Tensor, scale: Tensor, zero: Tensor | None, block_size: int, bits: int
) -> Tensor:
    """``(codes - zero) * scale`` per channel (``block_size == 0``: scale ``[N]`` on axis 0) or
    per block of ``block_size`` along axis 1 (scale ``[N, K / block_size]``)."""
    c = codes.float()
    if block_size == 0:
        shape = (-1,) + (1,) * (c.dim() - 1)
        s = scale.reshape(shape)
        z = None if zero is None else zero.float().reshape(shape)
    else:
        s = scale.repeat_interleave(block_size, dim=1)
        z = None if zero is None else zero.float().repeat_interleave(block_size, dim=1)
    if z is not None:
        c = c - z
    return c * s


@torch.library.custom_op("mpsearch_export::dequantize_weight", mutates_args=())
def dequantize_weight(
    codes: Tensor, scale: Tensor, zero: Tensor | None, block_size: int, bits: int
) -> Tensor:
    """The custom op of :func:`_dequantize_weight` (ONNX: ``DequantizeLinear``)."""
    return _dequantize_weight(codes, scale, zero, block_size, bits)


@dequantize_weight.register_fake
def _(codes: Tensor, scale: Tensor, zero: Tensor | None, block_size: int, bits: int) -> Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _qdq_dynamic(x: Tensor, kind: str) -> Tensor:
    """Per-tensor fake quantization with the range taken from ``x`` (``kind``: ``uint8``
    asymmetric, ``int8`` symmetric, or an fp8 format name)."""
    return fake_quantize(x.float(), _ACT_SPECS[kind])


@torch.library.custom_op("mpsearch_export::qdq_dynamic", mutates_args=())
def qdq_dynamic(x: Tensor, kind: str) -> Tensor:
    """The custom op of :func:`_qdq_dynamic` (ONNX: ``DynamicQuantizeLinear`` or a computed
    scale, then ``QuantizeLinear`` + ``DequantizeLinear``)."""
    return _qdq_dynamic(x, kind)


@qdq_dynamic.register_fake
def _(x: Tensor, kind: str) -> Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _qdq_static(x: Tensor, scale: float, zero: int, kind: str) -> Tensor:
    """Per-tensor fake quantization with a fixed (calibrated) ``scale`` and ``zero``."""
    spec = _ACT_SPECS[kind]
    s = torch.tensor([[scale]])
    z = None if spec.symmetric else torch.tensor([[float(zero)]])
    rows = x.float().reshape(1, -1)
    codes = quantize_codes(rows, s, z, spec)
    out = (codes - z if z is not None else codes) * s
    return out.reshape(x.shape)


@torch.library.custom_op("mpsearch_export::qdq_static", mutates_args=())
def qdq_static(x: Tensor, scale: float, zero: int, kind: str) -> Tensor:
    """The custom op of :func:`_qdq_static` (ONNX: ``QuantizeLinear`` + ``DequantizeLinear``)."""
    return _qdq_static(x, scale, zero, kind)


@qdq_static.register_fake
def _(x: Tensor, scale: float, zero: int, kind: str) -> Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


_ACT_SPECS: dict[str, QuantSpec] = {
    "uint8": QuantSpec("int8", granularity="tensor", symmetric=False, zero_point_bits=8),
    "int8": QuantSpec("int8", granularity="tensor", symmetric=True),
    "fp8_e4m3": QuantSpec("fp8_e4m3", granularity="tensor"),
    "fp8_e5m2": QuantSpec("fp8_e5m2", granularity="tensor"),
}


# ---------------------------------------------------------------- what ONNX can express


def _weight_refusal(spec: QuantSpec) -> str | None:
    fmt = spec.fmt
    if spec.is_identity:
        return None
    if spec.scale_dtype == "e8m0":
        return (
            "power-of-two (e8m0) scales and fp4 e2m1 codes: ONNX Runtime 1.32 has no "
            "DequantizeLinear kernel for FLOAT4E2M1 (nor e8m0 scales)"
        )
    if spec.granularity == "none":
        if spec.format in _ROUND_DTYPES:
            return None
        return f"an unscaled {spec.format!r} weight has no ONNX type"
    if fmt.kind == "int":
        if fmt.bits not in _INT_BITS:
            return f"{fmt.bits}-bit integers have no ONNX type (8, 4 and 2 bits have)"
        return None
    if spec.format in _FP8_DTYPES:
        if spec.granularity == "group":
            return "blocked fp8 weights are not accepted (per-tensor and per-channel are)"
        return None
    return f"{spec.format!r} weights have no ONNX Runtime DequantizeLinear kernel"


def _activation_kind(spec: QuantSpec | None) -> str | None:
    """The ``_ACT_SPECS`` key for a scaled activation spec (``None`` for casts/identity)."""
    if spec is None or spec.is_identity or spec.granularity == "none":
        return None
    if spec.format in _FP8_DTYPES:
        return spec.format
    return "int8" if spec.symmetric else "uint8"


def _activation_refusal(spec: QuantSpec | None) -> str | None:
    if spec is None or spec.is_identity:
        return None
    if spec.granularity == "none":
        if spec.format in _ROUND_DTYPES:
            return None
        return f"an unscaled {spec.format!r} activation has no ONNX type"
    if spec.granularity != "tensor":
        return f"{spec.granularity}-wise activation scales are not accepted (per-tensor are)"
    kind = _activation_kind(spec)
    if kind is None or _ACT_SPECS[kind] != spec:
        return (
            f"activation format {spec.format!r} (symmetric={spec.symmetric}) is not accepted; "
            "int8 per-tensor (symmetric or asymmetric) and fp8 per-tensor are"
        )
    return None


def onnx_refusal(scheme: Scheme) -> str | None:
    """Why ``scheme`` cannot be written with ONNX Q/DQ operators (``None`` when it can).

    >>> from mpsearch.schemes import get_scheme
    >>> onnx_refusal(get_scheme("w8a8")) is None, onnx_refusal(get_scheme("fp4")) is not None
    (True, True)
    """
    why = _weight_refusal(scheme.weight)
    if why:
        return f"weights: {why}"
    why = _activation_refusal(scheme.activation)
    if why:
        return f"activations: {why}"
    return None


ONNX_ACCEPTED = (
    "fp32, bf16, fp16, fp8 (e4m3/e5m2 per-tensor or per-channel), int8/int4/int2 weights "
    "per-channel or per-group with int8 or fp8 per-tensor activations (w8a8, w8a16, w4a16, "
    "w4a8, w2a16 and their per-channel _pc variants)"
)


def needs_opset(schemes: list[Scheme]) -> int:
    """The ONNX opset the schemes need: 21 (int4, blocked DequantizeLinear), 25 for int2.

    >>> from mpsearch.schemes import get_scheme
    >>> needs_opset([get_scheme("w4a16")]), needs_opset([get_scheme("w2a16")])
    (21, 25)
    """
    two_bit = any(s.weight.fmt.kind == "int" and s.weight.fmt.bits == 2 for s in schemes)
    return 25 if two_bit else 21


# ---------------------------------------------------------------- the export-friendly layer


def _round(x: Tensor, name: str) -> Tensor:
    dtype = _ROUND_DTYPES.get(name)
    return x if dtype is None else x.to(dtype).to(torch.float32)


class QDQLayer(nn.Module):
    """The export form of one ``SimulatedLayer``: weight codes, scales and zero points as
    buffers, quantization steps as ``mpsearch_export`` ops (see the module docstring), or,
    with ``decomposed=True``, as the plain aten ops of their eager math (for a ``torch.export``
    program that loads without mpsearch: the codes stay int8/int4 in the file).

    >>> from mpsearch.schemes import get_scheme
    >>> sim = SimulatedLayer(nn.Linear(64, 8), get_scheme("w4a16"))
    >>> QDQLayer(sim).codes.dtype, tuple(QDQLayer(sim).scale.shape)
    (torch.uint8, (8, 2))
    """

    def __init__(self, sim: SimulatedLayer, *, decomposed: bool = False) -> None:
        super().__init__()
        scheme = sim.scheme
        self.scheme_name = scheme.name
        self.compute = scheme.compute_dtype
        self.decomposed = decomposed
        self.inner = _weightless(sim.inner)
        weight = sim.inner.weight.detach().float()
        self.weight_shape = tuple(weight.shape)
        spec = scheme.weight
        self.block_size = 0
        self.bits = spec.fmt.bits
        self.weight_kind = "float"
        if spec.is_identity:
            self.register_buffer("weight_f", weight.clone())
        elif spec.granularity == "none":
            self.weight_kind = "cast"
            self.register_buffer("weight_f", weight.to(_ROUND_DTYPES[spec.format]))
        else:
            self.weight_kind = "codes"
            codes, scale, zero = _codes(weight, spec)
            if spec.granularity == "group":
                assert spec.group_size is not None
                self.block_size = spec.group_size
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        bias = getattr(sim.inner, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        act = scheme.activation
        self.act_cast = act.format if act is not None and act.granularity == "none" else None
        self.act_kind = _activation_kind(act)
        self.act_static: tuple[float, int] | None = None
        if self.act_kind is not None and sim.act_range is not None:
            spec_a = _ACT_SPECS[self.act_kind]
            s, z = qparams(
                torch.tensor([[sim.act_range[0]]]), torch.tensor([[sim.act_range[1]]]), spec_a
            )
            self.act_static = (float(s), 0 if z is None else int(z))

    def _weight(self) -> Tensor:
        if self.weight_kind == "codes":
            dequantize = (
                _dequantize_weight
                if self.decomposed
                else torch.ops.mpsearch_export.dequantize_weight
            )
            w = dequantize(self.codes, self.scale, self.zero, self.block_size, self.bits)
            w = w.reshape(self.weight_shape)
        else:
            w = self.weight_f.float()
        return _round(w, self.compute)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        x = x.float()
        if self.act_kind is not None:
            ops = torch.ops.mpsearch_export
            if self.act_static is None:
                dynamic = _qdq_dynamic if self.decomposed else ops.qdq_dynamic
                x = dynamic(x, self.act_kind)
            else:
                scale, zero = self.act_static
                static = _qdq_static if self.decomposed else ops.qdq_static
                x = static(x, scale, zero, self.act_kind)
        elif self.act_cast is not None:
            x = _round(x, self.act_cast)
        x = _round(x, self.compute)
        bias = None if self.bias is None else _round(self.bias, self.compute)
        y = layer_forward(self.inner, x, self._weight(), bias)
        return _round(y, self.compute).to(out_dtype)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme_name!r}, static={self.act_static is not None}"


def _weightless(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without its weight and bias (only its hyperparameters are read).

    Built field by field: ``copy.copy`` refuses a parametrized module (a weight-normed
    convolution, as in wav2vec2's positional convolution), whose parametrizations are dropped
    here with the weights they compute."""
    light = object.__new__(type(layer))
    light.__dict__.update(layer.__dict__)
    light._parameters = dict.fromkeys(layer._parameters)
    light._modules = {k: v for k, v in layer._modules.items() if k != "parametrizations"}
    return light


def _codes(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """Codes (int8/uint8 or fp8 storage), scales and zero points of ``weight`` under ``spec``,
    by the scheme's own ``qparams``/``quantize_codes``: per-channel codes keep the weight's
    shape (scale ``[N]``); per-group codes are ``[N, K]`` (scale ``[N, K / group]``)."""
    n = weight.shape[0]
    if spec.granularity == "group":
        assert spec.group_size is not None
        rows = weight.reshape(-1, spec.group_size)
    elif spec.granularity == "channel":
        rows = weight.reshape(n, -1)
    else:
        rows = weight.reshape(1, -1)
    lo = rows.amin(dim=1, keepdim=True)
    hi = rows.amax(dim=1, keepdim=True)
    scale, zero = qparams(lo, hi, spec)
    codes = quantize_codes(rows, scale, zero, spec)
    if spec.format in _FP8_DTYPES:
        storage = codes.to(_FP8_DTYPES[spec.format])
    else:
        qmin, _ = int_range(spec.fmt.bits, symmetric=spec.symmetric)
        storage = codes.to(torch.int8 if qmin < 0 else torch.uint8)
    if spec.granularity == "group":
        k = weight.numel() // n
        storage = storage.reshape(n, k)
        scale = scale.reshape(n, -1)
        zero = None if zero is None else zero.reshape(n, -1).to(storage.dtype)
    elif spec.granularity == "channel":
        storage = storage.reshape(weight.shape)
        scale = scale.reshape(n)
        zero = None if zero is None else zero.reshape(n).to(storage.dtype)
    else:  # tensor: one scale, exported per-axis with the same value on every channel
        storage = storage.reshape(weight.shape)
        scale = scale.reshape(1).expand(n).contiguous()
        zero = None if zero is None else zero.reshape(1).expand(n).to(storage.dtype).contiguous()
    return storage.contiguous(), scale.float().contiguous(), zero


def to_qdq(model: nn.Module) -> nn.Module:
    """Replace every ``SimulatedLayer`` of ``model`` (in place) by its :class:`QDQLayer`.

    >>> from mpsearch.backends import quantize
    >>> net = quantize(nn.Sequential(nn.Linear(64, 8)), "w8a8", backend="simulate")
    >>> type(to_qdq(net)[0]).__name__
    'QDQLayer'
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, SimulatedLayer):
            replace_layers(model, {name: QDQLayer(module)})
    return model


# ---------------------------------------------------------------- ONNX translations


def _onnx_translations() -> dict:
    """``{custom op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Imported lazily: onnxscript is only needed when an ONNX file is written.
    """
    from onnxscript import ir
    from onnxscript import opset21 as op

    int_types = {
        (8, True): ir.DataType.INT8,
        (8, False): ir.DataType.UINT8,
        (4, True): ir.DataType.INT4,
        (4, False): ir.DataType.UINT4,
        (2, True): ir.DataType.INT2,
        (2, False): ir.DataType.UINT2,
    }
    fp8_types = {"fp8_e4m3": ir.DataType.FLOAT8E4M3FN, "fp8_e5m2": ir.DataType.FLOAT8E5M2}
    fp8_max = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}

    def dequantize_weight_onnx(codes, scale, zero, block_size: int, bits: int):
        dtype = codes.type.dtype if codes.type is not None else None
        if dtype in (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2):
            return op.DequantizeLinear(codes, scale, axis=0)
        signed = dtype == ir.DataType.INT8
        target = int_types[(bits, signed)]
        if bits != 8:  # constant-folded by the exporter into an int4/int2 initializer
            codes = op.Cast(codes, to=target)
            if zero is not None:
                zero = op.Cast(zero, to=target)
        if block_size == 0:
            args = (codes, scale) if zero is None else (codes, scale, zero)
            return op.DequantizeLinear(*args, axis=0)
        args = (codes, scale) if zero is None else (codes, scale, zero)
        return op.DequantizeLinear(*args, axis=1, block_size=block_size)

    def qdq_dynamic_onnx(x, kind: str):
        if kind == "uint8":
            q, s, z = op.DynamicQuantizeLinear(x)
            return op.DequantizeLinear(q, s, z)
        if kind == "int8":
            top, zero_point = 127.0, op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT8))
        else:
            top = fp8_max[kind]
            zero_point = op.Constant(value=ir.tensor([0.0], dtype=fp8_types[kind]))
            zero_point = op.Reshape(zero_point, op.Constant(value_ints=[]))
        amax = op.ReduceMax(op.Abs(x), keepdims=0)
        ratio = op.Div(amax, op.Constant(value_float=top))
        scale = op.Where(
            op.Greater(amax, op.Constant(value_float=0.0)), ratio, op.Constant(value_float=1.0)
        )
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def qdq_static_onnx(x, scale: float, zero: int, kind: str):
        s = op.Constant(value_float=scale)
        if kind == "uint8":
            z = op.Constant(value=ir.tensor(zero, dtype=ir.DataType.UINT8))
        elif kind == "int8":
            z = op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT8))
        else:
            z = op.Reshape(
                op.Constant(value=ir.tensor([0.0], dtype=fp8_types[kind])),
                op.Constant(value_ints=[]),
            )
        q = op.QuantizeLinear(x, s, z)
        if kind == "int8":  # mpsearch's symmetric grid is [-127, 127]; ONNX saturates at -128
            q = op.Clip(q, op.Constant(value=ir.tensor(-127, dtype=ir.DataType.INT8)))
        return op.DequantizeLinear(q, s, z)

    return {
        torch.ops.mpsearch_export.dequantize_weight.default: dequantize_weight_onnx,
        torch.ops.mpsearch_export.qdq_dynamic.default: qdq_dynamic_onnx,
        torch.ops.mpsearch_export.qdq_static.default: qdq_static_onnx,
    }
