"""Number formats (integer grids and minifloats) and their exact rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class NumberFormat:
    """One element format.

    ``kind="int"``: an integer grid of ``bits`` bits (signed when symmetric, unsigned with a
    zero point when asymmetric). ``kind="float"``: a minifloat with ``exp_bits`` exponent and
    ``man_bits`` mantissa bits, IEEE-style bias, subnormals, round-to-nearest-even and
    saturation at ``max_value``. ``kind="native"``: a torch float dtype used as is (fp32).

    >>> FORMATS["fp4_e2m1"].max_value
    6.0
    """

    name: str
    kind: Literal["int", "float", "native"]
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    max_value: float = 0.0
    torch_dtype: torch.dtype | None = None

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite value (``floor(log2(max_value))``)."""
        _, exp = torch.frexp(torch.tensor(self.max_value, dtype=torch.float64))
        return int(exp) - 1

    @property
    def is_identity(self) -> bool:
        return self.kind == "native" and self.bits >= 32


def _float_max(exp_bits: int, man_bits: int, *, ieee: bool) -> float:
    """Largest finite value. ``ieee`` formats reserve the top exponent for inf/NaN."""
    bias = 2 ** (exp_bits - 1) - 1
    if ieee:
        return (2 - 2.0**-man_bits) * 2.0 ** (2**exp_bits - 2 - bias)
    # "fn" formats (e4m3fn, e2m1): top exponent is finite; e4m3fn loses only the all-ones mantissa.
    top = 2**exp_bits - 1 - bias
    if exp_bits == 4 and man_bits == 3:
        return (2 - 2.0 ** -(man_bits - 1)) * 2.0**top  # 448
    return (2 - 2.0**-man_bits) * 2.0**top


FORMATS: dict[str, NumberFormat] = {
    "fp32": NumberFormat(
        "fp32", "native", 32, 8, 23, float(torch.finfo(torch.float32).max), torch.float32
    ),
    "bf16": NumberFormat("bf16", "float", 16, 8, 7, _float_max(8, 7, ieee=True), torch.bfloat16),
    "fp16": NumberFormat("fp16", "float", 16, 5, 10, _float_max(5, 10, ieee=True), torch.float16),
    "fp8_e4m3": NumberFormat(
        "fp8_e4m3", "float", 8, 4, 3, _float_max(4, 3, ieee=False), torch.float8_e4m3fn
    ),
    "fp8_e5m2": NumberFormat(
        "fp8_e5m2", "float", 8, 5, 2, _float_max(5, 2, ieee=True), torch.float8_e5m2
    ),
    "fp4_e2m1": NumberFormat("fp4_e2m1", "float", 4, 2, 1, _float_max(2, 1, ieee=False)),
    "int8": NumberFormat("int8", "int", 8),
    # 7-bit activation codes: what oneDNN's u8 x s8 kernels take on CPUs without VNNI
    "int7": NumberFormat("int7", "int", 7),
    "int4": NumberFormat("int4", "int", 4),
    "int2": NumberFormat("int2", "int", 2),
}


def round_to_float_format(x: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Round ``x`` to the nearest value of minifloat ``fmt`` (ties to even), saturating.

    Computed in float32 with exact power-of-two arithmetic, so for formats torch has
    (bf16, fp16, fp8) the result equals torch's own cast for every finite in-range value.

    >>> round_to_float_format(torch.tensor([0.3, 5.1, 100.0]), FORMATS["fp4_e2m1"])
    tensor([0.5000, 6.0000, 6.0000])
    """
    if fmt.kind != "float":
        raise ValueError(f"round_to_float_format needs a float format, got {fmt.name!r}.")
    xf = x.float()
    mag = xf.abs()
    _, exp = torch.frexp(mag)  # mag = m * 2**exp, m in [0.5, 1)
    exponent = torch.clamp(exp - 1, min=fmt.min_normal_exponent)
    ulp = torch.ldexp(torch.ones_like(mag), exponent - fmt.man_bits)
    rounded = torch.round(mag / ulp) * ulp
    rounded = torch.clamp(rounded, max=fmt.max_value)
    return (
        torch.copysign(rounded, xf).to(x.dtype)
        if x.dtype != torch.float32
        else torch.copysign(rounded, xf)
    )


def int_range(bits: int, *, symmetric: bool) -> tuple[int, int]:
    """Integer code range: restricted signed range when symmetric, ``[0, 2**bits-1]`` otherwise.

    >>> int_range(8, symmetric=True), int_range(4, symmetric=False)
    ((-127, 127), (0, 15))
    """
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1
