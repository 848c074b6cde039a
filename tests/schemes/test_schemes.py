from __future__ import annotations

import pytest

from mpsearch.schemes import SCHEMES, Scheme, get_scheme, register_scheme

REQUIRED = ["fp32", "bf16", "fp16", "fp8", "w8a8", "w8a16", "w4a16", "w4a8", "w2a16", "fp4"]


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


def test_scheme_dict_round_trip_and_registration() -> None:
    s = SCHEMES["w4a16"]
    assert Scheme.from_dict(s.to_dict()) == s
    other = Scheme.from_dict({**s.to_dict(), "name": "w4a16", "compute_dtype": "fp32"})
    with pytest.raises(ValueError, match="different scheme named 'w4a16'"):
        register_scheme(other)
    with pytest.raises(ValueError, match="'compute_dtype' argument must be one of"):
        Scheme("x", s.weight, None, "fp64")


def test_public_surface_and_the_top_level_names() -> None:
    import mpsearch as mps
    from mpsearch import schemes

    assert sorted(schemes.__all__) == [
        "FORMATS",
        "MSEObserver",
        "MinMaxObserver",
        "OBSERVERS",
        "Observer",
        "PercentileObserver",
        "QuantSpec",
        "SCHEMES",
        "Scheme",
        "fake_quantize",
        "get_scheme",
        "register_scheme",
    ]
    assert all(hasattr(schemes, name) for name in schemes.__all__)
    assert mps.SCHEMES is SCHEMES and mps.get_scheme is get_scheme
    assert mps.register_scheme is register_scheme and mps.Scheme is Scheme
    assert mps.QuantSpec is schemes.QuantSpec
