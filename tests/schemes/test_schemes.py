from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from mpsearch.backends import quantize
from mpsearch.schemes import SCHEMES, Scheme, fake_quantize, get_scheme, register_scheme

REQUIRED = [
    *("fp32", "bf16", "fp16", "fp8", "w8a8", "w8a16", "w4a16", "w4a8", "w2a16", "fp4"),
    *("w4a16_pc", "w4a8_pc", "w4a4", "w4a4_pc", "w2a16_pc", "fp4_pc"),
]


def test_required_schemes_registered() -> None:
    assert set(REQUIRED) <= set(SCHEMES)


@pytest.mark.parametrize(
    ("name", "shape", "bits"),
    [
        ("fp32", (64, 128), 32 * 64 * 128),
        ("bf16", (64, 128), 16 * 64 * 128),
        ("w8a8", (64, 128), 8 * 64 * 128 + 32 * 64),  # fp32 scale per output channel
        ("w8a16", (16, 3, 3, 3), 8 * 16 * 27 + 32 * 16),
        ("fp8", (64, 128), 8 * 64 * 128 + 32 * 64),
        (
            "w4a16",
            (64, 128),
            4 * 64 * 128 + (16 + 4) * 64 * 128 // 32,
        ),  # bf16 scale + 4-bit zero / 32
        ("w4a8", (64, 128), 4 * 64 * 128 + 16 * 64 * 128 // 32),
        ("w2a16", (64, 128), 2 * 64 * 128 + (16 + 2) * 64 * 128 // 32),
        ("fp4", (64, 128), 4 * 64 * 128 + 8 * 64 * 128 // 32),  # MXFP4: e8m0 scale per 32
        ("w4a16_pc", (16, 1, 3, 3), 4 * 144 + (16 + 4) * 16),  # bf16 scale + 4-bit zero / channel
        ("w4a8_pc", (16, 4, 3, 3), 4 * 576 + 16 * 16),
        ("w4a4", (64, 128), 4 * 64 * 128 + 16 * 64 * 128 // 32),
        ("w4a4_pc", (8, 16), 4 * 128 + 16 * 8),
        ("w2a16_pc", (8, 16), 2 * 128 + (16 + 2) * 8),
        ("fp4_pc", (8, 16), 4 * 128 + 8 * 8),
    ],
)
def test_storage_bits_exact(name: str, shape: tuple[int, ...], bits: int) -> None:
    scheme = SCHEMES[name]
    assert scheme.weight_storage_bits(shape) == bits
    n = 1
    for d in shape:
        n *= d
    assert scheme.bits_per_weight(shape) == bits / n


def test_bits_per_weight_figures() -> None:
    assert SCHEMES["w4a16"].bits_per_weight((10, 256)) == 4.625
    assert SCHEMES["fp4"].bits_per_weight((10, 256)) == 4.25
    assert SCHEMES["w8a8"].bits_per_weight((4, 8)) == 8 + 32 / 8


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'scheme' argument must be one of .*'w8a8'.*Got 'int3'"):
        get_scheme("int3")


def test_applicability_error_for_group_size() -> None:
    assert SCHEMES["w4a16"].applicability_error((16, 9)) is not None
    assert SCHEMES["w4a16"].applicability_error((16, 64)) is None
    assert SCHEMES["w8a8"].applicability_error((16, 9)) is None


@pytest.mark.parametrize("shape", [(16, 9), (16, 1, 3, 3), (16, 4, 3, 3), (8, 16), (64, 3, 4, 4)])
def test_every_shape_takes_some_4_bit_scheme(shape: tuple[int, ...]) -> None:
    four = [s for s in SCHEMES.values() if s.weight_bits == 4]
    fits = {s.name for s in four if s.applicability_error(shape) is None}
    assert {"w4a16_pc", "w4a8_pc", "w4a4_pc", "fp4_pc"} <= fits
    assert not fits & {"w4a16", "w4a8", "w4a4", "fp4"}  # no fan-in here is a multiple of 32


def test_per_channel_variants_differ_from_their_group_scheme_only_in_granularity() -> None:
    for name in ("w4a16", "w4a8", "w4a4", "w2a16", "fp4"):
        group, channel = SCHEMES[name], SCHEMES[f"{name}_pc"]
        assert channel.weight == replace(group.weight, granularity="channel", group_size=None)
        assert (channel.activation, channel.compute_dtype) == (
            group.activation,
            group.compute_dtype,
        )
    a4 = SCHEMES["w4a4"].activation
    assert a4 is not None and (a4.format, a4.granularity, a4.symmetric) == ("int4", "tensor", False)
    assert SCHEMES["w4a4"].activation_bits == 4 and SCHEMES["w4a4"].quantizes_activations


def test_w4a4_simulates_exactly() -> None:
    """4-bit weights per channel and 4-bit activations per tensor, by hand: input range
    [-0.5, 3.25] -> scale 0.25, zero point 2; weights |max| 1.75 and 3.5 -> scales 0.25, 0.5."""
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.75, -0.5, 0.3, 0.875], [3.5, 0.74, -1.2, 2.25]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    q = quantize(nn.Sequential(layer), "w4a4")  # fan-in 4: resolves to w4a4_pc
    assert q.mpsearch_assignment == {"0": "w4a4_pc"}
    x = torch.tensor([[-0.5, 0.1, 1.3, 3.25]])  # -> [-0.5, 0.0, 1.25, 3.25]
    # weights -> [[1.75, -0.5, 0.25, 1.0], [3.5, 0.5, -1.0, 2.0]] (ties to even: 3.5 -> 4, 4.5 -> 4)
    expected = torch.tensor([[-0.875 + 0.3125 + 3.25 + 0.5, -1.75 - 1.25 + 6.5 - 1.0]])
    assert torch.equal(q(x), expected)


def test_w4a4_group_scheme_simulates_as_its_two_fake_quantizations() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 3), torch.randn(5, 64)
    s = SCHEMES["w4a4"]
    out = quantize(nn.Sequential(layer), "w4a4")(x)
    xq = fake_quantize(x, s.activation)
    assert xq.unique().numel() <= 16
    expected = nn.functional.linear(xq, fake_quantize(layer.weight.detach(), s.weight), layer.bias)
    assert torch.equal(out, expected.detach())


def test_scheme_dict_round_trip_and_registration() -> None:
    s = SCHEMES["w4a16"]
    assert Scheme.from_dict(s.to_dict()) == s
    other = Scheme.from_dict({**s.to_dict(), "name": "w4a16", "compute_dtype": "fp32"})
    with pytest.raises(ValueError, match="different scheme named 'w4a16'"):
        register_scheme(other)
    with pytest.raises(ValueError, match="'compute_dtype' argument must be one of"):
        Scheme("x", s.weight, None, "fp64")
