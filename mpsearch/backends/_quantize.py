"""``quantize(model, plan, backend)``: a new model that runs each layer in its planned scheme."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mpsearch._data import as_batches, run_model
from mpsearch._validation import check_module, invalid, unknown
from mpsearch.backends._registry import Backend, get_backend
from mpsearch.layers import layer_weights, quantizable_layers, replace_layers, weight_shapes
from mpsearch.layers._expert_linears import follows_expert_interface, recording
from mpsearch.layers._experts import is_expert_bank
from mpsearch.layers._layers import (
    NEVER_CALLED,
    READ_BESIDES_CALLS,
    TENSOR_METADATA,
    carry_hooks,
    eval_mode,
    same_weights,
    swapped,
    watched,
)
from mpsearch.plan import PrecisionPlan
from mpsearch.rounding import Rounder
from mpsearch.rounding._rounder import rounded_layers
from mpsearch.schemes import SCHEMES, Observer, Scheme, get_scheme
from mpsearch.schemes._formats import FORMATS
from mpsearch.schemes._observers import make_observer
from mpsearch.schemes._rounding import choice_name, split_choice

PlanLike = PrecisionPlan | Mapping[str, str] | str


def as_plan(plan: PlanLike, *, argument: str = "plan") -> PrecisionPlan:
    """A ``PrecisionPlan`` from a plan, a ``{layer: scheme}`` mapping or one scheme name."""
    if isinstance(plan, PrecisionPlan):
        return plan
    if isinstance(plan, str):
        return PrecisionPlan.uniform(plan)
    if isinstance(plan, Mapping):
        return PrecisionPlan(dict(plan))
    raise invalid(argument, plan, "a PrecisionPlan, a {layer: scheme} mapping or a scheme name")


def applicability_error(layer: nn.Module, scheme: Scheme) -> str | None:
    """Why ``scheme`` cannot quantize ``layer``'s weights (every gate matrix of an LSTM), or
    ``None`` when it can (:meth:`Scheme.applicability_error` on each of them)."""
    for name, shape in zip(layer_weights(layer), weight_shapes(layer), strict=True):
        why = scheme.applicability_error(shape)
        if why:
            return why if name == "weight" else f"{name}: {why}"
    return None


def _with_plan_kernels(impl: Backend, plan: PrecisionPlan) -> Backend:
    """``impl`` building the kernels a search's cost model chose for ``plan`` by measurement
    (``plan.metadata["kernels"]``) where ``impl`` is that backend without choices of its own;
    a kernel this machine lacks falls back to the default."""
    recorded = plan.metadata.get("kernels")
    if (
        not isinstance(recorded, Mapping)
        or recorded.get("backend") != impl.name
        or not hasattr(impl, "tuned")
        or getattr(impl, "choices", None)
    ):
        return impl
    return impl.tuned(dict(recorded.get("choices") or {}))


def takes_act_range(layer: nn.Module) -> bool:
    """Whether ``layer``'s quantized form takes a static activation range: not an embedding
    (token ids), an LSTM / GRU or its cell (the dynamic RNN kernel quantizes each step's state) nor a
    Mixture-of-Experts bank outside Hugging Face's expert interface (weight-only). An interface
    bank takes one per expert Linear layer, observed on the tokens routed to that expert."""
    if is_expert_bank(layer):
        return follows_expert_interface(layer)
    return not isinstance(layer, (nn.Embedding, nn.RNNBase, nn.RNNCellBase))


def range_of(
    ranges: Mapping[str, tuple[float, float]], name: str, layer: nn.Module
) -> tuple[float, float] | dict[str, tuple[float, float]] | None:
    """Layer ``name``'s static activation range; a bank's: its expert Linear layers' (``{"up.0":
    (lo, hi)...}``), from ranges keyed by their names in the quantized model (``<name>.up.0``)."""
    if not is_expert_bank(layer):
        return ranges.get(name)
    prefix = f"{name}."
    found = {k[len(prefix) :]: v for k, v in ranges.items() if k.startswith(prefix)}
    return found or None


def runnable_plan(
    model: nn.Module, plan: PrecisionPlan, backend: Backend, *, warn: bool = False
) -> PrecisionPlan:
    """``plan``, where the scheme its default or a regex rule gives a layer has no kernel on
    ``backend`` for that layer, with that layer named in the nearest scheme the backend runs
    it in without losing precision (:func:`runnable_variant`: ``w8a8`` -> ``w8a16`` on a
    transposed convolution, which has no int8 x int8 kernel on ``cpu``): a uniform plan runs
    on a model whose layers the backend runs in part in the plan's scheme. ``plan`` itself
    where nothing changes; a scheme named for one layer, or one the backend runs on none of
    the model's layers (``fp8`` on ``cpu``), is kept (``quantize`` refuses it, naming what the
    backend runs). ``warn``: a warning names the layers that take another scheme.

    >>> net = nn.Sequential(nn.ConvTranspose1d(4, 4, 2), nn.Flatten(), nn.Linear(20, 2))
    >>> runnable_plan(net, PrecisionPlan(default="w8a8"), get_backend("cpu")).rules
    {'0': 'w8a16'}
    """
    if not backend.real:
        return plan
    layers = quantizable_layers(model)
    choices = plan.resolve_choices(model)

    def runs(name: str) -> bool:
        return not backend.unsupported_reason(layers[name], get_scheme(choices[name]))

    missing = [n for n in choices if n not in plan.rules and not runs(n)]
    if not missing:  # a search's plans name every layer: nothing to look up further
        return plan
    # a scheme the backend runs on none of the model's layers (fp8 on cpu) is not substituted
    somewhere = {c for n, c in choices.items() if n not in missing and runs(n)}
    changed = {}
    for name in missing:
        choice = choices[name]
        if choice not in somewhere:
            continue
        base, rounding = split_choice(choice)
        variant = runnable_variant(layers[name], get_scheme(base), backend)
        if variant is not None:
            changed[name] = choice_name(variant.name, rounding)
    if not changed:
        return plan
    if warn:
        moved = [f"{n} ({choices[n]} -> {c})" for n, c in changed.items()]
        shown = ", ".join(moved[:5]) + (", ..." if len(moved) > 5 else "")
        warnings.warn(
            f"{len(moved)} layer(s) take the nearest scheme the {backend.name!r} backend runs "
            f"them in, having no kernel of the plan's for them: {shown}",
            stacklevel=3,
        )
    return PrecisionPlan({**plan.rules, **changed}, default=plan.default, metadata=plan.metadata)


def runnable_variant(layer: nn.Module, scheme: Scheme, backend: Backend) -> Scheme | None:
    """The registered scheme ``backend`` runs ``layer`` in whose weight and activation formats
    are each at least as wide as ``scheme``'s, the narrowest first (weight bits, then
    activation bits, then ``scheme``'s weight granularity); ``None`` where there is none."""
    wanted = _widths(scheme)
    shapes = weight_shapes(layer)
    found = [
        s
        for s in SCHEMES.values()
        if all(w >= v for w, v in zip(_widths(s), wanted, strict=True))
        and not any(s.applicability_error(shape) for shape in shapes)
        and not backend.unsupported_reason(layer, s)
    ]
    granularity = scheme.weight.granularity
    return min(
        found,
        key=lambda s: (*_widths(s), s.weight.granularity != granularity, s.name),
        default=None,
    )


