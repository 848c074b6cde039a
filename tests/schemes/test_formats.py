from __future__ import annotations

import pytest
import torch

from mpsearch.schemes import FORMATS
from mpsearch.schemes._formats import round_to_float_format


def _wide_values(fmt_max: float, n: int = 200_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mags = torch.exp(torch.empty(n).uniform_(-30, 1, generator=g) * 3.0)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = (signs * mags).clamp(-fmt_max, fmt_max)
    return torch.cat([x, torch.tensor([0.0, -0.0, fmt_max, -fmt_max])])


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp8_e4m3", torch.float8_e4m3fn),
        ("fp8_e5m2", torch.float8_e5m2),
    ],
)
def test_minifloat_rounding_matches_torch_cast_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    fmt = FORMATS[name]
    x = _wide_values(fmt.max_value)
    ours = round_to_float_format(x, fmt)
    theirs = x.to(dtype).float()
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_fp8_ties_round_to_even() -> None:
    # 1 + 1/16 lies halfway between 1 and 1.125 in e4m3: ties go to the even mantissa (1.0)
    x = torch.tensor([1.0625, 1.1875, 2.125])
    out = round_to_float_format(x, FORMATS["fp8_e4m3"])
    assert out.tolist() == [1.0, 1.25, 2.0]
    assert torch.equal(out, x.to(torch.float8_e4m3fn).float())


def test_fp4_e2m1_grid_and_saturation() -> None:
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = torch.tensor(grid + [-g for g in grid])
    assert torch.equal(round_to_float_format(x, FORMATS["fp4_e2m1"]), x)
    out = round_to_float_format(
        torch.tensor([0.25, 0.26, 2.5, 5.0, 7.0, 1e9, -1e9]), FORMATS["fp4_e2m1"]
    )
    # 0.25 ties to 0 (even), 2.5 ties to 2, 5 ties to 4, beyond 6 saturates
    assert out.tolist() == [0.0, 0.5, 2.0, 4.0, 6.0, 6.0, -6.0]


def test_format_maxima() -> None:
    assert FORMATS["fp8_e4m3"].max_value == 448.0 == torch.finfo(torch.float8_e4m3fn).max
    assert FORMATS["fp8_e5m2"].max_value == torch.finfo(torch.float8_e5m2).max
    assert FORMATS["bf16"].max_value == torch.finfo(torch.bfloat16).max
    assert FORMATS["fp16"].max_value == torch.finfo(torch.float16).max
    assert FORMATS["fp4_e2m1"].max_value == 6.0
