"""How a weight's values are rounded onto its scheme's grid: a registry of rounding methods.

A *choice* for one layer is a scheme name, optionally followed by ``+`` and a rounding method:
``"w4a16"`` (round to nearest, ``rtn``) or ``"w4a16+gptq"``. The method changes which grid point
each weight takes, never the grid (scales, zero points) nor the storage format, so the rounded
weights run on the same kernels. The methods themselves (``gptq``, ``adaround``) live in
:mod:`mpsearch.rounding`, which registers them here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpsearch._validation import unknown, wrong_type

CHOICE_SEPARATOR = "+"
DEFAULT_ROUNDING = "rtn"


@dataclass(frozen=True)
class Rounding:
    """One rounding method: ``round(weight2d, hessian, spec, options) -> rounded weight2d``
    (``None``: round to nearest, which needs no calibration data)."""

    name: str
    description: str
    round: Callable[..., Any] | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.round is not None


ROUNDINGS: dict[str, Rounding] = {
    DEFAULT_ROUNDING: Rounding(DEFAULT_ROUNDING, "round to nearest (no calibration data)")
}


def register_rounding(rounding: Rounding, *, overwrite: bool = False) -> Rounding:
    """Add ``rounding`` to :data:`ROUNDINGS` under its name.

    >>> register_rounding(ROUNDINGS["rtn"]).name
    'rtn'
    """
    if not isinstance(rounding, Rounding):
        raise wrong_type("rounding", rounding, "a Rounding")
    if CHOICE_SEPARATOR in rounding.name or not rounding.name:
        raise ValueError(
            f"A rounding method's name must be non-empty and without {CHOICE_SEPARATOR!r}. "
            f"Got {rounding.name!r} instead."
        )
    known = ROUNDINGS.get(rounding.name)
    if known is not None and known != rounding and not overwrite:
        raise ValueError(
            f"A different rounding method named {rounding.name!r} is registered; pass overwrite=True."
        )
    ROUNDINGS[rounding.name] = rounding
    return rounding


def get_rounding(name: str, *, argument: str = "rounding") -> Rounding:
    """The registered rounding method called ``name``.

    >>> get_rounding("rtn").needs_calibration
    False
    """
    if not isinstance(name, str) or name not in ROUNDINGS:
        raise unknown(argument, name, ROUNDINGS)
    return ROUNDINGS[name]


def split_choice(choice: str) -> tuple[str, str]:
    """``(scheme name, rounding method)`` of a choice name.

    >>> split_choice("w4a16+gptq"), split_choice("w8a8")
    (('w4a16', 'gptq'), ('w8a8', 'rtn'))
    """
    scheme, sep, rounding = choice.partition(CHOICE_SEPARATOR)
    return scheme, (rounding if sep else DEFAULT_ROUNDING)


def choice_name(scheme: str, rounding: str = DEFAULT_ROUNDING) -> str:
    """The choice name of ``scheme`` rounded by ``rounding`` (the bare scheme name for ``rtn``).

    >>> choice_name("w4a16", "gptq"), choice_name("w4a16", "rtn")
    ('w4a16+gptq', 'w4a16')
    """
    return scheme if rounding == DEFAULT_ROUNDING else f"{scheme}{CHOICE_SEPARATOR}{rounding}"