def _widths(scheme: Scheme) -> tuple[int, int]:
    """Bits of ``scheme``'s weight format and of its activations (its compute dtype where
    they are only cast)."""
    act = scheme.activation
    act_format = act.format if act is not None and not act.is_identity else scheme.compute_dtype
    return FORMATS[scheme.weight.format].bits, FORMATS[act_format].bits


def check_assignment(model: nn.Module, assignment: Mapping[str, str], backend: Backend) -> None:
    """Refuse, before any work, every (layer, scheme) the backend or the layer shape cannot take."""
    reason = backend.unavailable_reason()
    if reason:
        raise ValueError(f"The {backend.name!r} backend cannot run here: {reason}")
    layers = quantizable_layers(model)
    problems = []
    for name, scheme_name in assignment.items():
        scheme = get_scheme(scheme_name)
        layer = layers[name]
        why = applicability_error(layer, scheme) or backend.unsupported_reason(layer, scheme)
        if why:
            problems.append(f"  {name} ({type(layer).__name__}) in {scheme_name!r}: {why}")
    if problems:
        hint = "Change those layers' schemes"
        if backend.real:
            hint += ", or use backend='simulate' for quality-only runs"
        raise ValueError(
            f"The plan cannot run on the {backend.name!r} backend:\n"
            + "\n".join(problems)
            + f"\n{hint}."
        )


