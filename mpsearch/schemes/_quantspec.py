"""How one tensor is quantized: element format, granularity, symmetry, scale storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpsearch._validation import unknown
from mpsearch.schemes._formats import FORMATS, NumberFormat

Granularity = Literal["none", "tensor", "channel", "group"]
GRANULARITIES: tuple[str, ...] = ("none", "tensor", "channel", "group")
SCALE_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "e8m0": 8}


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of one tensor (a weight or an activation).

    - ``format``: a key of :data:`FORMATS` (``int8``, ``int4``, ``fp8_e4m3``, ``bf16`` ...).
    - ``granularity``: ``"none"`` (a plain cast, no scale: bf16/fp16), ``"tensor"`` (one scale),
      ``"channel"`` (one scale per output channel, weights only) or ``"group"`` (one scale per
      ``group_size`` consecutive inputs of each output channel, weights only).
    - ``symmetric``: signed grid around zero; otherwise an unsigned grid with a zero point.
    - ``scale_dtype``: how scales are stored (``fp32``, ``bf16``, ``fp16`` or ``e8m0``, a
      power of two as in the OCP MX formats); ``zero_point_bits``: storage of a zero point.

    >>> QuantSpec("int4", granularity="group", group_size=32, symmetric=False).n_levels
    16
    """

    format: str
    granularity: Granularity = "tensor"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "fp32"
    zero_point_bits: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise unknown("format", self.format, FORMATS)
        if self.granularity not in GRANULARITIES:
            raise unknown("granularity", self.granularity, GRANULARITIES)
        if self.scale_dtype not in SCALE_BITS:
            raise unknown("scale_dtype", self.scale_dtype, SCALE_BITS)
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(
                    "The 'group_size' argument must be a positive integer when granularity is "
                    f"'group'. Got {self.group_size!r} instead."
                )
        elif self.group_size is not None:
            raise ValueError(
                f"The 'group_size' argument is only accepted with granularity 'group'. Got "
                f"group_size={self.group_size!r} with granularity {self.granularity!r}."
            )
        fmt = FORMATS[self.format]
        if self.granularity == "none" and fmt.kind == "int":
            raise ValueError(
                f"An integer format ({self.format!r}) needs a scale: granularity must be one of "
                "'tensor', 'channel', 'group'. Got 'none' instead."
            )
        if fmt.kind != "int" and not self.symmetric:
            raise ValueError(
                f"Float format {self.format!r} is symmetric; 'symmetric=False' is not accepted."
            )
        if self.scale_dtype == "e8m0" and fmt.kind != "float":
            raise ValueError("Power-of-two ('e8m0') scales are only accepted with float formats.")

    @property
    def fmt(self) -> NumberFormat:
        return FORMATS[self.format]

    @property
    def is_identity(self) -> bool:
        return self.fmt.is_identity

    @property
    def scaled(self) -> bool:
        return self.granularity != "none"

    @property
    def n_levels(self) -> int:
        """Number of distinct codes (integer formats) or ``2**bits`` (floats)."""
        return 2**self.fmt.bits

    def n_scales(self, shape: tuple[int, ...]) -> int:
        """Number of scale (and zero point) entries for a weight of ``shape``."""
        numel = 1
        for d in shape:
            numel *= d
        if self.granularity == "none":
            return 0
        if self.granularity == "tensor":
            return 1
        if self.granularity == "channel":
            return shape[0]
        assert self.group_size is not None  # guaranteed by __post_init__
        return numel // self.group_size

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits to store a tensor of ``shape``: elements plus scales plus zero points."""
        numel = 1
        for d in shape:
            numel *= d
        per_scale = SCALE_BITS[self.scale_dtype] + (0 if self.symmetric else self.zero_point_bits)
        return numel * self.fmt.bits + self.n_scales(shape) * per_scale
