"""PrecisionPlan: layer name -> scheme, with exact-name and regex rules and a default.

A scheme that a rule gives many layers at once (the default, a regex) but one layer's shape
cannot take (``w4a8``'s groups of 32 on a convolution of fan-in 9) resolves, for that layer, to
the scheme's nearest variant that can (``w4a8_pc``); :meth:`PrecisionPlan.substitutions` says
which layers and why. A scheme named for one layer is never substituted (``quantize`` refuses
it if the layer's shape cannot take it).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mpsearch._validation import invalid, unknown
from mpsearch.layers import quantizable_layers, weight_shapes
from mpsearch.rounding._stats import rounding_unsupported
from mpsearch.schemes import SCHEMES, Scheme, get_scheme
from mpsearch.schemes._rounding import DEFAULT_ROUNDING, choice_name, split_choice
from mpsearch.schemes._scheme import nearest_variant

PLAN_FORMAT = "mpsearch.plan"
PLAN_VERSION = 1
REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class Substitution:
    """One layer that runs a variant of the scheme its rule gives: ``requested`` (the rule's
    scheme), ``used`` (the variant), ``reason`` (why ``requested`` cannot quantize the layer)."""

    requested: str
    used: str
    reason: str


class PrecisionPlan:
    """Which scheme each quantizable layer runs in.

    Keys of ``rules`` are exact layer names (as in ``model.named_modules()``) or regular
    expressions written ``"re:<pattern>"`` (matched with ``re.fullmatch``). Precedence: an
    exact name wins; otherwise the first regex, in insertion order, that matches; otherwise
    ``default``.

    >>> plan = PrecisionPlan({"conv1": "w8a8", "re:fc.*": "w4a16"}, default="bf16")
    >>> plan.scheme_for("fc2"), plan.scheme_for("conv1"), plan.scheme_for("conv2")
    ('w4a16', 'w8a8', 'bf16')
    >>> PrecisionPlan.from_json(plan.to_json()) == plan
    True
    >>> gptq = PrecisionPlan({"fc1": "w4a16+gptq"}, default="w8a8")
    >>> gptq.scheme_for("fc1"), gptq.rounding_for("fc1"), gptq.choice_for("fc1")
    ('w4a16', 'gptq', 'w4a16+gptq')
    """

    __slots__ = ("_compiled", "default", "metadata", "rules")

    def __init__(
        self,
        rules: Mapping[str, str] | None = None,
        *,
        default: str = "fp32",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        rules = dict(rules or {})
        if not isinstance(default, str):
            raise invalid("default", default, "a scheme name")
        get_scheme(default, argument="default")  # a choice: 'w4a16+gptq' too
        compiled: list[tuple[str, re.Pattern[str]]] = []
        for key, scheme in rules.items():
            if not isinstance(key, str) or not key:
                raise invalid("rules", key, "a layer name or 're:<regex>' string")
            if not isinstance(scheme, str):
                raise unknown(f"rules[{key}]", scheme, SCHEMES)
            get_scheme(scheme, argument=f"rules[{key}]")
            if key.startswith(REGEX_PREFIX):
                try:
                    compiled.append((key, re.compile(key[len(REGEX_PREFIX) :])))
                except re.error as exc:
                    raise invalid(
                        f"rules[{key!r}]", key, f"a valid regular expression ({exc})"
                    ) from None
        self.rules: dict[str, str] = rules
        self.default = default
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._compiled = compiled

    # -- lookup ---------------------------------------------------------------------------------
    def choice_for(self, layer: str) -> str:
        """The choice (scheme, with its rounding method if not ``rtn``) this plan gives ``layer``."""
        if layer in self.rules and not layer.startswith(REGEX_PREFIX):
            return self.rules[layer]
        for key, pattern in self._compiled:
            if pattern.fullmatch(layer):
                return self.rules[key]
        return self.default

    def scheme_for(self, layer: str) -> str:
        """The scheme name this plan gives ``layer`` (without its rounding method)."""
        return split_choice(self.choice_for(layer))[0]

    def rounding_for(self, layer: str) -> str:
        """The rounding method this plan gives ``layer`` (``rtn``: round to nearest)."""
        return split_choice(self.choice_for(layer))[1]

    @property
    def rounds(self) -> bool:
        """Whether any rule (or the default) asks for a calibrated rounding method."""
        choices = [self.default, *self.rules.values()]
        return any(split_choice(c)[1] != DEFAULT_ROUNDING for c in choices)

    def resolve(self, model: nn.Module | Iterable[str]) -> dict[str, str]:
        """``{layer name: scheme name}`` for every quantizable layer of ``model``.

        ``model`` may also be the list of layer names. An exact rule naming a layer the model
        lacks, or a regex that matches no layer, is refused with the list of valid names. Given
        the model itself, where the default or a regex gives a layer a scheme its weight shape
        cannot take, the scheme's nearest variant that can is used instead (see
        :meth:`substitutions`). A scheme an exact rule names, or one without such a variant, is
        kept as given: ``quantize`` (and the cost model, the export) refuse it, naming the layer.

        >>> from torch import nn
        >>> PrecisionPlan(default="w4a8").resolve(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Linear(8, 64)))
        {'0': 'w4a8_pc', '1': 'w4a8_pc'}
        """
        return {n: split_choice(c)[0] for n, c in self._resolve(model)[0].items()}

    def resolve_choices(self, model: nn.Module | Iterable[str]) -> dict[str, str]:
        """``{layer name: choice}`` for every quantizable layer of ``model``: :meth:`resolve`
        with each layer's rounding method (``"w4a16+gptq"``; a bare name for ``rtn``).

        >>> from torch import nn
        >>> PrecisionPlan(default="w4a8+gptq").resolve_choices(nn.Sequential(nn.Conv2d(1, 8, 3)))
        {'0': 'w4a8_pc+gptq'}
        """
        return self._resolve(model)[0]

    def substitutions(self, model: nn.Module) -> dict[str, Substitution]:
        """``{layer name: Substitution}`` for the layers of ``model`` that :meth:`resolve` gives
        a variant of their rule's scheme (empty when none).

        >>> from torch import nn
        >>> sub = PrecisionPlan(default="w4a16").substitutions(nn.Sequential(nn.Conv2d(1, 8, 3)))
        >>> sub["0"].requested, sub["0"].used
        ('w4a16', 'w4a16_pc')
        """
        return self._resolve(model)[1]

    def _resolve(
        self, model: nn.Module | Iterable[str]
    ) -> tuple[dict[str, str], dict[str, Substitution]]:
        modules = quantizable_layers(model) if isinstance(model, nn.Module) else {}
        names = list(modules) if isinstance(model, nn.Module) else list(model)
        known = set(names)
        for key, _pattern in self._compiled:
            if not any(_pattern.fullmatch(n) for n in names):
                raise ValueError(
                    f"The plan rule {key!r} matches no quantizable layer. Layers: {_listing(names)}."
                )
        for key in self.rules:
            if not key.startswith(REGEX_PREFIX) and key not in known:
                raise ValueError(
                    f"The plan names layer {key!r}, which the model does not have as a quantizable "
                    f"layer. Layers: {_listing(names)}."
                )
        assignment = {name: self.choice_for(name) for name in names}
        substituted: dict[str, Substitution] = {}
        for name, module in modules.items():
            requested = assignment[name]
            if name in self.rules:
                continue  # named for this layer: kept as given (quantize refuses a misfit)
            base, rounding = split_choice(requested)
            if rounding != DEFAULT_ROUNDING and (why := rounding_unsupported(module)):
                assignment[name] = requested = base  # e.g. an embedding under 'w8a8+gptq'
                substituted[name] = Substitution(choice_name(base, rounding), base, why)
            shapes = weight_shapes(module)  # an LSTM's: every gate matrix
            variant: Scheme | None = get_scheme(requested)
            for shape in shapes:
                variant = nearest_variant(variant, shape) if variant is not None else None
            if variant is not None and variant.name != requested:
                why = next(e for s in shapes if (e := get_scheme(requested).applicability_error(s)))
                assignment[name] = variant.name
                first = substituted[name].requested if name in substituted else requested
                substituted[name] = Substitution(first, variant.name, why)
        return assignment, substituted

    @classmethod
    def uniform(cls, scheme: str, **kwargs: Any) -> PrecisionPlan:
        """Every layer in ``scheme``."""
        return cls({}, default=scheme, **kwargs)

    @classmethod
    def from_assignment(
        cls, assignment: Mapping[str, str], *, default: str = "fp32", **kwargs: Any
    ) -> PrecisionPlan:
        """A plan of exact names only (as the search produces)."""
        return cls(dict(assignment), default=default, **kwargs)

    # -- comparison -----------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrecisionPlan):
            return NotImplemented
        return (
            list(self.rules.items()) == list(other.rules.items())
            and self.default == other.default
            and self.metadata == other.metadata
        )

    def __hash__(self) -> int:
        return hash((tuple(self.rules.items()), self.default))

    def __repr__(self) -> str:
        return f"PrecisionPlan({self.rules!r}, default={self.default!r})"

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "default": self.default,
            "rules": dict(self.rules),
            "schemes": {
                name: SCHEMES[name].to_dict()
                for name in sorted(
                    {split_choice(c)[0] for c in (self.default, *self.rules.values())}
                )
            },
            "metadata": self.metadata,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f'Not an mpsearch plan: expected a JSON object with "format": {PLAN_FORMAT!r}.'
            )
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(
                f"Unsupported plan version {version!r}: this mpsearch reads version {PLAN_VERSION}. "
                "Re-export the plan with a matching mpsearch."
            )
        for name, definition in (data.get("schemes") or {}).items():
            if name in SCHEMES and SCHEMES[name].to_dict() != definition:
                raise ValueError(
                    f"The plan's scheme {name!r} differs from the registered scheme of that name; "
                    "register the plan's definition under another name or use the matching mpsearch."
                )
        return cls(
            data.get("rules", {}),
            default=data.get("default", "fp32"),
            metadata=data.get("metadata"),
        )

    @classmethod
    def from_json(cls, text: str) -> PrecisionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"A plan must be JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            fh.write(self.to_json())
            tmp = fh.name
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrecisionPlan:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"Cannot read plan file {str(path)!r}: {exc.strerror}.") from None
        return cls.from_json(text)


def _listing(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
