"""Real low-precision layer modules and the kernel registry shared by the real backends.

Every real module takes a float input of any dtype and returns the input's dtype (the
boundary casts live inside the module, as in ``SimulatedLayer``), so layers of different
precisions compose without a whole-model pass. Their tensors are exactly what they store:
:func:`storage_bytes` sums them, packed (opaque) kernel weights included.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._ops import OpOverload, OpOverloadPacket

from mpsearch.backends._registry import Backend
from mpsearch.layers._experts import ExpertBank, expert_weights, is_expert_bank
from mpsearch.layers._layers import base_copy, is_stand_in, standard_form
from mpsearch.schemes import QuantSpec, Scheme
from mpsearch.schemes._fakequant import qparams, quantize_codes
from mpsearch.schemes._formats import int_range

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

ActRange = tuple[float, float] | None


class RealLayer(nn.Module):
    """Base of the real low-precision modules: knows its scheme and its packed tensors."""

    scheme_name: str = ""

    def packed_tensors(self) -> dict[str, Tensor]:
        """Kernel-owned tensors that are neither parameters nor buffers (opaque packed weights)."""
        return {}

    def extra_repr(self) -> str:
        return f"scheme={self.scheme_name!r}"


def tensor_bytes(t: Tensor) -> int:
    """Bytes ``t`` holds: one per element, none for a replaced layer's stand-in weight
    (:func:`is_stand_in`: one NaN broadcast to the weight's shape).

    >>> tensor_bytes(torch.zeros(3, 4))
    48
    """
    return 0 if is_stand_in(t) else int(t.numel()) * int(t.element_size())


def storage_bytes(module: nn.Module) -> int:
    """Exact bytes of every tensor ``module`` holds: parameters, buffers and packed weights.

    Tensors shared between modules are counted once.

    >>> storage_bytes(nn.Linear(4, 2))   # 8 weights + 2 biases in float32
    40
    """
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.data_ptr() if t.layout == torch.strided and t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    for m in module.modules():
        if isinstance(m, RealLayer):
            total += sum(tensor_bytes(t) for t in m.packed_tensors().values())
    return total


# ---------------------------------------------------------------- float casts (fp32/bf16/fp16)


class CastLayer(RealLayer):
    """The layer itself with its weight and bias stored in ``dtype`` (channels-last for 2-D
    convolutions: oneDNN often runs them faster, and every conv of a mixed plan then hands the
    next one the same layout). Input cast to ``dtype``, output cast
    back to the input's dtype (its memory format kept). ``channels_last=False`` keeps a 2-D
    convolution in NCHW."""

    def __init__(
        self,
        layer: nn.Module,
        scheme: Scheme,
        *,
        device: str | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.dtype = TORCH_DTYPES[scheme.compute_dtype]
        self.channels_last = channels_last and isinstance(layer, nn.Conv2d)
        inner = base_copy(layer).to(device=device, dtype=self.dtype)
        if self.channels_last:
            inner = inner.to(memory_format=torch.channels_last)
        self.inner = inner.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        if self.channels_last and x.dim() == 4:
            x = x.to(self.dtype, memory_format=torch.channels_last)
        else:
            x = x.to(self.dtype)
        return self.inner(x).to(out_dtype)


# ---------------------------------------------------------------- int8 x int8 (oneDNN)


def _bf16_bias(layer: nn.Module) -> Tensor | None:
    """The layer's bias in bf16, the dtype the weight-only kernels add it in."""
    bias = layer.bias
    return None if bias is None else bias.detach().to(torch.bfloat16)


def _weight_codes(weight: Tensor, scheme: Scheme) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer codes, scales and zero points of ``weight`` under the scheme's weight spec,
    computed by the same functions as the simulation (codes shaped like ``weight``)."""
    spec = scheme.weight
    w = weight.detach().float()
    rows = (
        w.reshape(w.shape[0], -1)
        if spec.granularity == "channel"
        else w.reshape(-1, spec.group_size)
    )
    lo = rows.amin(dim=1, keepdim=True)
    hi = rows.amax(dim=1, keepdim=True)
    scale, zero = qparams(lo, hi, spec)
    codes = quantize_codes(rows, scale, zero, spec)
    return codes, scale.reshape(-1), None if zero is None else zero.reshape(-1)


def pack_codes(codes: Tensor, bits: int, qmin: int) -> Tensor:
    """Integer codes ``[rows, dim]`` (float, as :func:`_weight_codes` gives them), offset by
    ``-qmin`` to unsigned and packed ``8 // bits`` to a byte: ``uint8 [rows, ceil(dim * bits
    / 8)]``, the first code in the low bits.

    >>> pack_codes(torch.tensor([[-8.0, 7.0, 0.0]]), 4, -8).tolist()
    [[240, 8]]
    """
    n, dim = codes.shape
    per_byte = 8 // bits
    unsigned = F.pad((codes - qmin).to(torch.uint8), (0, -dim % per_byte)).reshape(n, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (unsigned.to(torch.int32) << shifts).sum(-1).to(torch.uint8).contiguous()


def unpack_codes(packed: Tensor, bits: int, dim: int) -> Tensor:
    """The inverse of :func:`pack_codes` up to the offset: unsigned codes ``uint8 [rows,
    dim]`` (add ``qmin`` for the codes).

    >>> unpack_codes(torch.tensor([[240, 8]], dtype=torch.uint8), 4, 3).tolist()
    [[0, 15, 8]]
    """
    if bits == 8:
        return packed[..., :dim]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :dim]


def pack_rows(rows: Tensor, scheme: Scheme) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weight rows ``[n, dim]`` under the scheme's integer weight spec, as stored: the codes
    packed (:func:`pack_codes`), the scales ``[n, groups]`` in the spec's scale dtype and the
    zero points ``uint8 [n, groups]`` (``None`` when symmetric); :func:`dequantize_rows`
    gives back the simulation's rows."""
    spec = scheme.weight
    n = rows.shape[0]
    codes, scale, zero = _weight_codes(rows, scheme)
    qmin = int_range(spec.fmt.bits, symmetric=spec.symmetric)[0]
    return (
        pack_codes(codes.reshape(n, -1), spec.fmt.bits, qmin),
        scale.reshape(n, -1).to(TORCH_DTYPES[spec.scale_dtype]),
        None if zero is None else zero.reshape(n, -1).to(torch.uint8),
    )


