"""Every implementation the ``cpu`` backend registers for a (layer type, scheme) computes the
same function as the default (float schemes) or as the simulation (int8 and weight-only), on
odd convolution shapes, and stores exactly what it holds."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch.backends import get_backend, storage_bytes
from mpsearch.backends._conv import (
    ConvGeometry,
    DequantConv,
    Im2colInt8Conv,
    int8_linear_type,
    ungrouped_check,
)
from mpsearch.backends._cpu import CpuBackend
from mpsearch.backends._kernels import (
    FbgemmInt8Linear,
    Int8Linear,
    choice_key,
    int8_kernel_scheme,
)

LAYERS: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
    "one_channel": (nn.Conv2d(1, 8, 3), (2, 1, 9, 8)),
    "long_1d_kernel": (nn.Conv1d(1, 8, 64, stride=16), (2, 1, 300)),
    "stride_dilation": (nn.Conv2d(4, 16, 3, stride=2, dilation=2, padding=1), (2, 4, 11, 10)),
    "same_even_kernel": (nn.Conv2d(8, 16, (2, 4), padding="same"), (2, 8, 7, 9)),
    "same_reflect_1d": (nn.Conv1d(32, 16, 3, padding="same", padding_mode="reflect"), (2, 32, 20)),
    "circular_strided_1d": (
        nn.Conv1d(16, 8, 4, stride=3, padding=2, padding_mode="circular", bias=False),
        (3, 16, 23),
    ),
    "valid_skips_inputs": (nn.Conv1d(2, 8, 2, stride=3, padding="valid"), (2, 2, 10)),
    "groups": (nn.Conv2d(8, 12, 3, groups=4, stride=2), (2, 8, 9, 9)),
    "depthwise": (nn.Conv2d(8, 8, 3, groups=8, padding=1), (2, 8, 7, 9)),
    "depthwise_1d": (nn.Conv1d(8, 8, 5, groups=8, padding=2, bias=False), (2, 8, 17)),
    "same_depthwise_1d": (nn.Conv1d(8, 8, 7, groups=8, padding="same"), (2, 8, 19)),  # Conformer
    "same_dilated": (nn.Conv2d(4, 8, 3, padding="same", dilation=2), (2, 4, 9, 8)),
    "transposed": (nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1), (2, 8, 5, 6)),
    "linear": (nn.Linear(64, 40), (3, 5, 64)),
    "linear_fan_in_72": (nn.Linear(72, 10), (64, 72)),
}

FLOAT_TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}
"""Largest difference from the default implementation, relative to the output's largest value:
fp32 GEMMs reassociate; bf16 / fp16 outputs round to the dtype."""
INT8_TOL = 1e-5
"""int8 x int8 against the simulation of the same codes: exact integer sums, fp32 rescaling."""
WEIGHT_ONLY_SQNR = {"w8a16": 35.0, "w4a16": 30.0, "w4a16_pc": 30.0}
"""As ``tests/backends/test_cpu.py``: bf16 scales / offsets and bf16 activations."""
SCHEMES = [*FLOAT_TOL, "w8a8", "w4a8_pc", *WEIGHT_ONLY_SQNR]


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(len(name))
    layer, shape = LAYERS[name]
    return layer.eval(), torch.randn(shape)


def _stored(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", LAYERS)
def test_every_implementation_computes_the_layer(name: str, scheme: str) -> None:
    layer, x = _case(name)
    s = mps.get_scheme(scheme)
    if s.applicability_error(tuple(layer.weight.shape)):
        return  # the scheme itself does not take this shape (w4a16: fan-in 9, 36, 72)
    cpu = CpuBackend()
    found = cpu.candidates(layer, s)
    if not found:
        assert cpu.unsupported_reason(layer, s)
        return
    ran = int8_kernel_scheme(s) if s.quantizes_activations else s
    act_ranges = [None, (-2.5, 3.0)] if s.quantizes_activations else [None]
    for act_range in act_ranges:
        with torch.no_grad():
            built = {k.name: cpu.build(k, layer, s, act_range=act_range) for k in found}
            outs = {n: m(x) for n, m in built.items()}
            if scheme in FLOAT_TOL and found[0].name == "default":
                ref, tol = outs["default"], FLOAT_TOL[scheme]
            else:
                ref = get_backend("simulate").quantize_layer(layer, ran, act_range=act_range)(x)
                tol = INT8_TOL
        scale = float(ref.abs().max())
        for n, out in outs.items():
            assert out.shape == ref.shape and out.dtype == x.dtype, n
            if isinstance(built[n], DequantConv):  # the simulation's arithmetic
                assert torch.equal(out, ref), n
            elif scheme in WEIGHT_ONLY_SQNR:
                assert sqnr(ref, out) >= WEIGHT_ONLY_SQNR[scheme], n
            else:
                assert float((out - ref).abs().max()) <= tol * scale, (n, act_range)
            assert storage_bytes(built[n]) == _stored(built[n]), n
    if scheme == "fp32":
        assert built["module"] is layer  # the user's layer, uncopied


def test_implementations_registered() -> None:
    """What each odd layer gets: alternatives by name, refusals with a reason."""
    cpu = CpuBackend()

    def names(name: str, scheme: str) -> list[str]:
        return [k.name for k in cpu.candidates(_case(name)[0], mps.get_scheme(scheme))]

    # fp32: the user's own layer first (an fp32 plan is the user's model)
    assert names("stride_dilation", "fp32") == ["module", "im2col", "channels_last"]
    assert names("long_1d_kernel", "bf16") == ["default", "im2col"]
    assert names("long_1d_kernel", "w8a8") == ["default", "im2col"]
    assert names("same_even_kernel", "w8a8") == ["im2col"]  # oneDNN's conv refuses 'same'
    assert names("depthwise", "w8a8") == ["default"]  # im2col runs no groups
    # symmetric 'same' is numeric zero padding to oneDNN (it refused any 'same' before)
    assert names("same_depthwise_1d", "w8a8") == ["default"]
    assert names("same_dilated", "w8a8") == ["default", "im2col"]
    assert names("transposed", "w8a16") == ["default"] and not names("transposed", "w8a8")
    assert names("long_1d_kernel", "w4a16") == ["default", "im2col"]
    assert names("depthwise", "w8a16") == ["default"]  # dequantized weight: any groups
    other = "fbgemm" if int8_linear_type() is Int8Linear else "onednn"
    assert names("linear", "w8a8") == ["default", other]
    assert names("linear", "fp32") == ["module"]
    reason = cpu.unsupported_reason(_case("one_channel")[0], mps.get_scheme("w4a16"))
    assert "group_size=32 does not divide the layer's input size 9" in reason
    assert "groups=8" in ungrouped_check(_case("depthwise")[0], mps.get_scheme("w8a16"))


def test_weight_only_conv_stores_its_codes() -> None:
    """Conv2d(4, 16, 3), fan-in 36. Default (dequant): w8a16 one byte a weight, fp32 scales, bf16
    bias; w4a16_pc two weights a byte (18 per row), bf16 scales, 1-byte zero points.
    im2col: w8a16's fan-in zero-padded to 48 (the kernel's blocks of 16), bf16 scales."""
    layer = _case("stride_dilation")[0]
    cpu = CpuBackend()
    w8, w4 = mps.get_scheme("w8a16"), mps.get_scheme("w4a16_pc")
    assert storage_bytes(cpu.quantize_layer(layer, w8)) == 16 * 36 + 16 * 4 + 16 * 2
    assert storage_bytes(cpu.quantize_layer(layer, w4)) == 16 * 18 + 16 * 2 + 16 + 16 * 2
    im2col = cpu.tuned({choice_key(layer, w8): "im2col"}).quantize_layer(layer, w8)
    assert storage_bytes(im2col) == 16 * 48 + 16 * 2 + 16 * 2


@pytest.mark.parametrize("linear", [Int8Linear, FbgemmInt8Linear])
def test_im2col_int8_quantizes_the_whole_input(linear: type[nn.Module]) -> None:
    """The input's range sets the activation scale, inputs a stride skips included (their
    windows' range would be narrower), on either int8 Linear kernel."""
    if linear is FbgemmInt8Linear and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm engine in this torch build")
    layer, x = _case("valid_skips_inputs")
    x[:, :, 9] = 8.0  # position 9 is in no window: 0-1, 3-4, 6-7
    s = mps.get_scheme("w8a8")
    with torch.no_grad():
        out = Im2colInt8Conv(layer, s, linear=linear)(x)
        ref = get_backend("simulate").quantize_layer(layer, int8_kernel_scheme(s))(x)
    assert float((out - ref).abs().max()) <= INT8_TOL * float(ref.abs().max())


def test_geometry_matches_unfold() -> None:
    """The windows are F.unfold's columns, in the weight's (C, kh, kw) order."""
    layer, x = _case("stride_dilation")
    g = ConvGeometry.of(layer)
    cols = g.columns(g.pad(x))
    ref = nn.functional.unfold(x, 3, dilation=2, padding=1, stride=2)
    assert torch.equal(cols.reshape(2, -1, 36), ref.transpose(1, 2))


@pytest.mark.parametrize("scheme", ["bf16", "w8a8", "w4a16"])
def test_implementations_save_and_load(scheme: str) -> None:
    """Each implementation pickles (packed int8 weights included) to the same outputs."""
    layer, x = _case("long_1d_kernel")
    s = mps.get_scheme(scheme)
    cpu = CpuBackend()
    for kernel in cpu.candidates(layer, s):
        with torch.no_grad():
            module = cpu.build(kernel, layer, s)
            buffer = io.BytesIO()
            torch.save(module, buffer)
            buffer.seek(0)
            assert torch.equal(torch.load(buffer, weights_only=False)(x), module(x)), kernel.name
