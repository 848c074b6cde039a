from __future__ import annotations

import pytest
import torch

from mpsearch.schemes import SCHEMES, QuantSpec, fake_quantize
from mpsearch.schemes._fakequant import qparams, quantize_codes


def test_symmetric_int8_grid_is_exact() -> None:
    spec = QuantSpec("int8", granularity="tensor")
    x = torch.tensor([-2.54, -1.0, 0.0, 0.004, 0.006, 2.54])
    scale = 2.54 / 127
    out = fake_quantize(x, spec)
    expected = torch.round(x / torch.tensor(scale, dtype=torch.float32)) * torch.tensor(scale)
    assert torch.equal(out, expected)
    codes = quantize_codes(x, torch.tensor(2.54 / 127), None, spec)
    assert codes.tolist() == [-127, -50, 0, 0, 0, 127]


def test_saturation_with_static_range() -> None:
    spec = QuantSpec("int8", granularity="tensor")
    out = fake_quantize(torch.tensor([-10.0, 0.5, 10.0]), spec, lo=-1.27, hi=1.27)
    assert out[0].item() == pytest.approx(-1.27) and out[2].item() == pytest.approx(1.27)
    assert out[1].item() == pytest.approx(0.5)


def test_asymmetric_int4_represents_zero_exactly_and_uses_16_levels() -> None:
    spec = QuantSpec("int4", symmetric=False, zero_point_bits=4)
    x = torch.linspace(-0.3, 1.2, 1000)
    out = fake_quantize(torch.cat([x, torch.zeros(3)]), spec)
    assert (out[-3:] == 0).all()
    assert out[:-3].unique().numel() == 16
    scale, zero = qparams(x.min().reshape(1, 1), x.max().reshape(1, 1), spec)
    assert zero is not None and 0 <= zero.item() <= 15 and zero.item() == round(zero.item())
    assert scale.item() == pytest.approx(1.5 / 15)


def test_all_zero_tensor_stays_zero() -> None:
    for spec in (
        QuantSpec("int8"),
        QuantSpec("int4", symmetric=False, zero_point_bits=4),
        QuantSpec("fp8_e4m3"),
        QuantSpec("fp4_e2m1", granularity="group", group_size=4, scale_dtype="e8m0"),
    ):
        z = torch.zeros(2, 8)
        assert torch.equal(fake_quantize(z, spec), z), spec


def test_a_subnormal_range_quantizes_to_finite_values() -> None:
    """A range whose scale underflows to 0 (activations of 1e-44 in a randomly initialised
    MobileViT: range / 255 is 0 in float32) gave NaN; the scale is at least float32's smallest
    normal number, and such values round to 0."""
    x = torch.tensor([[0.0, 2.9e-44, -1.4e-45, 1e-44]])
    for spec in (
        QuantSpec("int8", granularity="tensor"),
        QuantSpec("int8", granularity="tensor", symmetric=False, zero_point_bits=8),
        QuantSpec("fp8_e4m3", granularity="tensor"),
        QuantSpec("fp4_e2m1", granularity="group", group_size=4, scale_dtype="e8m0"),
    ):
        scale, _ = qparams(x.min().reshape(1, 1), x.max().reshape(1, 1), spec)
        assert (scale >= torch.finfo(torch.float32).tiny).all(), spec
        out = fake_quantize(x, spec)
        assert torch.isfinite(out).all() and out.abs().max() <= 3e-44, spec


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int8", granularity="channel"),
        QuantSpec(
            "int4",
            granularity="group",
            group_size=16,
            symmetric=False,
            zero_point_bits=4,
            scale_dtype="bf16",
        ),
        QuantSpec("int2", granularity="group", group_size=16, symmetric=False, zero_point_bits=2),
        QuantSpec("fp8_e4m3", granularity="channel"),
        QuantSpec("fp4_e2m1", granularity="group", group_size=32, scale_dtype="e8m0"),
        QuantSpec("bf16", granularity="none"),
    ],
)
def test_idempotent(spec: QuantSpec) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    once = fake_quantize(w, spec)
    twice = fake_quantize(once, spec)
    # codes are identical; values agree to within one float32 ulp of the scale arithmetic
    torch.testing.assert_close(twice, once, rtol=2**-21, atol=0)