def dequantize_rows(
    packed: Tensor, scales: Tensor, zeros: Tensor | None, *, bits: int, qmin: int, dim: int
) -> Tensor:
    """Float32 rows ``[n, dim]`` of :func:`pack_rows`'s tensors (or rows of them):
    ``(code - zero) * scale`` per group, as the simulation dequantizes.

    >>> from mpsearch.schemes import fake_quantize, get_scheme
    >>> w, scheme = torch.randn(4, 64), get_scheme("w4a16")  # int4, groups of 32, asymmetric
    >>> packed, scales, zeros = pack_rows(w, scheme)
    >>> rows = dequantize_rows(packed, scales, zeros, bits=4, qmin=0, dim=64)
    >>> torch.equal(rows, fake_quantize(w, scheme.weight)), packed.shape
    (True, torch.Size([4, 32]))
    """
    n = packed.shape[0]
    q = unpack_codes(packed, bits, dim).float() + qmin
    q = q.reshape(n, scales.shape[1], -1)
    if zeros is not None:
        q = q - zeros.float().unsqueeze(-1)
    return (q * scales.float().unsqueeze(-1)).reshape(n, dim)


@functools.cache
def onednn_u8s8_saturates() -> bool:
    """Whether oneDNN's u8 x s8 kernels saturate on this CPU (probed once, on first use).

    Without VNNI (AVX2, AVX-512F alone) the kernels multiply with ``vpmaddubsw``, which adds
    each pair of u8 x s8 products in int16 and saturates: ``2 * 255 * 127 > 32767``, so an
    8-bit activation code times a large weight comes out wrong (21 dB SQNR on a random Linear
    where VNNI CPUs give exact results). fbgemm's AVX2 kernels multiply the same way.

    >>> isinstance(onednn_u8s8_saturates(), bool)
    True
    """
    weight = torch.full((8, 64), 127, dtype=torch.int8)
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(
        x, 1.0, 0, torch.ops.onednn.qlinear_prepack(weight, None), torch.ones(8),
        torch.zeros(8, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip
    return float(y[0, 0]) != 64 * 255 * 127


def int8_kernel_scheme(scheme: Scheme) -> Scheme:
    """The scheme the int8 x int8 modules really run for ``scheme`` on this CPU.

    The scheme itself where the kernels are exact. Where they saturate
    (:func:`onednn_u8s8_saturates`) the weights get 7-bit codes (``int7``, in ``[-63, 63]``)
    and the activations keep their 8 bits: ``2 * 255 * 63 <= 32767`` cannot overflow. Giving up
    the weight's bit rather than the activation's (PyTorch's x86 ``reduce_range``) halved the
    disagreement with fp32 of the char-MLP workload (4.3% -> 1.9%, 3,000 test inputs): weights
    are scaled per channel, activations per tensor. ``simulate`` keeps the scheme's 8 bits.
    Narrower weights (``w4a8_pc``'s 4-bit codes, ``2 * 255 * 7``) cannot overflow: unchanged.

    >>> from mpsearch.schemes import get_scheme
    >>> int8_kernel_scheme(get_scheme("w8a8")).weight.format in ("int8", "int7")
    True
    >>> int8_kernel_scheme(get_scheme("w4a8_pc")).weight.format
    'int4'
    """
    if scheme.activation is None:
        raise ValueError(f"Scheme {scheme.name!r} does not quantize activations.")
    if not onednn_u8s8_saturates() or scheme.weight.fmt.bits < 8:
        return scheme
    return dataclasses.replace(scheme, weight=dataclasses.replace(scheme.weight, format="int7"))


def int8_activation_spec(scheme: Scheme) -> QuantSpec:
    """The activation quantization the int8 modules run for ``scheme`` (the scheme's own: see
    :func:`int8_kernel_scheme` for what changes on CPUs whose kernels saturate).

    >>> from mpsearch.schemes import get_scheme
    >>> int8_activation_spec(get_scheme("w8a8")).format
    'int8'
    """
    spec = int8_kernel_scheme(scheme).activation
    assert spec is not None
    return spec


class _ActQuant:
    """Per-tensor asymmetric activation quantization to uint8 codes, static or dynamic.

    A fixed range's scale and zero point are Python numbers (``static``); a dynamic range's
    stay 0-d tensors (float32, int64), which the oneDNN kernels take (their ``.tensor``
    overloads) and Dynamo traces into the graph: ``float(scale)`` would break it at each layer."""

    def __init__(self, scheme: Scheme, act_range: ActRange) -> None:
        spec = scheme.activation
        assert spec is not None
        self.spec = spec
        self.qmax = 2**self.spec.fmt.bits - 1
        self.static: tuple[float, int] | None = None
        if act_range is not None:
            scale, zero = qparams(
                torch.tensor([[act_range[0]]]), torch.tensor([[act_range[1]]]), self.spec
            )
            self.static = (float(scale), int(zero))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | float, Tensor | int]:
        x = x.float()
        if self.static is not None:
            scale, zero = self.static
        else:
            lo, hi = torch.aminmax(x)
            s, z = qparams(lo.reshape(1, 1), hi.reshape(1, 1), self.spec)
            scale, zero = s.reshape(()), z.reshape(()).long()
        q = torch.round(x / scale).add_(zero).clamp_(0, self.qmax).to(torch.uint8)
        return q, scale, zero


def per_call_ranges(model: nn.Module) -> list[str]:
    """Names of ``model``'s int8 layers whose activation range is measured on each call
    (quantized without ``calib``): one range spans every row of a call, so a row's codes
    depend on the rows run with it, and Inductor lowers them to oneDNN's int8 kernel, not
    its int8 micro-kernels (stdlib_lm w8a8, one token, max-autotune: 2.2 ms a token against
    0.58 ms with calibrated ranges).

    >>> per_call_ranges(nn.Linear(2, 2))
    []
    """
    return [
        name
        for name, m in model.named_modules()
        if isinstance(getattr(m, "act", None), _ActQuant) and m.act.static is None
    ]


def _onednn_overload(op: OpOverloadPacket, scale: Tensor | float) -> OpOverload:
    """The overload of the oneDNN int8 kernel ``op`` for an activation ``scale`` given as a 0-d
    tensor (``.tensor``) or a number (``.default``: a tensor would be read back as a number)."""
    return op.tensor if isinstance(scale, Tensor) else op.default


_W_ZERO = torch.zeros((), dtype=torch.int32)
"""The one weight zero point of every oneDNN int8 layer: weights are symmetric, and each layer
holds a per-channel view of this 0-d zero (:func:`_set_zero_point`), so no layer holds bytes
for it (a per-channel int64 vector held 8 bytes a channel, twice the scales)."""


def _set_zero_point(module: nn.Module, channels: int) -> None:
    """The weight zero points the oneDNN int8 kernels take, ``module.w_zp``: :data:`_W_ZERO`
    broadcast to ``channels``, a plain attribute (a constant, like the packed weight; not in
    the state dict). Per layer and 1-D: Inductor's int8 GEMM templates (``max-autotune``)
    take only a constant buffer for it; the module-level tensor itself (a graph input to
    Dynamo) or a 0-d one (inlined as a number) left every int8 Linear on oneDNN's kernel,
    batch-1 Llama decoding at 2.4x the time."""
    module.w_zp = _W_ZERO.expand(channels)


class _PackedInt8(RealLayer):
    """Shared state of the int8 x int8 modules (oneDNN, fbgemm): an opaque packed weight, saved
    as its dense int8 codes."""

    _packed: Tensor

    def packed_tensors(self) -> dict[str, Tensor]:
        return {"packed_weight": self._packed}

    def _pack(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def _dense(self) -> Tensor:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_int8"] = self._dense()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight_int8"
        old = prefix + "w_zero"  # per-channel zeros that state dicts of earlier versions hold
        rest = {k: v for k, v in state_dict.items() if k not in (key, old)}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in state_dict:  # packed after the buffers: fbgemm packs the scales and bias in
            self._packed = self._pack(state_dict[key])
        elif strict:
            missing_keys.append(key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = self._dense()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        dense = state.pop("_packed")
        super().__setstate__(state)
        self._packed = self._pack(dense)


def _init_int8_linear(
    module: _PackedInt8, layer: nn.Linear, scheme: Scheme, act_range: ActRange
) -> None:
    """The state both ``w8a8`` Linear modules hold: codes packed by ``module._pack`` (after the
    scales and bias, which fbgemm packs in), scales, bias, activation quantizer."""
    module.scheme_name = scheme.name
    scheme = int8_kernel_scheme(scheme)
    codes, scale, _ = _weight_codes(layer.weight, scheme)
    module.out_features, module.in_features = layer.weight.shape
    module.register_buffer("w_scale", scale.float().contiguous())
    bias = layer.bias
    module.register_buffer("bias", None if bias is None else bias.detach().float().clone())
    module.act = _ActQuant(scheme, act_range)
    module._packed = module._pack(codes.to(torch.int8))


class Int8Linear(_PackedInt8):
    """``w8a8`` Linear: int8 per-channel weights x uint8 per-tensor activations on oneDNN
    (``onednn::qlinear_pointwise``), float32 output. Activation scales are computed per call
    (dynamic) or fixed by ``act_range`` (static), with the scheme's own ``qparams``."""

    def __init__(self, layer: nn.Linear, scheme: Scheme, *, act_range: ActRange = None) -> None:
        super().__init__()
        _set_zero_point(self, layer.out_features)
        _init_int8_linear(self, layer, scheme, act_range)

    def _pack(self, codes: Tensor) -> Tensor:
        return torch.ops.onednn.qlinear_prepack(codes.to(torch.int8).contiguous(), None)

    def _dense(self) -> Tensor:
        return self._packed.to_dense().t().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        shape = x.shape
        y = self.matmul_codes(*self.act(x.reshape(-1, self.in_features)))
        return y.reshape(*shape[:-1], self.out_features).to(out_dtype)

    def matmul_codes(self, q: Tensor, scale: Tensor | float, zero: Tensor | int) -> Tensor:
        """The kernel on uint8 activation codes ``q`` (``[M, in_features]``) of per-tensor
        ``scale`` and ``zero`` point (numbers or 0-d tensors): float32 ``[M, out_features]``."""
        return _onednn_overload(torch.ops.onednn.qlinear_pointwise, scale)(
            q, scale, zero, self._packed, self.w_scale, self.w_zp, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip


def fbgemm_int8_linear_preferred() -> bool:
    """Whether ``w8a8`` Linear layers run on fbgemm rather than oneDNN on this CPU.

    Where oneDNN's u8 x s8 kernels saturate (no VNNI, :func:`onednn_u8s8_saturates`) they are
    also slow: on an AVX2 EPYC, one thread, a 4096 x 4096 Linear took 8.1 ms at batch 1 and
    13.8 ms at batch 32 on oneDNN, 0.72 ms and 7.5 ms on fbgemm (fp32: 4.3 ms and 30 ms).
    On VNNI / AMX CPUs oneDNN was the faster (2.3 ms against 4.1 ms, 6 x Linear(2048), batch 32).

    >>> isinstance(fbgemm_int8_linear_preferred(), bool)
    True
    """
    return onednn_u8s8_saturates() and "fbgemm" in torch.backends.quantized.supported_engines


class FbgemmInt8Linear(_PackedInt8):
    """``w8a8`` Linear on fbgemm: int8 per-channel weights (:func:`int8_kernel_scheme`) x uint8
    per-tensor activations, float32 output. Dynamic activation ranges: ``quantized::
    linear_dynamic``, whose min/max scale and zero point equal ``qparams``'s (bit-identical
    outputs on the char-MLP test split); static (``act_range``): ``quantized::
    linear_with_input_q_dq_qweight_dq_output_fp32`` with the scheme's scale and zero point.

    The packed int8 weight is held by fbgemm; its bytes are counted from its shape (as for
    oneDNN's, the kernel's own padding and per-column offsets are not).
    """

    def __init__(self, layer: nn.Linear, scheme: Scheme, *, act_range: ActRange = None) -> None:
        super().__init__()
        _init_int8_linear(self, layer, scheme, act_range)

    def _pack(self, codes: Tensor) -> Any:
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors (the pin)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                codes.to(torch.int8).contiguous(),
                self.w_scale.double(),
                torch.zeros(self.out_features, dtype=torch.long),
                0,
            )
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(qweight, self.bias)
        finally:
            torch.backends.quantized.engine = engine

    def _dense(self) -> Tensor:
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr().contiguous()

    def packed_tensors(self) -> dict[str, Tensor]:
        n, k = self.out_features, self.in_features
        return {"packed_weight": torch.empty(n, k, dtype=torch.int8, device="meta")}

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.act.static is None:  # fbgemm's own per-tensor min/max qparams: the scheme's
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, False)
        else:
            scale, zero = self.act.static
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x2.contiguous(), scale, zero, self._packed
            )
        return y.reshape(*shape[:-1], self.out_features).to(out_dtype)

    def matmul_codes(self, q: Tensor, scale: Tensor | float, zero: Tensor | int) -> Tensor:
        """As :meth:`Int8Linear.matmul_codes`. fbgemm quantizes a float input itself: the
        codes, dequantized, quantize back to themselves (exact: ``|(q - z) * s / s - (q - z)|``
        is a few ulps of a number under 256)."""
        x = (q.float() - zero) * scale
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, float(scale), int(zero), self._packed
        )


