"""``measure_cost``: exact memory and measured latency per (layer, scheme); ``CostModel``
predicts a plan's memory and latency from them and checks itself against real runs."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mpsearch._data import Batch, run_model
from mpsearch._validation import check_module, invalid
from mpsearch.backends import BACKENDS, Backend, get_backend, quantize, storage_bytes
from mpsearch.backends._kernels import Kernel, KernelBackend, RealLayer, choice_key, tensor_bytes
from mpsearch.backends._quantize import (
    PlanLike,
    applicability_error,
    as_plan,
    runnable_plan,
    tensor_slots,
    tied_followers,
    tied_groups,
)
from mpsearch.backends._quantize import (
    read_directly as layers_read_directly,
)
from mpsearch.backends._simulate import SIMULATED_TYPES
from mpsearch.cost._autotune import TuneCache, fastest
from mpsearch.cost._cache import cache_key, read_cache, write_cache
from mpsearch.cost._options import CostOptions
from mpsearch.cost._timing import (
    cache_flusher,
    device_name,
    last_level_cache_bytes,
    median_ms,
    threads,
)
from mpsearch.layers import layer_weights, quantizable_layers, weight_shapes
from mpsearch.layers._layers import (
    LayerCall,
    OwnForward,
    call_layer,
    enclosing_layer,
    standard_form,
    watched,
    with_own_forward,
)
from mpsearch.plan import PrecisionPlan
from mpsearch.schemes import Scheme, get_scheme
from mpsearch.schemes._rounding import split_choice

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COLUMNS = ["layer", "scheme", "memory_bytes", "latency_ms", "supported", "reason", "kernel"]
TUNING_COLUMNS = ["layer", "scheme", "kernel", "latency_ms", "chosen", "error"]


def ideal_layer_bytes(layer: nn.Module, scheme: Scheme) -> int:
    """Bytes of ``layer`` stored ideally in ``scheme``: each weight matrix's packed bits
    (scales and zero points included) rounded up to bytes, plus its other parameters (biases,
    an LSTM's included) in the scheme's compute dtype. An embedding is weight-only: no bias.

    >>> ideal_layer_bytes(nn.Linear(64, 32), get_scheme("w8a8"))   # 2048 + 32 fp32 scales + bias
    2304
    >>> ideal_layer_bytes(nn.LSTM(8, 4), get_scheme("w8a8"))  # 2 x (16 x 8 or 4 + 16 scales + bias)
    448
    """
    weights = layer_weights(layer)
    weight_bytes = sum(
        math.ceil(scheme.weight_storage_bits(tuple(w.shape)) / 8) for w in weights.values()
    )
    layer = standard_form(layer)
    others = [p for n, p in layer.named_parameters(recurse=False) if n not in weights]
    return weight_bytes + sum(p.numel() for p in others) * _BYTES[scheme.compute_dtype]


def _own_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])


def _storage_key(t: torch.Tensor) -> int:
    """The storage a tensor's bytes live in (a shape-only ``meta`` stand-in for an opaque
    packed weight has none: it is its own)."""
    real = t.layout == torch.strided and t.numel() and t.device.type != "meta"
    return t.data_ptr() if real else id(t)


def _tensors(module: nn.Module) -> list[tuple[str, int]]:
    """(digest, bytes) of each tensor ``module`` (a tied layer's replacement) holds, each
    storage once: ``quantize`` keeps one of the equal tensors among tied layers' replacements
    (:func:`~mpsearch.backends._quantize.share_tied_tensors`)."""
    seen: set[int] = set()
    out = []
    for slots, key in tensor_slots(module):
        t = slots[key]
        if _storage_key(t) in seen or not tensor_bytes(t):
            continue
        seen.add(_storage_key(t))
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        digest = hashlib.blake2b(data, digest_size=16)
        digest.update(f"{t.dtype}{tuple(t.shape)}{t.stride()}".encode())
        out.append((digest.hexdigest(), tensor_bytes(t)))
    return out


def held_bytes(model: nn.Module) -> int:
    """Bytes ``model`` (e.g. what ``quantize`` returns) stores: every parameter, buffer and
    packed kernel tensor, each storage once (by ``data_ptr``: tied weights once).

    A ``simulate`` layer (an LSTM's and an embedding's too) counts as the bytes its scheme
    stores (:func:`ideal_layer_bytes`): its fake-quantized float weights and the
    full-precision layer it wraps are simulation scaffolding, counted only where another
    module holds them too (a tied embedding).

    >>> held_bytes(nn.Linear(4, 2))   # 8 weights + 2 biases in float32
    40
    """
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # keeps each tensor's id unique until the end
    total = 0
    for module in _modules_outside_simulated(model):
        if isinstance(module, SIMULATED_TYPES):
            total += ideal_layer_bytes(module.inner, module.scheme)  # type: ignore[arg-type]
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, RealLayer):
            tensors += module.packed_tensors().values()
        alive += tensors
        for t in tensors:
            if _storage_key(t) not in seen:
                seen.add(_storage_key(t))
                total += tensor_bytes(t)
    return total


def _modules_outside_simulated(model: nn.Module) -> list[nn.Module]:
    """Every module once, a simulated layer included but not its insides."""
    found: dict[int, nn.Module] = {}
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in found:
            continue
        found[id(module)] = module
        if not isinstance(module, SIMULATED_TYPES):
            stack.extend(module.children())
    return list(found.values())


def _storage_layout(model: nn.Module, layers: Sequence[str]) -> tuple[int, list[list[Any]]]:
    """How the fp32 model's stored bytes split: the bytes of storages some module other than
    ``layers`` holds (they stay whatever the plan), and ``[bytes, [layer names]]`` of each
    storage only those layers hold (it stays while one of them is not replaced)."""
    chosen = set(layers)
    holders: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        holder = enclosing_layer(name, chosen) or name  # a weight-normed layer's tensors
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            holders.setdefault(_storage_key(t), set()).add(holder)
            sizes[_storage_key(t)] = t.numel() * t.element_size()
    rest = sum(sizes[k] for k, names in holders.items() if not names <= chosen)
    only_layers = [[sizes[k], sorted(names)] for k, names in holders.items() if names <= chosen]
    return rest, only_layers


def _capture_inputs(
    model: nn.Module, example_input: Batch, names: Sequence[str], *, chosen: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each layer's first input during one forward, and how many times it is called.

    A layer never called is an error when the user ``chosen`` it; among the default layers it
    is left out with a warning (the model reads its weights directly, as Mamba's ``dt_proj``,
    or it is a tied copy, as T5's ``shared`` beside ``encoder.embed_tokens``): the profile
    skips it for the same reason."""
    inputs: dict[str, torch.Tensor | LayerCall] = {}
    calls = dict.fromkeys(names, 0)

    def record(name: str):
        def seen(x: torch.Tensor | LayerCall) -> None:
            calls[name] += 1
            if name not in inputs:
                inputs[name] = (
                    x.detached()
                    if isinstance(x, LayerCall)
                    else x.detach().clone(memory_format=torch.preserve_format)
                )

        return seen

    with torch.inference_mode(), watched(model, {n: record(n) for n in names}, whole=True):
        run_model(model, example_input)
    never = [n for n in names if calls[n] == 0]
    if never and (chosen or len(never) == len(names)):
        raise ValueError(
            f"Layers {never} are never called by the model on 'example_input'; pass "
            "layers= without them, or an example input that runs them."
        )
    if never:  # a follower takes its leader's scheme: no warning for it
        modules = dict(model.named_modules())
        followers = tied_followers({n: modules[n] for n in names}, never)
        never = [n for n in never if n not in followers]
    if never:
        warnings.warn(
            f"measure_cost: {len(never)} quantizable layers are never called on "
            f"'example_input' and stay in full precision: {never}",
            stacklevel=3,
        )
    return inputs, {n: c for n, c in calls.items() if c}


class CostModel:
    """Memory (exact bytes) and latency (measured on this device) of every (layer, scheme),
    and predictions for whole plans.

    ``latency_ms(plan) = intercept_ms + slope * sum of the plan's per-layer times``: each
    per-layer time is measured on the real module with the layer's real input (fp32 in,
    fp32 out, so the dtype conversions at its boundaries are inside it; in the layout its
    neighbours hand it in that scheme's plan); the intercept (the
    rest of the model: norms, activations, Python dispatch) and slope are fitted by least
    squares on end-to-end runs of the uniform plans (``fit_table``).

    Where the backend has several implementations of a (layer, scheme) (:meth:`KernelBackend.
    candidates`), each is timed on the layer's real input and the fastest kept: the ``kernel``
    column names it, ``tuning`` holds every implementation's time, and :attr:`backend` builds
    the picks (``quantize(model, plan, backend=cost.backend)``).

    >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    >>> cost = measure_cost(net, torch.randn(4, 32), schemes=["bf16"], repeats=3, warmup=1)
    >>> cost.memory_bytes({"0": "bf16", "2": "fp32"}) < cost.fp32_memory_bytes
    True
    """

    def __init__(
        self,
        *,
        table: pd.DataFrame,
        model: nn.Module,
        example_input: Batch,
        backend: Backend,
        rest_bytes: int,
        layer_storages: list[list[Any]],
        fp32_memory_bytes: int,
        fp32_latency_ms: float,
        fit: dict[str, Any],
        meta: dict[str, Any],
        settings: dict[str, Any],
        tuning: pd.DataFrame | None = None,
        as_is: Sequence[Sequence[str]] = (),
        tables: Sequence[Sequence[Any]] = (),
        never_called: Sequence[str] = (),
        schemes: Sequence[str] = (),
        read_directly: Sequence[str] = (),
    ) -> None:
        self.table = table
        self.never_called = list(never_called)  # quantizable layers the model never calls
        # of those, the ones whose weights no called module holds: quantize keeps them fp32
        self.read_directly = list(read_directly)
        self.tuning = tuning if tuning is not None else pd.DataFrame(columns=TUNING_COLUMNS)
        self.model = model
        self.example_input = example_input
        self.backend = backend
        self.rest_bytes = rest_bytes
        self.layer_storages = [(int(size), frozenset(names)) for size, names in layer_storages]
        self.fp32_memory_bytes = fp32_memory_bytes
        self.fp32_latency_ms = fp32_latency_ms
        self.intercept_ms = float(fit["intercept_ms"])
        self.slope = float(fit["slope"])
        self.fit_table = pd.DataFrame(fit["points"])
        self.meta = meta
        self.settings = settings
        self.layers: list[str] = list(dict.fromkeys(table["layer"]))
        # the schemes asked for; the table also holds the variants some layers take instead
        self.schemes: list[str] = list(schemes) or list(dict.fromkeys(table["scheme"]))
        indexed = table.set_index(["layer", "scheme"])
        self._memory = indexed["memory_bytes"].to_dict()
        self._latency = indexed["latency_ms"].to_dict()
        self._supported = indexed["supported"].to_dict()
        self._reason = indexed["reason"].to_dict()
        self._as_is = {(n, s) for n, s in as_is}  # layers the backend runs as they are
        # tied layers' replacements: (digest, bytes) of each tensor (quantize shares equal ones)
        self._tables = {(n, s): [(d, int(b)) for d, b in held] for n, s, held in tables}
        self._tied = tied_groups(quantizable_layers(model), [*self.layers, *self.never_called])
        self._tied_names = {n for g in self._tied for n in g}
        self._never_called_bytes: dict[tuple[str, str], int | None] = {}

    # -------------------------------------------------------------- lookups

    def supported(self, layer: str, scheme: str) -> bool:
        """Whether the backend runs ``layer`` in ``scheme`` (``False`` for unmeasured pairs); a
        choice with a rounding method (``"w4a16+gptq"``) runs as its scheme."""
        return bool(self._supported.get((layer, split_choice(scheme)[0]), False))

    def assignment(self, plan: PlanLike) -> dict[str, str]:
        """``{layer: scheme}`` of ``plan`` over the measured layers and the ones the model never
        calls (they cost bytes, not time); refuses pairs not measured or not supported (with
        the reason)."""
        plan = as_plan(plan)
        resolved = plan.resolve(self.model)
        if any(n not in plan.rules and self._lacks(n, s) for n, s in resolved.items()):
            # a default or regex rule gives a layer a scheme the backend has no kernel of there
            resolved = runnable_plan(self.model, plan, self.backend).resolve(self.model)
        problems = []
        for name, scheme in resolved.items():
            if name in self.never_called:
                layer, s = self.model.get_submodule(name), get_scheme(scheme)
                why = applicability_error(layer, s) or self.backend.unsupported_reason(layer, s)
                if why:
                    problems.append(f"  {name} in {scheme!r}: {why}")
            elif name not in self.layers:
                if scheme != "fp32":
                    problems.append(
                        f"  {name}: not measured (measure_cost(layers=...) left it out)"
                    )
            elif (name, scheme) not in self._supported:
                problems.append(
                    f"  {name}: scheme {scheme!r} was not measured (schemes={self.schemes})"
                )
            elif not self._supported[(name, scheme)]:
                problems.append(f"  {name} in {scheme!r}: {self._reason[(name, scheme)]}")
        if problems:
            raise ValueError(
                f"The plan has no cost on the {self.backend.name!r} backend:\n"
                + "\n".join(problems)
            )
        return {n: s for n, s in resolved.items() if n in self.layers or n in self.never_called}

    def _lacks(self, name: str, scheme: str) -> bool:
        """Whether the backend has no kernel of ``scheme`` for layer ``name`` (looked up in the
        table where measured; an unmeasured pair is refused by :meth:`assignment` itself)."""
        if name in self.never_called:
            layer = self.model.get_submodule(name)
            return bool(self.backend.unsupported_reason(layer, get_scheme(scheme)))
        return not self._supported.get((name, scheme), True)

    def _layer_bytes(self, name: str, scheme: str) -> int | None:
        """Bytes of ``name`` quantized as ``scheme``, ``None`` where the backend keeps the layer
        as it is; measured by :func:`measure_cost`, or, for a layer the model never calls
        (``quantize`` replaces it all the same where a module it calls holds its weights, as
        T5's tied embeddings), built here on the backend's default kernel and counted; one
        whose weights the model reads directly stays as it is (``quantize`` keeps it fp32)."""
        if name in self.read_directly:
            return None
        if name not in self.never_called:
            return None if (name, scheme) in self._as_is else self._memory[(name, scheme)]
        key = (name, scheme)
        if key not in self._never_called_bytes:
            layer, s = self.model.get_submodule(name), get_scheme(scheme)
            if not self.backend.real:
                self._never_called_bytes[key] = ideal_layer_bytes(layer, s)
            else:
                module = with_own_forward(layer, self.backend.quantize_layer(layer, s))
                own = {_storage_key(t) for t in layer.parameters()}
                shares = any(_storage_key(t) in own for t in module.parameters())
                self._never_called_bytes[key] = None if shares else storage_bytes(module)
                if name in self._tied_names:
                    self._tables[key] = _tensors(module)
                if shares:
                    self._as_is.add(key)
        return self._never_called_bytes[key]

    def memory_bytes(self, plan: PlanLike) -> int:
        """Exact bytes of the quantized model's tensors under ``plan`` (:func:`held_bytes` of
        ``quantize(model, plan, backend)``), each stored tensor once.

        The layers the backend replaces (every planned layer on a real backend, the non-fp32
        ones on ``simulate``) count their quantized bytes; the model's own tensors count once
        while any module still holds them: a weight tied between ``lm_head`` and the
        embedding is held twice once ``lm_head`` is quantized (its copy and the embedding's).
        """
        chosen = self.assignment(plan)
        replaced = {
            n: size
            for n, s in chosen.items()
            if (self.backend.real or s != "fp32") and (size := self._layer_bytes(n, s)) is not None
        }
        kept = sum(size for size, names in self.layer_storages if not names <= replaced.keys())
        return int(self.rest_bytes + kept + sum(replaced.values()) - self._shared_tensors(chosen))

    def _shared_tensors(self, chosen: Mapping[str, str]) -> int:
        """Bytes ``quantize`` saves by :func:`~mpsearch.backends._quantize.share_tied_tensors`:
        a tensor of a tied layer's replacement equal to one a partner holds is held once (the
        model's own, counted as kept, where a partner runs as it is)."""
        saved = 0
        for group in self._tied:
            seen: set[str] = set()
            keys = sorted(
                ((n, chosen.get(n, "")) for n in group), key=lambda k: k not in self._as_is
            )
            for key in keys:  # those run as they are first: their tensors are the model's own
                for digest, size in self._tables.get(key, ()):
                    if digest in seen and key not in self._as_is:
                        saved += size
                    seen.add(digest)
        return saved

    def memory_mb(self, plan: PlanLike) -> float:
        """:meth:`memory_bytes` in MB (10**6 bytes)."""
        return self.memory_bytes(plan) / 1e6

    def layer_sum_ms(self, plan: PlanLike) -> float:
        """Sum of the plan's measured per-layer times (no intercept, no slope)."""
        chosen = self.assignment(plan)
        return float(sum(self._latency[(n, s)] for n, s in chosen.items() if n in self.layers))

    def latency_ms(self, plan: PlanLike) -> float:
        """Predicted end-to-end latency of ``plan`` in ms on the measured device."""
        return self.intercept_ms + self.slope * self.layer_sum_ms(plan)

    def tuning_summary(self) -> str:
        """One line on the autotuning: pairs tuned, how many left the default, best gain."""
        if self.tuning.empty:
            return "autotuning: one implementation per (layer, scheme) (nothing to choose)"
        pairs = self.tuning.groupby(["layer", "scheme"], sort=False)
        gains = pairs["latency_ms"].agg(lambda t: t.iloc[0] / t.min())
        chosen = self.tuning[self.tuning["chosen"].astype(bool)].set_index(["layer", "scheme"])
        switched = int((chosen["kernel"] != pairs["kernel"].first()[chosen.index]).sum())
        kinds = chosen["kernel"].value_counts()
        return (
            f"autotuning on {self.meta.get('device')}: {len(gains)} (layer, scheme) pairs with "
            f"several implementations, {switched} run a faster one than the default "
            f"({', '.join(f'{k} x{n}' for k, n in kinds.items())}); best gain {gains.max():.2f}x"
        )

    # -------------------------------------------------------------- real runs

    def measure(self, plan: PlanLike, *, repeats: int | None = None) -> float:
        """Median end-to-end ms of the model really quantized by ``plan`` on the backend."""
        return self.time_module(quantize(self.model, plan, backend=self.backend), repeats=repeats)

    def time_module(self, module: nn.Module, *, repeats: int | None = None) -> float:
        """Median ms of ``module`` on the example input, timed as this cost model was (threads,
        timer, warm-up): e.g. the user's own fp32 model next to quantized ones."""
        return _time_model(module, self.example_input, self.settings, repeats=repeats)

    def validate(self, plans: Iterable[PlanLike], *, repeats: int | None = None) -> pd.DataFrame:
        """Predicted vs measured latency for ``plans``: one row each with the relative error."""
        rows = []
        for i, plan in enumerate(plans):
            predicted = self.latency_ms(plan)
            measured = self.measure(plan, repeats=repeats)
            rows.append(
                {
                    "plan": i,
                    "predicted_ms": predicted,
                    "measured_ms": measured,
                    "rel_error": abs(predicted - measured) / measured,
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (
            f"CostModel(backend={self.backend.name!r}, layers={len(self.layers)}, "
            f"schemes={self.schemes}, device={self.meta.get('device')!r})"
        )


def _time_model(
    model: nn.Module, example_input: Batch, settings: dict[str, Any], *, repeats: int | None = None
) -> float:
    with threads(settings["num_threads"]):
        return median_ms(
            lambda: run_model(model, example_input),
            repeats=repeats or settings["repeats"],
            warmup=settings["warmup"],
            timer=settings["timer"],
            stable=settings.get("stable"),
        )


def _fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    """``measured = intercept + slope * layer_sum``, fitted robustly (Theil-Sen: the median of
    the pairwise slopes, the median intercept), so one plan timed during a burst of load on a
    shared machine does not tilt the line; slope 1 (the per-layer times add up) when the
    points give no positive slope. The overhead is not negative: where the fitted intercept
    is, the line goes through the origin (the median ratio measured / layer sum); two plans
    timed under load once gave a steep line whose negative intercept predicted -3.6 ms.

    >>> fit = _fit([{"layer_sum_ms": x, "measured_ms": 2 + x} for x in (1.0, 2.0, 4.0)])
    >>> fit["intercept_ms"], fit["slope"]
    (2.0, 1.0)
    """
    x = np.array([p["layer_sum_ms"] for p in points])
    y = np.array([p["measured_ms"] for p in points])
    pairs = [
        (y[j] - y[i]) / (x[j] - x[i])
        for i in range(len(x))
        for j in range(i + 1, len(x))
        if abs(x[j] - x[i]) > 1e-3 * max(float(np.mean(x)), 1e-9)
    ]
    slope = float(np.median(pairs)) if pairs else 1.0
    if slope <= 0:
        slope = 1.0
    intercept = float(np.median(y - slope * x))
    if intercept < 0 and (x > 0).any():  # no negative overhead: a line through the origin
        slope, intercept = float(np.median(y[x > 0] / x[x > 0])), 0.0
    for p in points:
        p["predicted_ms"] = intercept + slope * p["layer_sum_ms"]
        p["rel_error"] = abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"]
    return {"intercept_ms": intercept, "slope": slope, "points": points}


COST_KEYWORDS = ("schemes", "backend", "options")
"""``measure_cost``'s own keywords (every other keyword is a :class:`CostOptions` field)."""


def measure_cost(
    model: nn.Module,
    example_input: Batch,
    *,
    schemes: Sequence[str],
    backend: str | Backend = "cpu",
    options: CostOptions | None = None,
    **overrides: Any,
) -> CostModel:
    """Measure memory and latency of every (layer, scheme) of ``model`` on ``backend``.

    Memory is exact: the bytes of the real quantized layer's tensors (for ``simulate``, the
    scheme's ideal storage). Latency is the median of ``repeats`` runs (after ``warmup``) of
    each quantized layer on the input it receives when ``example_input`` runs through the
    model; whole-model runs of the uniform plans fit the intercept and slope of the
    prediction. How it measures is :class:`CostOptions` (``options``); any of its fields given
    as a keyword (``repeats=5``, ``timer="process"``...) overrides it, and an unknown keyword
    raises ``TypeError`` listing the accepted ones. With ``cache_dir`` the results are stored
    per device, model layer shapes, schemes and backend, and reused.

    >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    >>> cost = measure_cost(net, torch.randn(4, 32), schemes=["bf16", "w8a8"], repeats=3)
    >>> sorted(cost.schemes)
    ['bf16', 'fp32', 'w8a8']
    >>> opts = CostOptions(repeats=3, warmup=1, num_threads=1)
    >>> measure_cost(net, torch.randn(4, 32), schemes=["bf16"], options=opts).settings["repeats"]
    3
    """
    opts = CostOptions.resolve(options, overrides, also=COST_KEYWORDS)
    impl, scheme_objs, names = _check_call(model, schemes, backend, opts)
    model = model.eval()
    # Input shapes and calls (each scheme's rows are then timed on the inputs of its own plan).
    reference = quantize(model, PrecisionPlan.uniform("fp32"), backend=impl) if impl.real else model
    inputs, calls = _capture_inputs(reference, example_input, names, chosen=opts.layers is not None)
    never_called = [n for n in names if n not in calls]
    names = list(calls)
    with threads(opts.num_threads) as n_threads:
        meta = {
            "device": device_name(impl.name),
            "torch": torch.__version__,
            "backend": impl.name,
            "num_threads": n_threads,
            "timer": opts.timer,
            "cold": _cold(opts.cold, model),
        }
    shapes = [(n, tuple(inputs[n].shape), calls[n]) for n in names]
    key = _cache_key(model, impl, scheme_objs, shapes, meta, opts)
    path = None if opts.cache_dir is None else Path(opts.cache_dir) / f"cost-{impl.name}-{key}.json"
    payload = read_cache(path, key) if path is not None else None
    if payload is None:
        tune_cache = TuneCache(opts.cache_dir, meta)
        settings = {**opts.settings(), "cold": meta["cold"]}
        tuning = tune_cache if opts.autotune else None
        job = _Job(
            model, example_input, impl, scheme_objs, names, inputs, calls, settings, tuning,
            never_called=never_called,
        )  # fmt: skip
        payload = job.measure()
        payload["meta"] = meta
        tune_cache.save()
        if path is not None:
            write_cache(path, key, payload)
    if isinstance(impl, KernelBackend) and payload["choices"]:
        impl = impl.tuned(payload["choices"])
    return CostModel(
        table=pd.DataFrame(payload["rows"], columns=COLUMNS),
        tuning=pd.DataFrame(payload["tuning"], columns=TUNING_COLUMNS),
        as_is=payload["as_is"],
        tables=payload["tables"],
        model=model,
        example_input=example_input,
        backend=impl,
        rest_bytes=payload["rest_bytes"],
        layer_storages=payload["layer_storages"],
        fp32_memory_bytes=payload["fp32_memory_bytes"],
        fp32_latency_ms=payload["fp32_latency_ms"],
        fit=payload["fit"],
        meta=payload["meta"],
        settings={**opts.settings(), "cold": meta["cold"]},
        never_called=never_called,
        schemes=payload["schemes"],
        read_directly=layers_read_directly(
            model, [example_input], [*names, *never_called], warn=False
        ),
    )


FLUSH_BYTES = 64 << 20
"""What a cold timing evicts where the last-level cache's size is unknown."""


def _cold(cold: bool | str, model: nn.Module) -> bool:
    """Whether layers are timed cold: ``"auto"`` when the model's tensors exceed the
    last-level cache."""
    if cold != "auto":
        return bool(cold)
    llc = last_level_cache_bytes()
    return llc is not None and storage_bytes(model) > llc


def per_layer_backend(backend: str | Backend) -> Backend:
    """``backend``, refused when it converts whole models (``needs_calib``: ``cpu-pt2e``), whose
    layers cannot be timed one by one.

    >>> per_layer_backend("cpu").name
    'cpu'
    """
    impl = get_backend(backend)
    if impl.needs_calib:
        per_layer = sorted(n for n in BACKENDS if not get_backend(n).needs_calib)
        raise invalid(
            "backend",
            impl.name,
            f"a backend whose layers are timed one by one ({', '.join(per_layer)}); "
            f"{impl.name!r} quantizes the whole model at once: time its plans end to end",
        )
    return impl


def _check_call(
    model: Any, schemes: Any, backend: Any, opts: CostOptions
) -> tuple[Backend, list[Scheme], list[str]]:
    """The backend, the schemes (fp32 first) and the layer names, checked before any work."""
    check_module(model)
    if isinstance(schemes, str) or not isinstance(schemes, Sequence) or not schemes:
        raise invalid("schemes", schemes, "a non-empty list of scheme names")
    # a choice with a rounding method ('w4a16+gptq') costs what its scheme costs
    bases = [get_scheme(s, argument="schemes").base_name for s in ["fp32", *schemes]]
    scheme_objs = [get_scheme(s) for s in dict.fromkeys(bases)]
    impl = per_layer_backend(backend)
    reason = impl.unavailable_reason()
    if reason:
        raise ValueError(f"The {impl.name!r} backend cannot run here: {reason}")
    all_layers = quantizable_layers(model)
    names = list(all_layers) if opts.layers is None else list(opts.layers)
    if any(n not in all_layers for n in names):
        raise invalid(
            "layers",
            opts.layers,
            f"a non-empty list of quantizable layer names of the model ({list(all_layers)[:8]}...)",
            kind="option",
        )
    return impl, scheme_objs, names


def _cache_key(
    model: nn.Module,
    impl: Backend,
    schemes: list[Scheme],
    shapes: list[tuple[str, tuple[int, ...], int]],
    meta: dict[str, Any],
    opts: CostOptions,
) -> str:
    """Everything the measurements depend on: device, schemes, layers' shapes and calls,
    the model's bytes, repeats, and which kernel runs each (layer type, scheme)."""
    all_layers = quantizable_layers(model)
    return cache_key(
        {
            **meta,
            "schemes": [s.name for s in schemes],
            "layers": [
                (n, type(all_layers[n]).__name__, weight_shapes(all_layers[n]), shape, calls)
                for n, shape, calls in shapes
            ],
            "model_bytes": storage_bytes(model),
            # caches before tied weights were split, before int8 layers dropped their zero
            # points and before the rows of substituted variants are stale
            "memory_layout": "shared storages, no int8 zero points, substitutes, never called, "
            "tied tensors shared",
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "autotune": opts.autotune,
            "stable": opts.stable,
            # a new kernel is a new measurement
            "kernels": impl.kernel_table() if isinstance(impl, KernelBackend) else None,
        }
    )


@dataclass
class _Job:
    """One measurement: every (layer, scheme) row, then the end-to-end fit."""

    model: nn.Module
    example_input: Batch
    impl: Backend
    schemes: list[Scheme]
    names: list[str]
    inputs: dict[str, torch.Tensor]
    calls: Mapping[str, int]
    settings: dict[str, Any]
    tune_cache: TuneCache | None  # None: the default implementation only
    tuning: list[list[Any]] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    as_is: list[tuple[str, str]] = field(default_factory=list)
    # tied layers' replacements: {(layer, scheme): [(digest, bytes) of each tensor]}
    tables: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)
    untuned: set[str] = field(default_factory=set)  # schemes whose picks lost end to end
    tied: set[str] = field(default_factory=set)  # layers whose weight another one holds too
    never_called: list[str] = field(default_factory=list)  # priced for their bytes alone

    def measure(self) -> dict[str, Any]:
        """The cache payload: rows, memory of the rest of the model, fp32 latency, the fit."""
        all_layers = quantizable_layers(self.model)
        tied = tied_groups(all_layers, [*self.names, *self.never_called])
        self.tied = {n for g in tied for n in g}
        rows: dict[tuple[str, str], list[Any]] = {}
        points = []
        for s in self.schemes:  # fp32 first: the other plans' fp32 layers are timed by then
            if self.impl.real:
                self.inputs = self.scheme_inputs(s, all_layers)
            rows.update({(n, s.name): self.row(all_layers[n], n, s) for n in self.names})
            point = self.uniform_point(s, rows)
            if point is None:  # its picks lost end to end: the default kernels instead
                self.untuned.add(s.name)
                rows.update({(n, s.name): self.row(all_layers[n], n, s) for n in self.names})
                point = self.uniform_point(s, rows)
            points.append(point)
            # the variant a plan of ``s`` gives a layer whose shape ``s`` cannot take (w4a16's
            # groups of 32 at fan-in 9: w4a16_pc) or the backend runs no kernel of ``s`` for
            # (w8a8 on a transposed convolution: w8a16), so that plan has a cost
            uniform = PrecisionPlan.uniform(s.name)
            used = runnable_plan(self.model, uniform, self.impl).resolve(self.model)
            for n, scheme in used.items():
                if n in self.names and (n, scheme) not in rows:
                    rows[(n, scheme)] = self.row(all_layers[n], n, get_scheme(scheme))
        order = {n: i for i, n in enumerate(self.names)}
        ordered = [rows[k] for k in sorted(rows, key=lambda k: order[k[0]])]  # stable: by layer
        table = pd.DataFrame(ordered, columns=COLUMNS)
        rest_bytes, layer_storages = _storage_layout(self.model, [*self.names, *self.never_called])
        fp32_memory = held_bytes(self.model)
        return {
            "schemes": [s.name for s in self.schemes],
            "rows": [
                [None if isinstance(v, float) and math.isnan(v) else v for v in r]
                for r in table.itertuples(index=False)
            ],
            "rest_bytes": rest_bytes,
            "layer_storages": layer_storages,
            "fp32_memory_bytes": int(fp32_memory),
            "fp32_latency_ms": float(_time_model(self.model, self.example_input, self.settings)),
            "tuning": self.tuning,
            "choices": self.choices,
            "as_is": self.as_is,
            "tables": [[*k, v] for k, v in self.tables.items()],
            "fit": _fit(points),
        }

    def scheme_inputs(self, scheme: Scheme, layers: Mapping[str, nn.Module]) -> dict[str, Any]:
        """Each layer's input where every layer that can runs ``scheme``: the dtype and layout
        its neighbours hand it in such a plan (a channels-last int8 or bf16 convolution's
        output), so the conversions it then makes are timed with it."""
        plan = {
            n: "fp32"
            if applicability_error(layers[n], scheme)
            or self.impl.unsupported_reason(layers[n], scheme)
            else scheme.name
            for n in self.names
        }
        qmodel = quantize(self.model, PrecisionPlan(plan, default="fp32"), backend=self.impl)
        return _capture_inputs(qmodel, self.example_input, self.names, chosen=True)[0]

    def row(self, layer: nn.Module, name: str, scheme: Scheme) -> list[Any]:
        """``[layer, scheme, memory_bytes, latency_ms, supported, reason, kernel]`` of one pair."""
        impl = self.impl
        why = applicability_error(layer, scheme) or impl.unsupported_reason(layer, scheme)
        if why:
            return [name, scheme.name, None, None, False, why, ""]
        x = self.inputs[name]
        kernel, ms = "", None
        if isinstance(impl, KernelBackend):
            chosen, ms, module = self.tune(layer, name, scheme)
            if module is None:
                module = impl.build(chosen, standard_form(layer), scheme)
            module = with_own_forward(layer, module)
            kernel, memory = chosen.name, storage_bytes(module)
            own = {_storage_key(t) for t in layer.parameters()}
            if any(_storage_key(t) in own for t in module.parameters()):
                self.as_is.append((name, scheme.name))  # its bytes stay the layer's own
        elif impl.real:
            module = with_own_forward(layer, impl.quantize_layer(layer, scheme))
            memory = storage_bytes(module)
        elif scheme.name == "fp32":
            module, memory = layer, _own_bytes(layer)
        else:
            module = with_own_forward(layer, impl.quantize_layer(layer, scheme))
            memory = ideal_layer_bytes(layer, scheme)
            if isinstance(module, OwnForward):  # the subclass's own tensors (Gemma's scale)
                memory += sum(tensor_bytes(t) for t in module.buffers(recurse=False))
        if impl.real and name in self.tied:  # quantize shares equal tensors with its partners
            self.tables[(name, scheme.name)] = _tensors(module)
        if ms is None:
            ms = self.time_layer(module, x)
        return [name, scheme.name, int(memory), ms * self.calls[name], True, "", kernel]

    def time_layer(self, module: nn.Module, x: torch.Tensor | LayerCall) -> float:
        """Median ms of one call of ``module`` on ``x`` (a :class:`LayerCall`: its whole call),
        timed with the cost model's settings."""
        flush = None
        if self.settings.get("cold"):
            flush = cache_flusher(last_level_cache_bytes() or FLUSH_BYTES)
        with threads(self.settings["num_threads"]):
            return median_ms(
                lambda: call_layer(module, x),
                repeats=self.settings["repeats"],
                warmup=self.settings["warmup"],
                timer=self.settings["timer"],
                stable=self.settings.get("stable"),
                setup=flush,
            )

    def tune(
        self, layer: nn.Module, name: str, scheme: Scheme
    ) -> tuple[Kernel, float | None, nn.Module | None]:
        """The fastest implementation of ``layer`` in ``scheme`` on its real input, its time
        and the module timed (``None`` for both: not timed here, by the caller). Picks already
        made on this machine for the same layer signature and input are reused."""
        impl = self.impl
        assert isinstance(impl, KernelBackend)
        kernels = {k.name: k for k in impl.candidates(layer, scheme)}
        if len(kernels) == 1 or self.tune_cache is None or scheme.name in self.untuned:
            return next(iter(kernels.values())), None, None
        x, key = self.inputs[name], choice_key(layer, scheme)
        entry = TuneCache.entry(key, x)
        tuned = self.tune_cache.get(entry)
        built: dict[str, nn.Module] = {}
        if tuned is None or set(tuned.times_ms) != set(kernels):
            form = standard_form(layer)

            def time_ms(k: str) -> float:
                built[k] = impl.build(kernels[k], form, scheme)
                return self.time_layer(built[k], x)

            tuned = fastest(list(kernels), time_ms)
            self.tune_cache.put(entry, tuned)
        # One choice per signature (quantize_layer sees the layer, not its input): a layer
        # whose signature was tuned on another input shape runs the first pick.
        choice = self.choices.setdefault(key, tuned.choice)
        for kernel, ms in tuned.times_ms.items():
            self.tuning.append(
                [name, scheme.name, kernel, ms * self.calls[name], kernel == choice,
                 tuned.errors.get(kernel, "")]
            )  # fmt: skip
        return kernels[choice], tuned.times_ms[choice], built.get(choice)

    def uniform_point(
        self, scheme: Scheme, rows: Mapping[tuple[str, str], list[Any]]
    ) -> dict[str, Any] | None:
        """End-to-end time of the uniform plan of ``scheme`` (unsupported layers stay fp32)
        next to the sum of its per-layer times: a point the latency model is fitted on.

        Where the autotuner switched some of its layers from the default kernel, the plan is
        also timed on the default kernels: ``None`` when those ran it faster (layers timed
        alone are not timed in their model), and the scheme's picks are dropped."""
        assignment = {n: scheme.name if rows[(n, scheme.name)][4] else "fp32" for n in self.names}
        plan = PrecisionPlan(assignment, default="fp32")
        impl = self.impl.tuned(self.choices) if isinstance(self.impl, KernelBackend) else self.impl
        measured = _time_model(
            quantize(self.model, plan, backend=impl), self.example_input, self.settings
        )
        picked = {k for k in self.choices if k.startswith(f"{scheme.name} ")}
        if picked and scheme.name not in self.untuned:
            default = self.impl.tuned({k: v for k, v in self.choices.items() if k not in picked})
            model = quantize(self.model, plan, backend=default)
            if _time_model(model, self.example_input, self.settings) < measured:
                for key in picked:
                    del self.choices[key]
                first = set()  # each pair's first timed kernel: the default, now the one kept
                for t in self.tuning:
                    if t[1] == scheme.name:
                        t[4] = t[0] not in first
                        first.add(t[0])
                self.as_is = [a for a in self.as_is if a[1] != scheme.name]
                self.tables = {k: v for k, v in self.tables.items() if k[1] != scheme.name}
                return None
        return {
            "plan": f"uniform {scheme.name}",
            "layer_sum_ms": float(sum(rows[(n, s)][3] for n, s in assignment.items())),
            "measured_ms": measured,
        }


__all__ = [
    "COLUMNS",
    "TUNING_COLUMNS",
    "CostModel",
    "held_bytes",
    "ideal_layer_bytes",
    "measure_cost",
]
