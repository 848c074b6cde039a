"""Search spaces: which schemes each layer may take, pinned layers, precision floors, tied
groups (YAML); resolved against the schemes actually profiled and measured."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from mpsearch._validation import invalid
from mpsearch.backends._quantize import applicability_error, tied_followers
from mpsearch.layers import quantizable_layers
from mpsearch.layers._layers import STAYS_FP32
from mpsearch.schemes import SCHEMES, get_scheme
from mpsearch.schemes._rounding import split_choice

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
_SELECTORS = ("type", "regex", "name")


class SpaceError(ValueError):
    """A search space that does not fit the model or names unknown schemes."""


@dataclass
class ResolvedSpace:
    """A space applied to one model: the choices of each searched parameter.

    ``params`` maps a parameter name (a layer name, or ``group:<first layer>`` for tied
    layers) to its layers; ``choices`` maps it to its schemes, in the space's order.
    ``pinned`` holds the layers fixed to one scheme; ``dropped`` says which scheme was removed
    from which layer and why (not profiled or not measured, or the layer's shape or the
    backend cannot take it). ``followers`` maps a layer the model never calls to the called
    layer of the same kind holding its weight (T5's ``shared`` embedding and its encoder's
    copy): it takes that layer's scheme (without a rounding method: its output is never used),
    so that no full-precision copy of the weight stays behind (``quantize`` holds the tensors
    tied layers store alike once).
    """

    layers: list[str]
    params: dict[str, list[str]]
    choices: dict[str, list[str]]
    pinned: dict[str, str]
    dropped: dict[str, dict[str, str]] = field(default_factory=dict)
    followers: dict[str, str] = field(default_factory=dict)

    def assignment(self, params: Mapping[str, str]) -> dict[str, str]:
        """``{layer: scheme}`` for every layer from one value per parameter."""
        out = dict(self.pinned)
        for param, layers in self.params.items():
            for layer in layers:
                out[layer] = params[param]
        out = self.followed(out)
        return {name: out[name] for name in self.layers}

    def followed(self, plan: Mapping[str, str]) -> dict[str, str]:
        """``plan`` (``{layer: scheme}``) with each follower given its leader's scheme."""
        out = dict(plan)
        for follower, leader in self.followers.items():
            out[follower] = split_choice(out[leader])[0]
        return out

    def params_of(self, assignment: Mapping[str, str]) -> dict[str, str]:
        """The parameter values of an assignment (the inverse of :meth:`assignment`)."""
        return {param: assignment[layers[0]] for param, layers in self.params.items()}

    def layer_choices(self, layer: str) -> list[str]:
        if layer in self.followers:
            leader = self.layer_choices(self.followers[layer])
            return list(dict.fromkeys(split_choice(c)[0] for c in leader))
        if layer in self.pinned:
            return [self.pinned[layer]]
        for param, layers in self.params.items():
            if layer in layers:
                return self.choices[param]
        raise KeyError(layer)

    def contains(self, assignment: Mapping[str, str]) -> bool:
        return all(assignment.get(layer) in self.layer_choices(layer) for layer in self.layers)

    @property
    def size(self) -> int:
        n = 1
        for c in self.choices.values():
            n *= len(c)
        return n