def collect_activation_ranges(
    model: nn.Module,
    calib: Iterable[Any],
    layers: Iterable[str],
    *,
    observer: str | Observer = "minmax",
) -> dict[str, tuple[float, float]]:
    """Run ``calib`` through ``model`` (full precision) and observe each layer's input range (a
    layer no batch reaches has none, and measures its range on each call); a
    Mixture-of-Experts bank's: each of its expert Linear layers' (``<bank>.up.<e>``,
    ``<bank>.down.<e>``, their names in the quantized model), on the tokens routed to it (an
    expert no token reached has none either)."""
    batches = as_batches(calib, argument="calib")
    known = quantizable_layers(model)
    observers = {name: make_observer(observer) for name in layers}
    for name in observers:
        if name not in known:
            raise unknown("layers", name, list(known))
    banks = {n: known[n] for n in observers if is_expert_bank(known[n])}
    if isinstance(observer, Observer) and (len(observers) > 1 or banks):
        raise invalid(
            "observer",
            observer,
            "an observer name or factory when several layers are observed (a Mixture-of-Experts "
            "bank: one range per expert Linear layer)",
        )
    experts: dict[str, Observer] = {}  # "<bank>.up.<e>": the tokens routed to expert e

    def record(bank: str) -> Callable[[str, Tensor], None]:
        def update(part: str, x: Tensor) -> None:
            key = f"{bank}.{part}"
            if key not in experts:
                experts[key] = make_observer(observer)
            experts[key].update(x)

        return update

    recorders = {n: recording(m, record(n)) for n, m in banks.items()}
    watch = {n: obs.update for n, obs in observers.items() if n not in banks}
    with torch.inference_mode(), watched(model, watch), swapped(model, recorders):
        for batch in batches:
            run_model(model, batch)
    # a layer no batch reaches (an expert no token was routed to) keeps per-call ranges
    ranges = {n: obs.range() for n, obs in observers.items() if n not in banks and obs.count}
    return {**ranges, **{key: obs.range() for key, obs in sorted(experts.items())}}