def onednn_twin(layer: FbgemmInt8Linear) -> Int8Linear:
    """``layer`` on oneDNN's int8 Linear kernel: the same codes, scales, bias, activation
    quantizer and stand-ins, repacked (the same bytes). Its outputs equal ``layer``'s up to
    float rounding where oneDNN's u8 x s8 products do not saturate
    (:func:`onednn_u8s8_saturates`). Inductor lowers oneDNN's kernel (with ``max-autotune``,
    into its int8 GEMM template); fbgemm's breaks the graph at each layer."""
    twin = Int8Linear.__new__(Int8Linear)
    twin.__dict__.update(layer.__dict__)
    twin._buffers = dict(layer._buffers)
    _set_zero_point(twin, layer.out_features)
    twin._packed = twin._pack(layer._dense())
    return twin


def onednn_int8_conv_exact(conv: nn.Conv1d | nn.Conv2d, *, dim: int = 2) -> bool:
    """Whether oneDNN's int8 convolution computes ``conv``'s geometry exactly on this CPU (a
    Conv1d as a Conv2d with a 1 x K kernel, ``dim=2``, or K x 1, ``dim=3``), found by one
    probe per geometry: random codes against the float64 convolution, in the range the int8
    kernels give weights on this CPU (7-bit where the u8 x s8 products saturate: with 8-bit
    codes, an AVX2 EPYC found no geometry exact and sent every w8a8 convolution of a
    ``cpu-pt2e`` plan to a kernel ``torch.export`` cannot capture). On an AMX Xeon (torch
    2.13) it gave wrong sums (relative error about 1, at every length and batch tried, with
    7-bit codes too: not saturation) for 4 or 16 input channels per group with kernels 8, 12,
    16, 32 or 128 wide: 1 x 8 and 8 x 8 as 2-D kernels, and such Conv1d layers as 1 x K,
    while K x 1 was exact on every shape tried.

    >>> onednn_int8_conv_exact(nn.Conv2d(3, 8, 3))
    True
    """
    padding = zero_padding(conv) or (0,) * len(conv.kernel_size)
    dim = dim if isinstance(conv, nn.Conv1d) else 0
    return _int8_conv_exact(
        conv.out_channels, conv.in_channels // conv.groups, as_2d(conv.kernel_size, 1, dim),
        as_2d(conv.stride, 1, dim), as_2d(padding, 0, dim), as_2d(conv.dilation, 1, dim),
        conv.groups,
    )  # fmt: skip