@dataclass
class SearchSpace:
    """Which schemes each layer may take.

    ``schemes`` is the default list; ``rules`` (applied in order, later ones win) set the list
    for layers selected by ``type`` (class name), ``regex`` (full match on the name) or
    ``name``; ``pin`` fixes layers to one named scheme (``first``/``last`` name the first/last
    quantizable layer); ``min_bits`` sets a precision floor instead: the layer keeps only its
    choices with at least that many weight bits, ``fp32`` always included, so the fastest
    such scheme measured on this machine can win (the bundled spaces keep the first and/or
    last layer at ``>= 8`` bits this way, never at a fixed dtype); a pinned layer keeps its
    pin. ``groups`` ties layers (a list of names/``re:`` patterns per group) to one choice.

    >>> space = SearchSpace(schemes=["bf16", "w8a8"], pin={"first": "bf16"})
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> space.resolve(net).choices
    {'2': ['bf16', 'w8a8']}
    >>> floor = SearchSpace(schemes=["fp32", "bf16", "w8a8", "w4a16"], min_bits={"last": 8})
    >>> wide = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> floor.resolve(wide, measured=["fp32", "w8a8", "w4a16"]).choices
    {'0': ['fp32', 'w8a8', 'w4a16'], '2': ['fp32', 'w8a8']}
    """

    schemes: list[str]
    rules: list[dict[str, Any]] = field(default_factory=list)
    pin: dict[str, str] = field(default_factory=dict)
    min_bits: dict[str, int] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    name: str = "custom"
    source: str = "<space>"

    def __post_init__(self) -> None:
        self._check_schemes("schemes", self.schemes)
        for i, rule in enumerate(self.rules):
            where = f"rules[{i}]"
            if not isinstance(rule, Mapping):
                raise SpaceError(f"{self.source}: {where} must be a mapping. Got {rule!r} instead.")
            selectors = [k for k in _SELECTORS if k in rule]
            unknown_keys = set(rule) - {*_SELECTORS, "schemes", "optional"}
            if len(selectors) != 1 or unknown_keys or "schemes" not in rule:
                raise SpaceError(
                    f"{self.source}: {where} must have exactly one of 'type', 'regex', 'name', a "
                    f"'schemes' list and optionally 'optional: true'. Got {dict(rule)!r} instead."
                )
            if not isinstance(rule.get("optional", False), bool):
                raise SpaceError(
                    f"{self.source}: {where}.optional must be true or false (true: the rule may "
                    f"match no layer). Got {rule['optional']!r} instead."
                )
            self._check_schemes(f"{where}.schemes", rule["schemes"])
        for key, scheme in self.pin.items():
            self._check_schemes(f"pin.{key}", [scheme])
        for key, bits in self.min_bits.items():
            if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
                raise SpaceError(
                    f"{self.source}: min_bits.{key} must be a positive number of weight bits "
                    f"(e.g. 8). Got {bits!r} instead."
                )

    def _check_schemes(self, where: str, schemes: Any) -> None:
        if not isinstance(schemes, Sequence) or isinstance(schemes, str) or not schemes:
            raise SpaceError(
                f"{self.source}: {where} must be a non-empty list of scheme names. Got {schemes!r} instead."
            )
        for s in schemes:
            try:
                get_scheme(s)  # a choice with a rounding method ('w4a16+gptq') too
            except (ValueError, TypeError) as exc:
                raise SpaceError(
                    f"{self.source}: {where} names unknown scheme {s!r}. Known schemes: "
                    + ", ".join(sorted(SCHEMES))
                    + f" (optionally '+<rounding>'). {exc}"
                ) from None

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<space>") -> SearchSpace:
        if not isinstance(data, Mapping):
            raise SpaceError(
                f"{source}: a search space must be a mapping. Got {type(data).__name__} instead."
            )
        allowed = {"name", "description", "schemes", "rules", "pin", "min_bits", "groups"}
        extra = set(data) - allowed
        if extra:
            raise SpaceError(
                f"{source}: unknown key(s) {sorted(extra)}; accepted keys: {sorted(allowed)}."
            )
        if "schemes" not in data:
            raise SpaceError(f"{source}: the key 'schemes' (default list of schemes) is missing.")
        groups = [[g] if isinstance(g, str) else list(g) for g in data.get("groups") or []]
        return cls(
            schemes=list(data["schemes"]),
            rules=list(data.get("rules") or []),
            pin=dict(data.get("pin") or {}),
            min_bits=dict(data.get("min_bits") or {}),
            groups=groups,
            name=str(data.get("name", Path(source).stem)),
            source=source,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Load a space from a YAML file (errors name the file, the key and the layer)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SpaceError(
                f"Cannot read search space file {str(path)!r}: {exc.strerror}."
            ) from None
        except yaml.YAMLError as exc:
            raise SpaceError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schemes": list(self.schemes),
            "rules": self.rules,
            "pin": self.pin,
            "min_bits": self.min_bits,
            "groups": self.groups,
        }

    # -- applying to a model ----------------------------------------------------------------------
    def resolve(
        self,
        model: nn.Module,
        *,
        supported: Callable[[str, str], bool] | None = None,
        measured: Collection[str] | None = None,
        profiled: Collection[str] | None = None,
        skipped: Mapping[tuple[str, str], str] | None = None,
    ) -> ResolvedSpace:
        """Apply the space to ``model``.

        ``measured`` and ``profiled`` (``None``: no limit) are the schemes the cost model and
        the profile have figures for: other choices are removed, and a layer pinned to one of
        them is refused, naming what was measured. A profiled choice with a calibrated rounding
        (``"w4a16+gptq"``) is offered wherever the space offers its scheme (right after it);
        its cost is its scheme's. ``supported(layer, scheme) -> bool`` (e.g.
        ``CostModel.supported``) removes measured choices the backend cannot run. Schemes the
        layer's shape cannot take are removed too, and so are the ``skipped`` (layer, scheme)
        pairs the profile could not measure (with its reason, e.g. a layer never called).
        """
        modules = quantizable_layers(model)
        names = list(modules)
        choices = {n: list(self.schemes) for n in names}
        for i, rule in enumerate(self.rules):
            for n in self._rule_hits(i, rule, modules):
                choices[n] = list(rule["schemes"])
        if profiled is not None:
            choices = {n: _with_roundings(c, profiled) for n, c in choices.items()}
        pinned = self._pinned(modules)
        for n, bits in self._floors(modules, pinned).items():
            kept = [s for s in choices[n] if get_scheme(s).weight_bits >= bits]
            choices[n] = kept if "fp32" in kept else ["fp32", *kept]
        missing = _missing_figures(measured, profiled)
        asked = set(pinned)
        dropped = _drop_unusable(
            self.source, modules, choices, pinned, supported, missing, skipped or {}
        )
        followers = tied_followers(modules, set(pinned) - asked)
        for follower in followers:
            del pinned[follower]
        params = self._tie_groups(modules, choices, {**pinned, **followers})
        grouped = {m for members in params.values() for m in members}
        for n in names:
            if n not in pinned and n not in grouped and n not in followers:
                params[n] = [n]
        ordered = dict(sorted(params.items(), key=lambda kv: names.index(kv[1][0])))
        return ResolvedSpace(
            layers=names,
            params=ordered,
            choices={p: list(choices[ls[0]]) for p, ls in ordered.items()},
            pinned=pinned,
            dropped=dropped,
            followers=followers,
        )

    def _rule_hits(
        self, i: int, rule: Mapping[str, Any], modules: dict[str, nn.Module]
    ) -> list[str]:
        """The layers ``rules[i]`` selects (by type, regex or name); a rule matching none is
        refused (a typo would otherwise go unnoticed) unless it says ``optional: true``, as the
        bundled spaces' rules do: they fit models they were not written for (a convolutional
        network without a Linear layer)."""
        names = list(modules)
        where = f"{self.source}: rules[{i}]"
        if "type" in rule:
            hit = [n for n in names if type(modules[n]).__name__ == rule["type"]]
            if not hit and not rule.get("optional", False):
                kinds = sorted({type(m).__name__ for m in modules.values()})
                raise SpaceError(
                    f"{where}.type {rule['type']!r} matches no layer; layer types: {kinds}."
                )
            return hit
        if "regex" in rule:
            try:
                pattern = re.compile(rule["regex"])
            except re.error as exc:
                raise SpaceError(
                    f"{where}.regex is not a valid regular expression: {exc}."
                ) from None
            hit = [n for n in names if pattern.fullmatch(n)]
            if not hit and not rule.get("optional", False):
                raise SpaceError(
                    f"{where}.regex {rule['regex']!r} matches no layer. Layers: {_listing(names)}."
                )
            return hit
        if rule["name"] not in modules:
            if rule.get("optional", False):
                return []
            raise SpaceError(
                f"{where}.name: layer {rule['name']!r} is not a quantizable layer of the model. "
                f"Layers: {_listing(names)}."
            )
        return [rule["name"]]

    def _layer(self, where: str, key: str, names: list[str]) -> str:
        """The layer ``key`` names (``first``/``last``: the first/last quantizable layer)."""
        layer = {"first": names[0], "last": names[-1]}.get(key, key)
        if layer not in names:
            raise SpaceError(
                f"{self.source}: {where}.{key}: layer {key!r} is not a quantizable layer of the "
                f"model. Layers: {_listing(names)}."
            )
        return layer

    def _pinned(self, modules: dict[str, nn.Module]) -> dict[str, str]:
        """``{layer: scheme}`` of the pinned layers."""
        names = list(modules)
        return {self._layer("pin", key, names): scheme for key, scheme in self.pin.items()}

    def _floors(self, modules: dict[str, nn.Module], pinned: dict[str, str]) -> dict[str, int]:
        """``{layer: minimum weight bits}`` of the floored layers that are not pinned."""
        names = list(modules)
        floors = {self._layer("min_bits", key, names): bits for key, bits in self.min_bits.items()}
        return {n: bits for n, bits in floors.items() if n not in pinned}

    def _tie_groups(
        self,
        modules: dict[str, nn.Module],
        choices: dict[str, list[str]],
        fixed: Collection[str],
    ) -> dict[str, list[str]]:
        """``{"group:<first layer>": members}`` per group, less the ``fixed`` layers (pinned or
        following another); members' choices narrowed to the common ones."""
        names = list(modules)
        params: dict[str, list[str]] = {}
        grouped: set[str] = set()
        for gi, group in enumerate(self.groups):
            where = f"{self.source}: groups[{gi}]"
            members: list[str] = []
            for entry in group:
                if entry.startswith("re:"):
                    members += [n for n in names if re.fullmatch(entry[3:], n)]
                elif entry in modules:
                    members.append(entry)
                else:
                    raise SpaceError(
                        f"{where}: layer {entry!r} is not a quantizable layer of the model. "
                        f"Layers: {_listing(names)}."
                    )
            members = [m for m in dict.fromkeys(members) if m not in fixed]
            if not members:
                raise SpaceError(f"{where} matches no searchable layer.")
            overlap = grouped.intersection(members)
            if overlap:
                raise SpaceError(
                    f"{where}: layer(s) {sorted(overlap)} already belong to another group."
                )
            grouped.update(members)
            common = [s for s in choices[members[0]] if all(s in choices[m] for m in members)]
            if not common:
                raise SpaceError(f"{where}: the tied layers share no scheme.")
            for m in members:
                choices[m] = common
            params[f"group:{members[0]}"] = members
        return params