def quantize(
    model: nn.Module,
    plan: PlanLike,
    *,
    backend: str | Backend = "simulate",
    calib: Iterable[Any] | None = None,
    observer: str | Observer = "minmax",
    act_ranges: Mapping[str, tuple[float, float]] | None = None,
    rounder: Rounder | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A model whose layers run in the plan's schemes on ``backend``; ``model`` is left untouched.

    Activation quantization is dynamic (ranges from each input at run time) unless ``calib``
    batches are passed: then static per-tensor ranges come from ``observer`` (``minmax``,
    ``percentile`` or ``mse``) on the full-precision model. ``act_ranges`` gives such ranges
    directly (``{layer: (lo, hi)}``, e.g. observed once and reused); the other layers stay
    dynamic.

    Layers whose choice has a calibrated rounding method (``"w4a16+gptq"``) get their weights
    rounded from calibration data first: by ``rounder`` (a :class:`~mpsearch.rounding.Rounder`
    of ``model``, which also applies its bias correction; reused across calls) or, without
    one, from ``calib`` (a model that ``Rounder.apply`` rounded is not rounded again). The
    rounded weights run on the scheme's own kernels.

    A plan from a search carries the kernels its cost model chose by measurement
    (``plan.metadata["kernels"]``: fbgemm or oneDNN int8 Linear...): quantized on that backend
    by name (``backend="cpu"``) it gets them (a kernel this machine lacks: the default); a
    backend object with choices of its own (``cost.backend``) keeps those.

    With ``calib`` (or a ``rounder``: its batches), layers whose weights the first batch reads
    directly (never calling them, as Mamba's ``conv1d``, or besides calling them, as an
    output projection through ``F.linear(h, embed.weight)``) stay fp32, with a warning; the
    search keeps them fp32 too. Without either they are replaced, and the model computes
    with such a layer's stand-in weight: NaN (``mpsearch.layers._layers.stand_in``), which
    int8 layers downstream turn into wrong finite values. Pass ``calib`` for models that read
    weights.

    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    >>> qnet = quantize(net, PrecisionPlan({"0": "w8a8"}, default="bf16"))
    >>> qnet(torch.randn(2, 64)).shape
    torch.Size([2, 10])
    """
    check_module(model)
    plan = as_plan(plan)
    impl = _with_plan_kernels(get_backend(backend), plan)
    plan = runnable_plan(model, plan, impl, warn=True)
    choices = plan.resolve_choices(model)
    assignment = plan.resolve(model)
    check_assignment(model, assignment, impl)
    _check_calibration(impl, calib, act_ranges)
    if calib is not None:
        calib = as_batches(calib, argument="calib")  # read once: an iterator is used again below
    data = calib if calib is not None else (rounder.batches if rounder is not None else None)
    changed = [n for n, s in assignment.items() if s != "fp32"]
    # a rounder's batches show it as well as calib; without either, the model's own example
    read = (
        read_directly(model, data, changed) if data is not None else _read_directly(model, changed)
    )
    for name in read:
        assignment[name] = "fp32"
        choices[name] = "fp32"
    done = rounded_layers(model)  # rounded by a Rounder already: not again
    choices = {n: c for n, c in choices.items() if done.get(n) != c}
    rounder = _rounder_for(model, choices, calib, rounder)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    if rounder is not None:  # layers a graph's rounder never saw are rounded to nearest
        rounder.apply(
            target, {n: c for n, c in choices.items() if n in rounder.layers}, inplace=True
        )
    to_change = {n: s for n, s in assignment.items() if s != "fp32" or impl.real}
    layers = quantizable_layers(target)
    if calib is not None and not impl.needs_calib:
        ranges = _observed_ranges(target, layers, to_change, calib, observer)
    else:
        ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in (act_ranges or {}).items()}
    replacements = {
        name: impl.quantize_layer(
            layers[name], get_scheme(scheme), act_range=range_of(ranges, name, layers[name])
        )
        for name, scheme in to_change.items()
    }
    if impl.real:
        share_tied_tensors(layers, replacements)
    _install(target, layers, replacements)
    if impl.needs_calib:
        result = impl.finalize(target, assignment, calib=calib)  # type: ignore[call-arg]
    else:
        result = impl.finalize(target, assignment)
    result.mpsearch_assignment = dict(assignment)
    result.mpsearch_backend = impl.name
    return result


def _check_calibration(
    impl: Backend, calib: Any, act_ranges: Mapping[str, tuple[float, float]] | None
) -> None:
    """Refuse a backend that calibrates without ``calib``, and ``calib`` with ``act_ranges``."""
    if impl.needs_calib and calib is None:
        raise invalid(
            "calib",
            None,
            f"calibration batches: the {impl.name!r} backend calibrates the whole model",
        )
    if calib is not None and act_ranges is not None:
        raise invalid(
            "act_ranges", dict(act_ranges), "None when calib batches are given (one or the other)"
        )


def _install(
    target: nn.Module, layers: Mapping[str, nn.Module], replacements: Mapping[str, nn.Module]
) -> None:
    """Put ``replacements`` in ``target`` in place of ``layers``, each keeping the user's hooks
    on the layer it replaces (an ``nn.MultiheadAttention``'s ``out_proj``'s never fire)."""
    replace_layers(target, replacements)
    for name in replacements:
        parent, _, attr = name.rpartition(".")
        attention = isinstance(target.get_submodule(parent), nn.MultiheadAttention)
        if not (attr == "out_proj" and attention):
            carry_hooks(layers[name], target.get_submodule(name))


def tied_groups(layers: Mapping[str, nn.Module], names: Iterable[str]) -> list[list[str]]:
    """The layers of ``names`` whose weights are one tensor (a tied embedding and output
    layer), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name in names:
        weight = getattr(layers[name], "weight", None)
        if isinstance(weight, Tensor) and weight.layout == torch.strided and weight.numel():
            groups.setdefault(weight.untyped_storage().data_ptr(), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tied_followers(
    modules: Mapping[str, nn.Module], never_called: Collection[str]
) -> dict[str, str]:
    """``{layer: leader}`` for the ``never_called`` layers that hold the weight of a called
    layer of the same type (T5's ``shared`` beside ``encoder.embed_tokens``): the first such
    layer leads, and a plan gives the follower its scheme
    (:attr:`mpsearch.search.ResolvedSpace.followers`)."""
    followers = {}
    for group in tied_groups(modules, modules):
        for name in (n for n in group if n in never_called):
            kind = type(modules[name])
            leader = next(
                (n for n in group if n not in never_called and type(modules[n]) is kind), None
            )
            if leader is not None:
                followers[name] = leader
    return followers


def share_tied_tensors(layers: Mapping[str, nn.Module], replacements: dict[str, nn.Module]) -> None:
    """Replacements of tied layers hold each of their equal tensors once: a bf16 embedding
    and a bf16 output layer one table, T5's encoder and decoder embeddings (and the shared one
    they copy) one set of int8 codes; an fp32 copy takes the model's own tensor back."""
    for group in tied_groups(layers, replacements):
        held = [layers[group[0]].weight]
        for name in group:
            for slots, key in tensor_slots(replacements[name]):
                tensor = slots[key]
                same = next((t for t in held if _same_tensor(t, tensor)), None)
                if same is None:
                    held.append(tensor)
                elif same is not tensor:
                    is_param = isinstance(tensor, nn.Parameter)
                    slots[key] = (
                        same
                        if isinstance(same, nn.Parameter) == is_param
                        else nn.Parameter(same, requires_grad=tensor.requires_grad)
                        if is_param
                        else same.detach()
                    )


def tensor_slots(module: nn.Module) -> list[tuple[dict[str, Any], str]]:
    """``(dict, key)`` of every parameter and buffer of ``module`` and its submodules, each
    slot once (a submodule held twice is visited once)."""
    return [
        (slots, key)
        for owner in module.modules()
        for slots in (owner._parameters, owner._buffers)
        for key, value in slots.items()
        if isinstance(value, Tensor)
    ]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.device == b.device
        and torch.equal(a, b)
    )


def _observed_ranges(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    to_change: Mapping[str, str],
    calib: list[Any],
    observer: str | Observer,
) -> dict[str, tuple[float, float]]:
    """Static activation ranges observed on ``calib`` for the layers of ``to_change`` whose
    scheme quantizes activations and whose quantized form takes a range."""
    static = [
        n
        for n, s in to_change.items()
        if get_scheme(s).quantizes_activations and takes_act_range(layers[n])
    ]
    return collect_activation_ranges(model, calib, static, observer=observer) if static else {}


def read_directly(
    model: nn.Module, calib: Sequence[Any], names: Iterable[str], *, warn: bool = True
) -> list[str]:
    """The layers of ``names`` whose weights ``model`` reads directly on the first ``calib``
    batch, outside their own calls: an operation takes one of their weights while neither the
    layer nor a module holding its weights runs. Either the layer is never called (Mamba's
    ``dt_proj`` and ``conv1d``; T5's ``shared`` embedding is not one: its encoder's and
    decoder's tied copies are called), or it is called and also read (an output projection
    tied to an embedding through ``F.linear(h, self.embed.weight)``). Warned (unless not
    ``warn``): they stay fp32, as a quantized layer keeps no float weight to read. A layer
    the batch does not use at all (an expert no token reached) is not one of them; reading a
    weight's shape, dtype or device is not a read."""
    names = list(names)
    if not names:
        return []
    aliases = _tied_copies(model, names)
    watch = {*names, *(a for copies in aliases.values() for a in copies)}
    holders: dict[int, set[str]] = {}
    for name in watch:
        for param in model.get_submodule(name).parameters():
            holders.setdefault(id(param), set()).add(name)
    running: list[str] = []
    called: set[str] = set()
    reads = _ParameterReads(holders, running)
    tracked = {n: _Running(model.get_submodule(n), n, running, called) for n in watch}
    with torch.inference_mode(), eval_mode(model), swapped(model, tracked), reads:
        run_model(model, calib[0])
    weights = {n: {id(p) for p in model.get_submodule(n).parameters()} for n in names}
    read = [n for n in names if not weights[n].isdisjoint(reads.outside)]
    never = [n for n in read if n not in called and called.isdisjoint(aliases[n])]
    also = [n for n in read if n not in never]
    if warn:
        for group, why in (
            (never, f"{NEVER_CALLED} (it reads their weights directly)"),
            (also, READ_BESIDES_CALLS),
        ):
            if group:
                shown = ", ".join(repr(n) for n in group[:5]) + (", ..." if len(group) > 5 else "")
                warnings.warn(f"{len(group)} layer(s) stay fp32, {why}: {shown}", stacklevel=3)
    return read


class _Running(nn.Module):
    """``layer``, noting in ``called`` that it was called and in ``running`` (a stack) that it
    runs; its attributes read through (model code reads ``self.proj.weight.dtype``)."""

    def __init__(self, layer: nn.Module, name: str, running: list[str], called: set[str]) -> None:
        super().__init__()
        self.layer, self.name, self.running, self.called = layer, name, running, called

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.called.add(self.name)
        self.running.append(self.name)
        try:
            return self.layer(*args, **kwargs)
        finally:
            self.running.pop()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


class _ParameterReads(TorchFunctionMode):
    """Within, which parameters (by ``id``) a torch operation reads while none of the modules
    holding them (``holders``: ``{id: module names}``) is ``running``: ``outside``."""

    def __init__(self, holders: Mapping[int, set[str]], running: list[str]) -> None:
        super().__init__()
        self.holders = holders
        self.running = running
        self.outside: set[int] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: ``weight.shape`` or ``weight.T``
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name not in TENSOR_METADATA:
            for value in pytree.tree_leaves((args, kwargs or {})):
                owners = self.holders.get(id(value)) if isinstance(value, Tensor) else None
                if owners and owners.isdisjoint(self.running):
                    self.outside.add(id(value))
        return func(*args, **(kwargs or {}))


def _tied_copies(model: nn.Module, names: Sequence[str]) -> dict[str, set[str]]:
    """For each layer of ``names``, the other modules holding one of its weights."""
    holders: dict[int, set[str]] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(module_name)
    copies = {}
    for name in names:
        params = model.get_submodule(name).parameters()
        found = {m for p in params for m in holders.get(id(p), ())}
        copies[name] = {m for m in found if m != name and not m.startswith(f"{name}.")}
    return copies


def _read_directly(model: nn.Module, names: Iterable[str]) -> list[str]:
    """:func:`read_directly` on the example input a Hugging Face model declares
    (``dummy_inputs``), where it runs the model; else none found. Mamba reads its ``conv1d``
    and ``dt_proj`` weights directly: quantized without calibration batches, their bf16
    biases met float32 activations."""
    example = getattr(model, "dummy_inputs", None)
    if not isinstance(example, Mapping) or not example:
        return []
    try:
        return read_directly(model, [dict(example)], names)
    except Exception:  # the declared example does not fit this model: nothing to learn
        return []


def _rounder_for(
    model: nn.Module,
    choices: Mapping[str, str],
    calib: Iterable[Any] | None,
    rounder: Rounder | None,
) -> Rounder | None:
    """The rounder ``quantize`` uses: ``rounder`` (checked against ``model``), one built on
    ``calib`` when the plan has calibrated roundings, or ``None``."""
    if rounder is not None:
        if not isinstance(rounder, Rounder):
            raise invalid("rounder", rounder, "a Rounder (mpsearch.rounding.Rounder) or None")
        if set(rounder.layers) != set(quantizable_layers(model)) and not same_weights(
            rounder.model, model, rounder.layers
        ):
            raise invalid(
                "rounder",
                rounder,
                "a Rounder built on this model or on its captured graph (the same quantizable "
                "layers, or some of them with the same weights)",
            )
        unseen = [n for n, c in choices.items() if n not in rounder.layers and c != "fp32"]
        if missing := [n for n in unseen if get_scheme(choices[n]).rounding != "rtn"]:
            raise ValueError(
                f"The rounder has no layer {missing[0]!r} (built on a graph that never calls "
                f"it), which the plan rounds by a calibrated method ({choices[missing[0]]}): "
                "give it a round-to-nearest scheme, or pass calib= instead of rounder=."
            )
        return rounder
    rounded = sorted(n for n, c in choices.items() if get_scheme(c).rounding != "rtn")
    if not rounded:
        return None
    if calib is None:
        shown = ", ".join(f"{n!r} ({choices[n]})" for n in rounded[:5])
        raise ValueError(
            f"The plan rounds {len(rounded)} layer(s) by a calibrated method ({shown}), which "
            "needs calibration data: pass calib=batches (or rounder=Rounder(model, batches)), "
            "or use round-to-nearest schemes."
        )
    return Rounder(model, calib)
