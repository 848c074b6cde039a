"""Fake quantization (quantize then dequantize) of weights and activations."""

from __future__ import annotations

import torch

from mpsearch.schemes._formats import int_range, round_to_float_format
from mpsearch.schemes._quantspec import QuantSpec


def group_error(shape: tuple[int, ...], spec: QuantSpec) -> str | None:
    """Why ``spec`` cannot quantize a weight of ``shape``, or ``None`` when it can."""
    if spec.granularity != "group":
        return None
    assert spec.group_size is not None
    k = 1
    for d in shape[1:]:
        k *= d
    if k % spec.group_size:
        return (
            f"group_size={spec.group_size} does not divide the layer's input size {k} "
            f"(weight shape {tuple(shape)}); use a group size that divides {k} or a per-channel scheme"
        )
    return None


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` as rows that each share one scale."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "channel":
        return x.reshape(x.shape[0], -1)
    if spec.granularity == "group":
        reason = group_error(tuple(x.shape), spec)
        if reason:
            raise ValueError(reason)
        return x.reshape(-1, spec.group_size)
    raise ValueError(f"granularity {spec.granularity!r} has no rows")


def qparams(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (``None`` when symmetric) for ranges ``[lo, hi]``, computed in float32."""
    fmt = spec.fmt
    tiny = torch.finfo(torch.float32).tiny  # a subnormal range's scale would underflow to 0
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if fmt.kind == "float":
        amax = torch.maximum(-lo, hi)
        if spec.scale_dtype == "e8m0":
            _, exp = torch.frexp(amax)
            scale = torch.ldexp(torch.ones_like(amax), exp - 1 - fmt.max_exponent)
        else:
            scale = amax / fmt.max_value
        scale = torch.where(amax > 0, scale.clamp(min=tiny), torch.ones_like(scale))
        return _round_scale(scale, spec), None
    qmin, qmax = int_range(fmt.bits, symmetric=spec.symmetric)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, (amax / qmax).clamp(min=tiny), torch.ones_like(amax))
        scale = _round_scale(scale, spec)
        return scale, None
    span = hi - lo
    scale = torch.where(span > 0, (span / (qmax - qmin)).clamp(min=tiny), torch.ones_like(span))
    scale = _round_scale(scale, spec)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def _round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Store the scale in its dtype (bf16/fp16 scales lose precision, as they would on disk)."""
    if spec.scale_dtype in ("bf16", "fp16"):
        dtype = torch.bfloat16 if spec.scale_dtype == "bf16" else torch.float16
        rounded = scale.to(dtype).float()
        return torch.where(rounded > 0, rounded, torch.full_like(scale, torch.finfo(dtype).tiny))
    return scale


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Codes of ``x`` (float32): integers for int formats, format values for float formats."""
    fmt = spec.fmt
    if fmt.kind == "float":
        return round_to_float_format(x.float() / scale, fmt)
    qmin, qmax = int_range(fmt.bits, symmetric=spec.symmetric)
    q = torch.div(x.float(), scale).round_()  # a new tensor, then in place: one less copy each
    if zero is not None:
        q.add_(zero)
    return q.clamp_(qmin, qmax)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, inplace: bool = False
) -> torch.Tensor:
    """Inverse of :func:`quantize_codes` (up to rounding); ``inplace`` overwrites ``codes``."""
    if not inplace:
        return (codes if zero is None else codes - zero) * scale
    if zero is not None:
        codes.sub_(zero)
    return codes.mul_(scale)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    lo: torch.Tensor | float | None = None,
    hi: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Quantize ``x`` under ``spec`` and dequantize it back, keeping ``x``'s shape and dtype.

    Ranges come from ``x`` itself (dynamic) unless ``lo``/``hi`` are given (static, e.g. from
    a calibration observer); values outside a static range saturate.

    >>> fake_quantize(torch.tensor([-1.0, 0.26, 1.0]), QuantSpec("int2", symmetric=True))
    tensor([-1.,  0.,  1.])
    """
    if spec.is_identity:
        return x
    if spec.granularity == "none":
        if spec.fmt.torch_dtype is not None:
            return x.to(spec.fmt.torch_dtype).to(x.dtype)
        return round_to_float_format(x, spec.fmt)
    rows = _rows(x, spec).float()
    dynamic = lo is None or hi is None
    if dynamic and rows.shape[0] == 1 and not torch.compiler.is_exporting():
        # one range: a whole-tensor reduction, faster than along dim 1 (which ONNX needs)
        lo_t, hi_t = (v.reshape(1, 1) for v in torch.aminmax(rows))
    elif dynamic:
        lo_t = rows.amin(dim=1, keepdim=True)
        hi_t = rows.amax(dim=1, keepdim=True)
    else:
        lo_t = torch.as_tensor(lo, dtype=torch.float32).reshape(-1, 1)
        hi_t = torch.as_tensor(hi, dtype=torch.float32).reshape(-1, 1)
    scale, zero = qparams(lo_t, hi_t, spec)
    out = dequantize_codes(quantize_codes(rows, scale, zero, spec), scale, zero, inplace=True)
    return out.reshape(x.shape).to(x.dtype)
