"""What the verbs' options objects share: validation per field, a dict round trip (YAML), and
keyword overrides with a clear error for an unknown name.

A verb's options class is a frozen dataclass deriving from :class:`Options` with a ``CHECKS``
table (field name -> ``check(name, value) -> value``) that ``__post_init__`` runs on every
field, so a bad option fails when the object is made, before any work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mpsearch._validation import InvalidTypeError, check_positive, invalid

Check = Callable[[str, Any], Any]
_O = TypeVar("_O", bound="Options")


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, value, "a positive integer", kind="option")
    return value


def optional_positive_int(name: str, value: Any) -> int | None:
    """``value`` if it is ``None`` or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, value, "None or a positive integer", kind="option")
    return value


def non_negative_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(name, value, "a non-negative integer", kind="option")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise invalid(name, value, "True or False", kind="option")
    return value


def optional_flag(name: str, value: Any) -> bool | None:
    """``value`` if it is ``None``, ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise invalid(name, value, "None, True or False", kind="option")
    return value


def optional_path(name: str, value: Any) -> str | Path | None:
    """``value`` if it is ``None`` or a path (``str`` or ``Path``)."""
    if value is not None and not isinstance(value, (str, Path)):
        raise invalid(name, value, "None or a directory path", kind="option")
    return value


def optional_names(name: str, value: Any) -> tuple[str, ...] | None:
    """``value`` as a tuple if it is ``None`` or a non-empty list of strings."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise invalid(name, value, "None or a non-empty list of layer names", kind="option")
    names = tuple(value)
    if not names or not all(isinstance(n, str) for n in names):
        raise invalid(name, value, "None or a non-empty list of layer names", kind="option")
    return names


def positive_number(name: str, value: Any) -> float:
    """``value`` if it is a finite number > 0."""
    check_positive(name, value, kind="option")
    return value


class Options:
    """Base of the frozen options dataclasses (see the module docstring)."""

    CHECKS: ClassVar[dict[str, Check]] = {}
    VERB: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = self.CHECKS[f.name](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, numbers, strings), ready for YAML or JSON; an option
        holding an object (a callable, a backend instance) is refused with its name."""
        return {name: self._plain(name, getattr(self, name)) for name in self.names()}

    @staticmethod
    def _plain(name: str, value: Any) -> Any:
        """``value`` as YAML can hold it (subclasses add their own object types)."""
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, Mapping):
            return dict(value)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise InvalidTypeError(
            f"The {name!r} option holds a {type(value).__name__} object, which a dict (YAML) "
            "cannot hold; give it by name to write the options out."
        )

    @classmethod
    def from_dict(cls: type[_O], data: Mapping[str, Any]) -> _O:
        """Options from a mapping (e.g. a YAML section); unknown keys are refused, listing the
        accepted ones."""
        if not isinstance(data, Mapping):
            raise invalid(f"{cls.VERB} options", data, "a mapping of option names to values")
        extra = sorted(set(data) - set(cls.names()))
        if extra:
            raise ValueError(
                f"Unknown {cls.VERB} option(s) {extra}; accepted options: {sorted(cls.names())}."
            )
        return cls(**data)

    def merged(
        self: _O, overrides: Mapping[str, Any], *, verb: str = "", also: Iterable[str] = ()
    ) -> _O:
        """These options with ``overrides`` applied (and checked); an unknown name raises
        ``TypeError`` naming it and listing what ``verb`` (default :attr:`VERB`) accepts
        (``also``: its own keywords)."""
        extra = sorted(set(overrides) - set(self.names()))
        if extra:
            accepted = sorted({*also, *self.names()})
            raise InvalidTypeError(
                f"{verb or self.VERB}() got unexpected keyword argument(s) {extra}; it accepts "
                f"{accepted} (the options are those of {type(self).__name__})."
            )
        return dataclasses.replace(self, **overrides) if overrides else self  # type: ignore[type-var]

    @classmethod
    def resolve(
        cls: type[_O],
        options: Any,
        overrides: Mapping[str, Any],
        *,
        verb: str = "",
        also: Iterable[str] = (),
    ) -> _O:
        """``options`` (default: all defaults) with the keyword ``overrides`` of ``verb``
        (default :attr:`VERB`)."""
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise InvalidTypeError(
                f"The 'options' argument of {verb or cls.VERB}() must be a {cls.__name__} or "
                f"None. Got {type(options).__name__} instead."
            )
        return options.merged(overrides, verb=verb, also=also)
