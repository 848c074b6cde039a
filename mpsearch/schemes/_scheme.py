"""Precision schemes: what one layer's weights and activations are stored and computed in."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

from mpsearch._validation import unknown, wrong_type
from mpsearch.schemes._fakequant import group_error
from mpsearch.schemes._quantspec import QuantSpec
from mpsearch.schemes._rounding import (
    CHOICE_SEPARATOR,
    DEFAULT_ROUNDING,
    choice_name,
    get_rounding,
    split_choice,
)

COMPUTE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Scheme:
    """One precision choice for one layer.

    ``weight`` and ``activation`` say how the layer's weight and its input are quantized
    (``activation=None``: the input is only cast to ``compute_dtype``). ``compute_dtype`` is the
    dtype of the arithmetic that is not integer (``bf16`` for weight-only schemes, as their
    CPU kernels take bf16 activations). ``rounding`` is how the weights take their grid points
    (``rtn``: to nearest; ``gptq``, ``adaround``: calibrated, see :mod:`mpsearch.rounding`); a
    scheme with another rounding than ``rtn`` is named ``<scheme>+<rounding>`` and is obtained
    with :func:`get_scheme` (``get_scheme("w4a16+gptq")``), never registered.

    >>> s = SCHEMES["w4a16"]
    >>> s.bits_per_weight((64, 128))   # 4 bits + (bf16 scale + 4-bit zero) per 32 weights
    4.625
    """

    name: str
    weight: QuantSpec
    activation: QuantSpec | None = None
    compute_dtype: str = "fp32"
    description: str = ""
    rounding: str = DEFAULT_ROUNDING

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise unknown("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.rounding != DEFAULT_ROUNDING:
            get_rounding(self.rounding)
            why = rounding_error(self.weight)
            if why:
                raise ValueError(
                    f"Scheme {self.name!r} cannot take rounding {self.rounding!r}: {why}."
                )

    @property
    def base_name(self) -> str:
        """The registered scheme's name, without the rounding (``w4a16+gptq`` -> ``w4a16``)."""
        return split_choice(self.name)[0]

    @property
    def base(self) -> Scheme:
        """This scheme rounded to nearest (the registered scheme)."""
        return self if self.rounding == DEFAULT_ROUNDING else get_scheme(self.base_name)

    @property
    def weight_bits(self) -> int:
        """Nominal bits of one weight element (without scales)."""
        return self.weight.fmt.bits

    @property
    def activation_bits(self) -> int:
        if self.activation is not None:
            return self.activation.fmt.bits
        return 32 if self.compute_dtype == "fp32" else 16

    @property
    def quantizes_activations(self) -> bool:
        return self.activation is not None and self.activation.scaled

    def weight_storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits to store a weight of ``shape`` in this scheme (scales and zero points included)."""
        return self.weight.storage_bits(tuple(shape))

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        """Exact storage bits per weight element for a weight of ``shape``."""
        numel = 1
        for d in shape:
            numel *= d
        return self.weight_storage_bits(shape) / numel

    def applicability_error(self, shape: tuple[int, ...]) -> str | None:
        """Why this scheme cannot quantize a weight of ``shape`` (``None`` when it can), naming
        the registered variant that can when there is one (:func:`nearest_variant`).

        >>> SCHEMES["w4a8"].applicability_error((16, 1, 3, 3))[-40:]
        "; its variant 'w4a8_pc' takes this shape"
        """
        why = group_error(tuple(shape), self.weight)
        if why is None:
            return None
        variant = nearest_variant(self, shape)
        return why + (f"; its variant {variant.name!r} takes this shape" if variant else "")

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.rounding == DEFAULT_ROUNDING:
            del data["rounding"]  # as written before rounding methods existed
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Scheme:
        data = dict(data)
        data["weight"] = QuantSpec(**data["weight"])
        if data.get("activation") is not None:
            data["activation"] = QuantSpec(**data["activation"])
        return cls(**data)


def _int_w(
    bits: int, *, group: int | None = None, symmetric: bool = True, scale: str = "fp32"
) -> QuantSpec:
    return QuantSpec(
        f"int{bits}",
        granularity="group" if group else "channel",
        group_size=group,
        symmetric=symmetric,
        scale_dtype=scale,
        zero_point_bits=0 if symmetric else bits,
    )


_BF16 = QuantSpec("bf16", granularity="none")
_FP16 = QuantSpec("fp16", granularity="none")
_ACT_INT8 = QuantSpec("int8", granularity="tensor", symmetric=False, zero_point_bits=8)
_ACT_INT4 = QuantSpec("int4", granularity="tensor", symmetric=False, zero_point_bits=4)

SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme, *, overwrite: bool = False) -> Scheme:
    """Add ``scheme`` to :data:`SCHEMES` under its name.

    >>> register_scheme(Scheme("w4a16_g128", _int_w(4, group=128, symmetric=False, scale="bf16"),
    ...                        _BF16, "bf16"), overwrite=True).name
    'w4a16_g128'
    """
    if not isinstance(scheme, Scheme):
        raise wrong_type("scheme", scheme, "a Scheme")
    if CHOICE_SEPARATOR in scheme.name or scheme.rounding != DEFAULT_ROUNDING:
        raise ValueError(
            f"Register schemes rounded to nearest, named without {CHOICE_SEPARATOR!r} (a rounding "
            f"method is chosen per layer: 'w4a16+gptq'). Got {scheme.name!r} instead."
        )
    if scheme.name in SCHEMES and not overwrite and SCHEMES[scheme.name] != scheme:
        raise ValueError(
            f"A different scheme named {scheme.name!r} is registered; pass overwrite=True."
        )
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str | Scheme, *, argument: str = "scheme") -> Scheme:
    """The registered scheme called ``name`` (a ``Scheme`` is returned as is); a choice name
    ``<scheme>+<rounding>`` gives that scheme with that rounding method.

    >>> get_scheme("w8a8").weight_bits
    8
    >>> get_scheme("w4a16+gptq").rounding, get_scheme("w4a16+gptq").base_name
    ('gptq', 'w4a16')
    """
    if isinstance(name, Scheme):
        return name
    if isinstance(name, str) and CHOICE_SEPARATOR in name:
        base, rounding = split_choice(name)
        get_rounding(rounding, argument=f"{argument} (rounding of {name!r})")
        return _rounded(get_scheme(base, argument=argument), rounding, argument)
    if not isinstance(name, str) or name not in SCHEMES:
        raise unknown(argument, name, SCHEMES)
    return SCHEMES[name]


def rounding_error(spec: QuantSpec) -> str | None:
    """Why weights quantized by ``spec`` cannot take a calibrated rounding (``None``: they can).

    >>> rounding_error(SCHEMES["bf16"].weight)
    "its weights are 'bf16' (a plain cast: nothing to round); calibrated rounding needs integer weights with per-channel or per-group scales"
    """
    if spec.fmt.kind == "int" and spec.granularity in ("channel", "group"):
        return None
    what = "a plain cast: nothing to round" if spec.granularity == "none" else spec.granularity
    return (
        f"its weights are {spec.format!r} ({what}); calibrated rounding needs integer weights "
        "with per-channel or per-group scales"
    )


@functools.cache
def _cached_rounded(base: Scheme, rounding: str) -> Scheme:
    return replace(base, name=choice_name(base.name, rounding), rounding=rounding)


def _rounded(base: Scheme, rounding: str, argument: str) -> Scheme:
    if rounding == DEFAULT_ROUNDING:
        return base
    why = rounding_error(base.weight)
    if why:
        raise ValueError(
            f"The {argument!r} argument {choice_name(base.name, rounding)!r} is not a valid choice: "
            f"scheme {base.name!r} cannot take rounding {rounding!r}: {why}."
        )
    return _cached_rounded(base, rounding)


def _formats(scheme: Scheme) -> tuple[object, ...]:
    """Everything of a scheme but its name, description and weight granularity."""
    w = scheme.weight
    return (
        w.format,
        w.symmetric,
        w.scale_dtype,
        w.zero_point_bits,
        scheme.activation,
        scheme.compute_dtype,
    )


def nearest_variant(scheme: str | Scheme, shape: tuple[int, ...]) -> Scheme | None:
    """``scheme`` when it can quantize a weight of ``shape``; otherwise its nearest registered
    variant that can, or ``None``.

    A variant has the same formats, activation and compute dtype, and its weights grouped
    otherwise or scaled per output channel (``w4a8`` -> ``w4a8_pc``). The nearest is the one
    whose group (for a per-channel variant, the layer's fan-in) is closest in ratio to
    ``scheme``'s group size; the smaller group on a tie.

    >>> nearest_variant("w4a8", (16, 1, 3, 3)).name, nearest_variant("w4a8", (16, 64)).name
    ('w4a8_pc', 'w4a8')
    """
    scheme = get_scheme(scheme)
    if scheme.rounding != DEFAULT_ROUNDING:  # the same rounding on the base scheme's variant
        variant = nearest_variant(scheme.base, shape)
        return None if variant is None else _cached_rounded(variant, scheme.rounding)
    shape = tuple(shape)
    if group_error(shape, scheme.weight) is None:
        return scheme
    if scheme.weight.granularity != "group":
        return None
    fan_in = math.prod(shape[1:])

    def group(s: Scheme) -> int:
        return s.weight.group_size or fan_in

    wanted = group(scheme)
    variants = [
        s
        for s in SCHEMES.values()
        if s.weight.granularity in ("group", "channel")
        and _formats(s) == _formats(scheme)
        and group_error(shape, s.weight) is None
    ]
    if not variants:
        return None
    return min(variants, key=lambda s: (abs(math.log(group(s) / wanted)), group(s)))


for _scheme in (
    Scheme("fp32", QuantSpec("fp32", granularity="none"), None, "fp32", "full precision"),
    Scheme("bf16", _BF16, _BF16, "bf16", "bfloat16 weights and activations"),
    Scheme("fp16", _FP16, _FP16, "fp16", "float16 weights and activations"),
    Scheme(
        "fp8",
        QuantSpec("fp8_e4m3", granularity="channel"),
        QuantSpec("fp8_e4m3", granularity="tensor"),
        "fp32",
        "fp8 e4m3 weights (per-channel scale) and activations (per-tensor scale)",
    ),
    Scheme(
        "w8a8",
        _int_w(8),
        _ACT_INT8,
        "fp32",
        "int8 per-channel weights, int8 per-tensor activations",
    ),
    Scheme("w8a16", _int_w(8), _BF16, "bf16", "int8 per-channel weight-only, bf16 activations"),
    Scheme(
        "w4a16",
        _int_w(4, group=32, symmetric=False, scale="bf16"),
        _BF16,
        "bf16",
        "int4 asymmetric weight-only, groups of 32, bf16 activations",
    ),
    Scheme(
        "w4a16_pc",
        _int_w(4, symmetric=False, scale="bf16"),
        _BF16,
        "bf16",
        "int4 asymmetric weight-only, one scale per output channel, bf16 activations",
    ),
    Scheme(
        "w4a8",
        _int_w(4, group=32, scale="bf16"),
        _ACT_INT8,
        "fp32",
        "int4 symmetric weights in groups of 32, int8 per-tensor activations",
    ),
    Scheme(
        "w4a8_pc",
        _int_w(4, scale="bf16"),
        _ACT_INT8,
        "fp32",
        "int4 symmetric per-channel weights, int8 per-tensor activations",
    ),
    Scheme(
        "w4a4",
        _int_w(4, group=32, scale="bf16"),
        _ACT_INT4,
        "fp32",
        "int4 symmetric weights in groups of 32, int4 per-tensor asymmetric activations",
    ),
    Scheme(
        "w4a4_pc",
        _int_w(4, scale="bf16"),
        _ACT_INT4,
        "fp32",
        "int4 symmetric per-channel weights, int4 per-tensor asymmetric activations",
    ),
    Scheme(
        "w2a16",
        _int_w(2, group=32, symmetric=False, scale="bf16"),
        _BF16,
        "bf16",
        "2-bit asymmetric weight-only, groups of 32, bf16 activations",
    ),
    Scheme(
        "w2a16_pc",
        _int_w(2, symmetric=False, scale="bf16"),
        _BF16,
        "bf16",
        "2-bit asymmetric weight-only, one scale per output channel, bf16 activations",
    ),
    Scheme(
        "fp4",
        QuantSpec("fp4_e2m1", granularity="group", group_size=32, scale_dtype="e8m0"),
        _BF16,
        "bf16",
        "fp4 e2m1 weights in blocks of 32 with power-of-two (e8m0) scales (MXFP4), bf16 activations",
    ),
    Scheme(
        "fp4_pc",
        QuantSpec("fp4_e2m1", granularity="channel", scale_dtype="e8m0"),
        _BF16,
        "bf16",
        "fp4 e2m1 weights, one power-of-two (e8m0) scale per output channel, bf16 activations",
    ),
):
    register_scheme(_scheme)