def zero_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """``conv``'s zero padding as numbers per side (``'valid'``: none; ``'same'``: half the
    dilated kernel's extent where that is whole, as PyTorch pads it), ``None`` where it is
    not symmetric zero padding (an even ``'same'`` extent, or another ``padding_mode``).

    >>> zero_padding(nn.Conv1d(2, 2, 7, padding="same", dilation=2))
    (6,)
    >>> zero_padding(nn.Conv1d(2, 2, 4, padding="same")), zero_padding(nn.Conv2d(2, 2, 3, padding="valid"))
    (None, (0, 0))
    """
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return None
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    extents = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
    return None if any(e % 2 for e in extents) else tuple(e // 2 for e in extents)


def as_2d(value: tuple[int, ...], one: int, dim: int) -> tuple[int, ...]:
    """A conv setting in its 2-D form: a Conv1d's ``(v,)`` as ``(one, v)`` (``dim=2``, a
    1 x K kernel) or ``(v, one)`` (``dim=3``, K x 1); a Conv2d's (``dim=0``) as it is."""
    if not dim:
        return tuple(value)
    return (one, value[0]) if dim == 2 else (value[0], one)


def onednn_int8_conv_runs(conv: nn.Conv1d | nn.Conv2d) -> bool:
    """Whether oneDNN's int8 convolution computes ``conv`` exactly in some 2-D form (a
    Conv1d: 1 x K or K x 1, see :func:`onednn_int8_conv_exact`)."""
    return onednn_int8_conv_exact(conv) or (
        isinstance(conv, nn.Conv1d) and onednn_int8_conv_exact(conv, dim=3)
    )


def conv1d_as_2d_dim(conv: nn.Conv1d) -> int:
    """The dimension a Conv1d's int8 kernel adds to run as a Conv2d: 2 (a 1 x K kernel on
    ``[N, C, 1, L]``) where oneDNN computes that exactly (:func:`onednn_int8_conv_exact`),
    else 3 (K x 1 on ``[N, C, L, 1]``): up to 2.9x slower than 1 x K on some shapes (1 to 512
    channels, K = 10, stride 5), so taken only where needed."""
    return 2 if onednn_int8_conv_exact(conv, dim=2) else 3


@functools.cache
def _int8_conv_exact(
    out: int,
    per_group: int,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> bool:
    g = torch.Generator().manual_seed(0)
    top = 63 if onednn_u8s8_saturates() else 127  # the codes the kernels get (int8_kernel_scheme)
    w = torch.randint(-top, top + 1, (out, per_group, *kernel), generator=g, dtype=torch.int8)
    size = [d * (k - 1) + 4 * s + 1 for k, s, d in zip(kernel, stride, dilation, strict=True)]
    x = torch.randint(0, 256, (1, per_group * groups, *size), generator=g, dtype=torch.uint8)
    ones = torch.ones(out)
    geometry = (list(stride), list(padding), list(dilation))
    try:
        packed = torch.ops.onednn.qconv_prepack(w, ones, 1.0, 0, *geometry, groups, None)
        y = _onednn_overload(torch.ops.onednn.qconv_pointwise, 1.0)(
            x.contiguous(memory_format=torch.channels_last), 1.0, 0, packed, ones,
            torch.zeros(out, dtype=torch.int32), None, *geometry, groups,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
    except RuntimeError:  # a geometry oneDNN refuses does not run either
        return False
    ref = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    return float((y.double() - ref).norm() / ref.norm()) < 1e-5


class Int8Conv(_PackedInt8):
    """``w8a8`` Conv1d/Conv2d on oneDNN (``onednn::qconv_pointwise``), channels-last, float32
    output; a Conv1d runs as a Conv2d of height 1 or width 1 (:func:`conv1d_as_2d_dim`)."""

    dim = 2  # the dimension a Conv1d adds (objects pickled by earlier versions: height 1)

    def __init__(
        self, layer: nn.Conv1d | nn.Conv2d, scheme: Scheme, *, act_range: ActRange = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.is_1d = isinstance(layer, nn.Conv1d)
        self.dim = conv1d_as_2d_dim(layer) if self.is_1d else 0
        scheme = int8_kernel_scheme(scheme)
        codes, scale, _ = _weight_codes(layer.weight, scheme)
        weight_shape = tuple(layer.weight.shape)
        codes = codes.reshape(weight_shape).to(torch.int8)
        if self.is_1d:
            codes = codes.unsqueeze(self.dim)
        # oneDNN's 2-D forms, apart from the layer's own settings (which model code may read:
        # Whisper multiplies its convs' ``stride[0]``)
        padding = zero_padding(layer)
        assert padding is not None, "conv_int8_check refuses other padding"
        self.geometry_2d = (
            list(as_2d(layer.stride, 1, self.dim)),
            list(as_2d(padding, 0, self.dim)),
            list(as_2d(layer.dilation, 1, self.dim)),
        )
        self.groups = layer.groups
        self.out_channels = layer.out_channels
        self.register_buffer("w_scale", scale.float().contiguous())
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        _set_zero_point(self, layer.out_channels)
        self._packed = self._pack(codes)
        self.act = _ActQuant(scheme, act_range)

    def _pack(self, codes: Tensor) -> Tensor:
        if self.is_1d and codes.shape[self.dim] != 1:  # saved in the other orientation
            codes = codes.transpose(2, 3)
        return torch.ops.onednn.qconv_prepack(
            codes.to(torch.int8).contiguous(), self.w_scale, 1.0, 0,
            *self.geometry_2d, self.groups, None,
        )  # fmt: skip

    def _dense(self) -> Tensor:
        return self._packed.to_dense().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        if self.is_1d:
            x = x.unsqueeze(self.dim)
        q, scale, zero = self.act(x)
        q = q.contiguous(memory_format=torch.channels_last)
        y = _onednn_overload(torch.ops.onednn.qconv_pointwise, scale)(
            q, scale, zero, self._packed, self.w_scale, self.w_zp, self.bias,
            *self.geometry_2d, self.groups,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        if self.is_1d:
            y = y.squeeze(self.dim)
        return y.to(out_dtype)


# ---------------------------------------------------------------- weight-only (aten packed mm)


def _bf16_rows(x: Tensor, in_features: int, k_pad: int) -> Tensor:
    """``x`` as contiguous bf16 rows ``[-1, in_features + k_pad]`` (zero-padded), as the packed
    weight-only kernels take them: a strided input (Mamba's ``x_proj`` reads a transposed
    tensor) is copied, as they refuse it."""
    x2 = x.reshape(-1, in_features).to(torch.bfloat16, memory_format=torch.contiguous_format)
    return F.pad(x2, (0, k_pad)) if k_pad else x2


class Int8WeightOnlyLinear(RealLayer):
    """``w8a16`` Linear: int8 per-channel weights, bf16 activations, ``aten._weight_int8pack_mm``.

    Differs from the scheme in one detail: the kernel takes its per-channel scales in bf16
    (the scheme's are fp32); the bytes counted are the real bf16 ones.

    The kernel reads the fan-in in blocks of 16 (torch 2.13, AVX-512 CPU): any other fan-in
    gave NaNs, wrong sums or a segmentation fault (fan-in 8, 24, 72, 100 at 2 to 1,000 rows).
    The fan-in is zero-padded to a multiple of 16 (zero codes, and each input with it, per
    call); the padding is stored, and counted.
    """

    def __init__(self, layer: nn.Linear, scheme: Scheme, *, act_range: ActRange = None) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        codes, scale, _ = _weight_codes(layer.weight, scheme)
        self.out_features, self.in_features = layer.weight.shape
        self.k_pad = -self.in_features % 16
        codes = F.pad(codes.to(torch.int8), (0, self.k_pad))
        self.register_buffer("weight_int8", codes.contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", _bf16_bias(layer))

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        shape = x.shape
        x2 = _bf16_rows(x, self.in_features, self.k_pad)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(out_dtype)


INT4_KERNEL_GROUPS = (256, 128, 64, 32)
"""Group sizes ``aten._weight_int4pack_mm_for_cpu`` takes."""


class Int4WeightOnlyLinear(RealLayer):
    """``w4a16`` / ``w4a16_pc`` Linear: int4 asymmetric weights (groups of 32, or one scale per
    output channel), bf16 activations, ``aten._weight_int4pack_mm_for_cpu``.

    The kernel dequantizes as ``(q - 8) * scale + offset`` with a bf16 ``offset``; the
    scheme's integer zero point ``z`` becomes ``offset = (8 - z) * scale`` (rounded to bf16,
    the one difference from the scheme). Output rows are padded to a multiple of 16 (a kernel
    requirement); the padding's bytes are counted.

    The kernel only takes groups of 32 to 256 inputs, so a per-channel weight runs as groups
    (the largest of :data:`INT4_KERNEL_GROUPS` that divides the padded fan-in) that all repeat
    the channel's scale and offset, with its fan-in zero-padded to a multiple of 32 (and each
    input with it, per call). The repeated scales and the padding are stored, and counted.
    """

    def __init__(self, layer: nn.Linear, scheme: Scheme, *, act_range: ActRange = None) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        n, k = layer.weight.shape
        self.out_features, self.in_features = n, k
        codes, scale, zero = _weight_codes(layer.weight, scheme)
        assert zero is not None
        codes = codes.reshape(n, k).to(torch.int32)
        scale = scale.reshape(n, -1)
        offset = (8.0 - zero.reshape(n, -1)) * scale
        self.k_pad = -k % 32 if scheme.weight.granularity == "channel" else 0
        kp = k + self.k_pad
        group = scheme.weight.group_size or next(g for g in INT4_KERNEL_GROUPS if kp % g == 0)
        self.group_size = group
        if scheme.weight.granularity == "channel":
            codes = torch.cat([codes, torch.full((n, self.k_pad), 8, dtype=torch.int32)], dim=1)
            scale, offset = scale.expand(n, kp // group), offset.expand(n, kp // group)
        n_pad = -n % 16
        if n_pad:
            codes = torch.cat([codes, torch.full((n_pad, kp), 8, dtype=torch.int32)])
            scale = torch.cat([scale, torch.ones(n_pad, kp // group)])
            offset = torch.cat([offset, torch.zeros(n_pad, kp // group)])
        self.register_buffer(
            "weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        )
        sz = torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", _bf16_bias(layer))

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        shape = x.shape
        x2 = _bf16_rows(x, self.in_features, self.k_pad)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight_int4, self.group_size, self.scales_and_zeros
        )
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(out_dtype)


# ---------------------------------------------------------------- registry and backend base


@dataclass(frozen=True)
class Kernel:
    """How a real backend runs one (layer type, scheme): a module factory, a description of
    the kernel (for tables and messages), an optional check of the layer's own limits and a
    short ``name`` that tells implementations of the same (layer type, scheme) apart."""

    build: Callable[..., nn.Module]
    description: str
    check: Callable[[nn.Module, Scheme], str | None] | None = None
    name: str = "default"


KernelTable = dict[tuple[type[nn.Module], str], Kernel]
Implementations = dict[tuple[type[nn.Module], str], tuple[Kernel, ...]]


def layer_signature(layer: nn.Module) -> str:
    """What an implementation choice depends on besides the scheme: the layer's type, weight
    shape and, for a convolution, its geometry (two layers with one signature get one choice).

    >>> layer_signature(nn.Conv1d(1, 8, 5, stride=2))
    'Conv1d(1, 8, kernel_size=(5,), stride=(2,)) weight=(8, 1, 5)'
    """
    weight = getattr(layer, "weight", None)
    shape: Any = tuple(weight.shape) if isinstance(weight, Tensor) else None
    if is_expert_bank(layer):  # a Mixture-of-Experts bank: its expert weights' shapes
        shape = {n: tuple(w.shape) for n, w in expert_weights(layer).items()}
    return f"{layer!r} weight={shape}"


def conv_int8_check(layer: nn.Module, scheme: Scheme) -> str | None:
    """oneDNN int8 convolutions take symmetric zero padding only (:func:`zero_padding`), and
    geometries they compute exactly on this CPU (:func:`onednn_int8_conv_exact`)."""
    if zero_padding(layer) is None:
        return (
            f"the int8 convolution kernel takes symmetric zero padding only (this layer has "
            f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r})"
        )
    if not onednn_int8_conv_runs(layer):
        return (
            "oneDNN's int8 convolution gives wrong sums for this geometry on this CPU (kernel "
            f"{tuple(layer.kernel_size)}, {layer.in_channels // layer.groups} input channels "
            "per group; checked by a probe)"
        )
    return None


class KernelBackend(Backend):
    """A real backend driven by a table ``{(layer type, scheme name): Kernel}`` (the default
    implementation of each pair) and ``implementations`` (further implementations of a pair,
    each with its own ``name``). ``choices`` maps ``"<scheme> <layer_signature>"`` to the
    implementation to build (the autotuner's pick, :func:`choice_key`); a layer without a
    choice gets the default."""

    real = True
    kernels: KernelTable
    implementations: ClassVar[Implementations] = {}

    def __init__(self, *, choices: Mapping[str, str] | None = None) -> None:
        self.choices: dict[str, str] = dict(choices or {})

    def tuned(self, choices: Mapping[str, str]) -> KernelBackend:
        """A backend of this kind that builds ``choices`` (on top of this one's)."""
        return type(self)(choices={**self.choices, **choices})

    def kernel_for(self, layer: nn.Module, scheme: Scheme) -> Kernel | None:
        for kind in layer_kinds(layer):
            kernel = self.kernels.get((kind, scheme.name))
            if kernel is not None:
                return kernel
        return None

    def candidates(self, layer: nn.Module, scheme: Scheme) -> list[Kernel]:
        """Every implementation that runs ``layer`` in ``scheme`` here: the default first, then
        the registered alternatives whose check passes (an empty list when none does). A layer
        quantizable by behaviour (HF ``Conv1D``) runs as its standard layer (a Linear)."""
        layer = standard_form(layer)
        default = self.kernel_for(layer, scheme)
        if default is None:
            return []
        found = [default] if default.check is None or default.check(layer, scheme) is None else []
        for kind in layer_kinds(layer):
            for kernel in self.implementations.get((kind, scheme.name), ()):
                if kernel.check is None or kernel.check(layer, scheme) is None:
                    found.append(kernel)
        return found

    def schemes_for(self, layer_type: type[nn.Module]) -> list[str]:
        """Scheme names this backend runs for ``layer_type``."""
        return sorted(
            {s for (kind, s) in self.kernels if issubclass(layer_type, kind)},
            key=lambda s: (s != "fp32", s),
        )

    def unsupported_reason(self, layer: nn.Module, scheme: Scheme) -> str | None:
        layer = standard_form(layer)
        kernel = self.kernel_for(layer, scheme)
        kind = type(layer).__name__
        if kernel is None:
            own_kind = layer_kinds(layer)[0]
            known = self.schemes_for(own_kind)
            why = self.missing_reason(own_kind, scheme)
            return (
                f"the {self.name!r} backend has no real kernel for {scheme.name!r} on {kind}"
                + (f" ({why})" if why else "")
                + f"; it runs {', '.join(map(repr, known)) or 'no scheme'} for {kind}; "
                f"{scheme.name!r} stays available to backend='simulate'"
            )
        if self.candidates(layer, scheme):
            return None
        return kernel.check(layer, scheme) if kernel.check is not None else None

    def missing_reason(self, layer_type: type[nn.Module], scheme: Scheme) -> str | None:
        """Extra words on why a (layer type, scheme) has no kernel here."""
        return None

    def chosen(self, layer: nn.Module, scheme: Scheme) -> Kernel:
        """The implementation :meth:`quantize_layer` builds: the choice for the layer's
        signature when one applies, else the first candidate."""
        found = self.candidates(layer, scheme)
        if not found:
            raise ValueError(
                f"{type(layer).__name__} in {scheme.name!r}: {self.unsupported_reason(layer, scheme)}"
            )
        wanted = self.choices.get(choice_key(layer, scheme))
        return next((k for k in found if k.name == wanted), found[0])

    def quantize_layer(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> nn.Module:
        kernel = self.chosen(layer, scheme)
        return self.build(kernel, standard_form(layer), scheme, act_range=act_range)

    @staticmethod
    def build(
        kernel: Kernel, layer: nn.Module, scheme: Scheme, *, act_range: ActRange = None
    ) -> nn.Module:
        """``kernel``'s module for ``layer`` in ``scheme`` (no gradients recorded)."""
        with torch.no_grad():
            return kernel.build(layer, scheme, act_range=act_range)

    def kernel_table(self) -> list[dict[str, str]]:
        """One row per registered (layer type, scheme, implementation): the kernel that runs it."""
        registered = [
            *self.kernels.items(),
            *((pair, k) for pair, kernels in self.implementations.items() for k in kernels),
        ]
        return [
            {
                "layer_type": kind.__name__,
                "scheme": s,
                "implementation": k.name,
                "kernel": k.description,
            }
            for (kind, s), k in registered
        ]


def layer_kinds(layer: nn.Module) -> tuple[type[nn.Module], ...]:
    """The kinds kernel tables look ``layer`` up by, most specific first: its class and bases,
    or :class:`~mpsearch.layers._experts.ExpertBank` for a Mixture-of-Experts bank (whatever
    its class).

    >>> [k.__name__ for k in layer_kinds(nn.Linear(2, 2))]
    ['Linear', 'Module', 'object']
    """
    return (ExpertBank,) if is_expert_bank(layer) else type(layer).__mro__


def choice_key(layer: nn.Module, scheme: Scheme) -> str:
    """The key of ``layer``'s implementation choice in ``scheme`` (:attr:`KernelBackend.choices`)."""
    return f"{scheme.name} {layer_signature(standard_form(layer))}"


__all__ = [
    "TORCH_DTYPES",
    "CastLayer",
    "FbgemmInt8Linear",
    "Implementations",
    "Int4WeightOnlyLinear",
    "Int8Conv",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "Kernel",
    "KernelBackend",
    "RealLayer",
    "as_2d",
    "choice_key",
    "conv1d_as_2d_dim",
    "conv_int8_check",
    "fbgemm_int8_linear_preferred",
    "int8_activation_spec",
    "int8_kernel_scheme",
    "layer_signature",
    "onednn_int8_conv_exact",
    "onednn_int8_conv_runs",
    "onednn_twin",
    "onednn_u8s8_saturates",
    "per_call_ranges",
    "storage_bytes",
]