def test_power_of_two_scales_make_fp4_idempotent_bit_for_bit() -> None:
    spec = QuantSpec("fp4_e2m1", granularity="group", group_size=32, scale_dtype="e8m0")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    once = fake_quantize(w, spec)
    assert torch.equal(fake_quantize(once, spec), once)


def test_per_channel_scales_are_per_row() -> None:
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-100, 100, 9)])
    out = fake_quantize(w, QuantSpec("int8", granularity="channel"))
    assert torch.allclose(out, w, atol=100 / 127 / 2 + 1e-6)
    assert (out[0] - w[0]).abs().max() <= 1 / 127 / 2 + 1e-7  # small row keeps its own fine scale


def test_fp8_scaled_matches_torch_cast() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec("fp8_e4m3", granularity="channel")
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quantize(w, spec), expected)


def test_bf16_cast_matches_torch() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(6)) * 1e3
    assert torch.equal(
        fake_quantize(x, QuantSpec("bf16", granularity="none")), x.bfloat16().float()
    )


def test_group_size_must_divide() -> None:
    spec = QuantSpec("int4", granularity="group", group_size=32, symmetric=False, zero_point_bits=4)
    with pytest.raises(ValueError, match="group_size=32 does not divide the layer's input size 48"):
        fake_quantize(torch.randn(4, 48), spec)


def test_quantspec_validation_messages() -> None:
    with pytest.raises(ValueError, match="'format' argument must be one of .*'int8'.* Got 'int6'"):
        QuantSpec("int6")
    with pytest.raises(ValueError, match="'group_size' argument must be a positive integer"):
        QuantSpec("int4", granularity="group", group_size=0)
    with pytest.raises(ValueError, match="needs a scale"):
        QuantSpec("int8", granularity="none")


def test_per_channel_int4_symmetric_by_hand() -> None:
    """w4a8_pc on a 3x3x1 convolution weight (fan-in 9): one bf16 scale per output channel,
    ``max|w| / 7``; codes round half to even and clamp to [-7, 7]."""
    w = torch.tensor(
        [
            [-1.75, 0.5, 0.3, 0.875, 0.0, 0.1, -0.2, 1.0, 0.125],  # scale 0.25
            [3.5, -3.5, 0.74, 0.76, -1.2, 2.25, 0.0, 0.2, -0.3],  # scale 0.5
        ]
    ).reshape(2, 1, 3, 3)
    expected = torch.tensor(
        [
            [-1.75, 0.5, 0.25, 1.0, 0.0, 0.0, -0.25, 1.0, 0.0],
            [3.5, -3.5, 0.5, 1.0, -1.0, 2.0, 0.0, 0.0, -0.5],
        ]
    ).reshape(2, 1, 3, 3)
    assert torch.equal(fake_quantize(w, SCHEMES["w4a8_pc"].weight), expected)


def test_per_channel_int4_asymmetric_by_hand() -> None:
    """w4a16_pc: range [-0.5, 3.25] -> scale 3.75 / 15 = 0.25, zero point round(0.5 / 0.25) = 2;
    codes ``round(w / 0.25) + 2`` in [0, 15]."""
    w = torch.tensor([[-0.5, 3.25, 0.1, 1.3, 0.0, 2.0, -0.4, 0.6, 3.0]]).reshape(1, 1, 3, 3)
    spec = SCHEMES["w4a16_pc"].weight
    scale, zero = qparams(torch.tensor([[-0.5]]), torch.tensor([[3.25]]), spec)
    assert (scale.item(), zero.item()) == (0.25, 2.0)
    codes = quantize_codes(w.reshape(1, -1), scale, zero, spec)
    assert codes.tolist() == [[0, 15, 2, 7, 2, 10, 0, 4, 14]]
    expected = torch.tensor([[-0.5, 3.25, 0.0, 1.25, 0.0, 2.0, -0.5, 0.5, 3.0]]).reshape(1, 1, 3, 3)
    assert torch.equal(fake_quantize(w, spec), expected)