def _listing(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")


def _missing_figures(
    measured: Collection[str] | None, profiled: Collection[str] | None
) -> Callable[[str], str | None]:
    """``why(scheme)``: why the search has no figures for ``scheme`` (``None``: it has them)."""

    sources = ((profiled, "the profile was computed"), (measured, "the cost model was measured"))

    def why(choice: str) -> str | None:
        reasons = [
            f"{what} for {', '.join(schemes)} only"
            for schemes, what in sources
            if schemes is not None
            and (choice if schemes is profiled else split_choice(choice)[0]) not in schemes
        ]
        return " and ".join(reasons) or None

    return why


def _with_roundings(choices: list[str], profiled: Collection[str]) -> list[str]:
    """``choices`` with, after each scheme, the profiled choices that round it otherwise.

    >>> _with_roundings(["bf16", "w4a16"], ["bf16", "w4a16", "w4a16+gptq", "w2a16+gptq"])
    ['bf16', 'w4a16', 'w4a16+gptq']
    """
    out: list[str] = []
    for c in choices:
        out.append(c)
        out += [
            p
            for p in profiled
            if p != c
            and split_choice(p)[0] == c
            and split_choice(c)[1] == "rtn"
            and p not in choices
        ]
    return list(dict.fromkeys(out))


def _never_called(name: str, skipped: Mapping[tuple[str, str], str]) -> bool:
    """Whether the profile skipped layer ``name`` as never called or read directly."""
    return any(n == name and why in STAYS_FP32 for (n, _), why in skipped.items())


def _drop_unusable(
    source: str,
    modules: dict[str, nn.Module],
    choices: dict[str, list[str]],
    pinned: dict[str, str],
    supported: Callable[[str, str], bool] | None,
    missing: Callable[[str], str | None],
    skipped: Mapping[tuple[str, str], str],
) -> dict[str, dict[str, str]]:
    """Remove (in place) the schemes the search has no figures for, or that the layer's shape
    or the backend cannot take; return why.

    A layer left with no scheme (a pinned one included) is refused, naming the cause, unless
    the profile found it never called or read directly: it is pinned to ``fp32`` (the model runs it as it is).
    """
    dropped: dict[str, dict[str, str]] = {}
    for n, module in modules.items():
        keep = []
        for s in [pinned[n]] if n in pinned else choices[n]:
            why = missing(s) or applicability_error(module, get_scheme(s))
            if why is None and (n, s) in skipped:
                why = f"the profile skipped it ({skipped[(n, s)]})"
            if why is None and supported is not None and not supported(n, s):
                why = "the backend has no kernel for it"
            if why:
                dropped.setdefault(n, {})[s] = why
            else:
                keep.append(s)
        if n in pinned and not keep:
            s = pinned[n]
            fix = (
                f"profile and measure {s!r} too, or pin the layer to one of those"
                if missing(s)
                else "pin it to another scheme"
            )
            raise SpaceError(
                f"{source}: the space pins layer {n!r} to {s!r}, but {dropped[n][s]}: {fix} "
                f"(or give it a precision floor instead, e.g. 'min_bits: {{{n}: 8}}', resolved "
                "against what was measured)."
            )
        if not keep and n not in pinned and _never_called(n, skipped):
            pinned[n] = "fp32"
            continue
        if not keep:
            reasons = "; ".join(f"{s}: {w}" for s, w in dropped[n].items())
            raise SpaceError(f"{source}: layer {n!r} has no usable scheme left ({reasons}).")
        if n not in pinned:
            choices[n] = keep
    return dropped


def model_family(model: nn.Module) -> str:
    """``transformer`` (attention, embeddings or layer norms), ``cnn`` (convolutions) or ``mlp``."""
    modules = list(model.modules())
    if any(isinstance(m, _TRANSFORMER_PARTS) for m in modules):
        return "transformer"
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in modules):
        return "cnn"
    return "mlp"


_TRANSFORMER_PARTS = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention)
"""Module kinds (subclasses included, e.g. timm's LayerNorm) that make a model a transformer."""


def load_space(
    space: SearchSpace | str | Path | Mapping[str, Any] | None, model: nn.Module
) -> SearchSpace:
    """A space from a ``SearchSpace``, a YAML path, a bundled name (``cnn``...), a dict or ``None``.

    ``None`` picks the bundled default space of the model's family (:func:`model_family`).
    """
    if isinstance(space, SearchSpace):
        return space
    if space is None:
        space = model_family(model)
    if isinstance(space, Mapping):
        return SearchSpace.from_dict(space)
    if isinstance(space, (str, Path)):
        path = Path(space)
        if path.suffix in (".yaml", ".yml") or path.exists():
            return SearchSpace.from_yaml(path)
        bundled = SPACES_DIR / f"{space}.yaml"
        if bundled.exists():
            return SearchSpace.from_yaml(bundled)
        names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise invalid("space", space, f"a YAML path or one of the bundled spaces {names}")
    raise invalid(
        "space", space, "a SearchSpace, a YAML path, a bundled space name, a dict or None"
    )
