"""Shared wording for argument errors: name the argument, the value, what is accepted."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exception_line(exc: BaseException, limit: int = 300) -> str:
    r"""One line on why ``exc`` was raised: its type and the first non-blank line of its
    message, without terminal colour codes (``torch.onnx`` colours its messages).

    >>> exception_line(ValueError("\n  bad \x1b[96mshape\x1b[0m\nmore"))
    'ValueError: bad shape'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InvalidTypeError(TypeError):
    """A validated input of the wrong type or an unknown keyword: bad input, not a bug.

    The command line answers it (like a ``ValueError``) with one line and exit status 2; any
    other ``TypeError`` is a bug and shows its traceback.
    """


def wrong_type(argument: str, value: Any, accepted: str) -> InvalidTypeError:
    """An :class:`InvalidTypeError` in the project's template, naming the value's type.

    >>> str(wrong_type("model", 3, "a torch.nn.Module"))
    "The 'model' argument must be a torch.nn.Module. Got int instead."
    """
    return InvalidTypeError(
        f"The {argument!r} argument must be {accepted}. Got {type(value).__name__} instead."
    )


def check_module(value: Any, argument: str = "model") -> None:
    """Raise :class:`InvalidTypeError` unless ``value`` is a ``torch.nn.Module`` (and not
    ``torch.compile``'s wrapper of one: its compiled graph would not see the layers mpsearch
    replaces, and a "quantized" model would run the original weights; nor a TorchScript
    module, whose layers cannot be replaced).

    >>> import torch
    >>> check_module(torch.compile(torch.nn.Linear(2, 2)))
    Traceback (most recent call last):
    ...
    mpsearch._validation.InvalidTypeError: The 'model' argument must be a torch.nn.Module, not torch.compile's wrapper of one (pass model._orig_mod, the module it compiles: mpsearch replaces its layers, which the compiled graph would not see; compile the quantized model afterwards). Got OptimizedModule instead.
    """
    import torch
    from torch import nn

    if not isinstance(value, nn.Module):
        raise wrong_type(argument, value, "a torch.nn.Module")
    if type(value).__name__ == "OptimizedModule" and isinstance(
        getattr(value, "_orig_mod", None), nn.Module
    ):
        raise wrong_type(
            argument,
            value,
            "a torch.nn.Module, not torch.compile's wrapper of one (pass model._orig_mod, the "
            "module it compiles: mpsearch replaces its layers, which the compiled graph would "
            "not see; compile the quantized model afterwards)",
        )
    if isinstance(value, torch.jit.ScriptModule):
        raise wrong_type(
            argument,
            value,
            "a torch.nn.Module, not a TorchScript module (torch.jit.script, trace or load: "
            "compiled code whose layers cannot be replaced; pass the Python module it was made "
            "from, and script or trace the quantized model afterwards)",
        )


def invalid(argument: str, value: Any, accepted: str, *, kind: str = "argument") -> ValueError:
    """A ``ValueError`` in the project's one template (``kind``: "argument", "option"...).

    >>> str(invalid("latency_ms", -3, "a positive number"))
    "The 'latency_ms' argument must be a positive number. Got -3 instead."
    >>> str(invalid("n_trials", -3, "a positive integer", kind="option"))
    "The 'n_trials' option must be a positive integer. Got -3 instead."
    """
    return ValueError(f"The {argument!r} {kind} must be {accepted}. Got {_show(value)} instead.")


def unknown(
    argument: str, value: Any, choices: Iterable[str], *, kind: str = "argument"
) -> ValueError:
    """A ``ValueError`` for a name that is not one of ``choices``, listing them."""
    listed = ", ".join(repr(c) for c in sorted(choices))
    return ValueError(
        f"The {argument!r} {kind} must be one of {listed}. Got {_show(value)} instead."
    )


def check_positive(
    argument: str, value: Any, *, allow_none: bool = False, kind: str = "argument"
) -> None:
    """Raise unless ``value`` is a finite number > 0 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or value != value
    ):
        raise invalid(argument, value, "a positive number", kind=kind)
    if value == float("inf"):
        raise invalid(argument, value, "a finite positive number", kind=kind)


def check_fraction(
    argument: str, value: Any, *, open_low: bool = True, open_high: bool = True
) -> None:
    """Raise unless ``value`` is a number within (0, 1) (ends open or closed as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        low_ok = value > 0 if open_low else value >= 0
        high_ok = value < 1 if open_high else value <= 1
        ok = low_ok and high_ok
    if not ok:
        lo = "(0" if open_low else "[0"
        hi = "1)" if open_high else "1]"
        raise invalid(argument, value, f"a number in {lo}, {hi}")
