"""``profile(model, calib_data, schemes=...)``: per-layer error under each scheme, cached.

The work runs in named steps: check the call (:func:`_check_request`), run the fp32 reference
(:func:`_reference`), plan the rows (skipped pairs, cached rows, rows to compute:
:func:`_plan_rows`), measure the rows left (:class:`_Measurer`), and build the table
(:func:`_build_result`).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from mpsearch._data import (
    Batch,
    as_batches,
    batch_size,
    is_multi_label,
    output_tensor,
    token_mask,
)
from mpsearch._validation import check_module, invalid, unknown
from mpsearch.backends import Backend, get_backend
from mpsearch.backends._quantize import applicability_error
from mpsearch.layers import coverage, layer_weights, quantizable_layers, swapped, weight_shapes
from mpsearch.layers._layers import NEVER_CALLED, READ_BESIDES_CALLS, same_weights
from mpsearch.profile._cache import CODE_VERSION, RowCache, hash_batches, hash_model, hash_text
from mpsearch.profile._e2e import (
    first_samples,
    local_on_e2e,
    most_uncertain,
    picked_samples,
    rows_per_sample,
    total_samples,
    whole_batches,
)
from mpsearch.profile._emulate import compute_paths, profile_layer
from mpsearch.profile._hessian import hutchinson_traces
from mpsearch.profile._metrics import (
    E2EScorer,
    E2EStats,
    LocalStats,
    MetricFn,
    call_metric,
    callable_id,
    resolve_metric,
    signal_of,
)
from mpsearch.profile._options import ProfileOptions
from mpsearch.profile._result import COLUMNS, SensitivityProfile
from mpsearch.profile._runner import (
    GraphRunner,
    Runner,
    build_runner,
    checked_output,
    slices_by_sample,
)
from mpsearch.rounding import Rounder, RoundingOptions
from mpsearch.rounding._stats import rounding_unsupported
from mpsearch.schemes import Scheme, fake_quantize, get_scheme

DEFAULT_SCHEMES: tuple[str, ...] = ("bf16", "w8a8", "w4a16")
PROFILE_KEYWORDS = ("schemes", "evaluate", "loss_fn", "options")
"""``profile``'s own keywords (every other keyword is a :class:`ProfileOptions` field)."""
_ERRORS = ("mse", "sqnr_db", "e2e", "task_drop", "hessian")


COVERAGE_WARNING = 0.9
"""A profile warns (with what is left out) when the quantizable layers hold less than this
share of the model's parameters."""


def _check_schemes(schemes: Any) -> list[Scheme]:
    if isinstance(schemes, (str, Scheme)):
        schemes = [schemes]
    if not isinstance(schemes, Iterable):
        raise invalid("schemes", schemes, "a scheme name or a list of scheme names")
    resolved = [get_scheme(s, argument="schemes") for s in schemes]
    if not resolved:
        raise invalid("schemes", schemes, "a non-empty list of scheme names")
    names = [s.name for s in resolved]
    if len(set(names)) != len(names):
        raise invalid("schemes", names, "a list without duplicates")
    return resolved


def _check_optional_callable(argument: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise invalid(argument, value, "None or a callable")


def _add_local(local: list[LocalStats], pairs: list[list[tuple[torch.Tensor, ...]]]) -> None:
    """Add each scheme's (reference, quantized) pairs; the signal of a reference tensor shared
    by several schemes is computed once (keyed by the tensor itself: a layer called more than
    once has one per call). A layer returning a tuple (an LSTM's ``(output, (h, c))``, an LSTM
    cell's ``(h, c)``) is compared on its main output."""
    signals: dict[int, float] = {}  # id of a reference tensor, alive in ``pairs`` meanwhile
    for stats, scheme_pairs in zip(local, pairs, strict=True):
        for ref, quantized in scheme_pairs:
            y_ref, y_q = output_tensor(ref), output_tensor(quantized)
            key = id(y_ref)
            if key not in signals:
                signals[key] = signal_of(y_ref)
            stats.update(y_ref, y_q, signal=signals[key])


def _add_e2e(
    e2e: list[E2EStats],
    finals: list[torch.Tensor],
    scorer: E2EScorer,
    sizes: list[int],
    name: str,
    schemes: list[Scheme],
) -> None:
    """Add each scheme's end-to-end metric on every e2e batch (``finals[b][i]``: scheme i's
    output on e2e batch b, of ``sizes[b]`` samples; inf for a non-finite output)."""

    def where(b: int, i: int) -> str:
        return f"layer {name!r}, scheme {schemes[i].name!r}, batch {b}"

    for values, n in zip(scorer(finals, where), sizes, strict=True):
        for stats, value in zip(e2e, values, strict=True):
            stats.update(value, n)


def stack_finals(
    finals: Sequence[torch.Tensor], reference: torch.Tensor, reshaped: dict[int, str]
) -> torch.Tensor:
    """A layer's variants' final outputs on one e2e batch, ``[variant, *output shape]``. A
    variant whose output has another shape than the fp32 ``reference`` (a decision in the model
    depends on it: a speech model's predicted durations set its waveform's length) stands as
    NaN, so its end-to-end error is ``inf`` and the search leaves it out; ``reshaped[i]`` says
    how variant i changed the shape.

    >>> ref, why = torch.zeros(2, 5), {}
    >>> stack_finals([torch.ones(2, 5), torch.ones(2, 7)], ref, why)[1].isnan().all().item()
    True
    >>> why
    {1: 'quantized output changes shape: (2, 7) where the fp32 output is (2, 5)'}
    """
    out = []
    for i, final in enumerate(finals):
        if final.shape != reference.shape:
            reshaped.setdefault(
                i,
                f"quantized output changes shape: {tuple(final.shape)} where the fp32 output "
                f"is {tuple(reference.shape)}",
            )
            final = torch.full_like(reference, math.nan)
        out.append(final)
    return torch.stack(out)


def profile(
    model: nn.Module,
    calib_data: Any,
    *,
    schemes: Sequence[str | Scheme] | str = DEFAULT_SCHEMES,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    options: ProfileOptions | None = None,
    **overrides: Any,
) -> SensitivityProfile:
    """Measure each quantizable layer's error under each scheme, one layer quantized at a time.

    For every (layer, scheme) pair the layer alone is quantized (``backend``, default fake
    quantization) and compared with the fp32 model on ``calib_data``:

    - ``mse`` / ``sqnr_db``: the layer's own output vs its fp32 output, from cached inputs,
      on the samples ``local_samples`` picks;
    - ``e2e``: the error of the model's final output by ``metric`` (``"kl"`` of the softmax
      over the last dimension, ``"kl_channels"`` over dimension 1, ``"bernoulli_kl"`` of a
      multi-label classifier's sigmoids, ``"mse"`` or a callable; ``None``: KL for logits,
      else ``"mse"``: :func:`auto_metric`), on the samples
      ``e2e_samples`` picks (see :class:`ProfileOptions`);
    - ``task_drop``: ``evaluate(fp32 model) - evaluate(quantized model)`` when ``evaluate`` is
      given (one ``evaluate`` call per pair: the costly part);
    - ``hessian``: with ``loss_fn(output, batch) -> scalar``, the HAWQ-V2 score
      ``tr(H_W)/numel(W) * ||Q(W) - W||^2``, the trace estimated by Hutchinson's method.

    How it runs is :class:`ProfileOptions` (``options``); any of its fields given as a keyword
    (``metric="mse"``, ``cache_dir=...``, ``e2e_samples=None``...) overrides it, and an unknown
    keyword raises ``TypeError`` listing the accepted ones. Everything is checked before any
    long work.

    Speed: the model is captured as one graph (torch.fx, with constant defaults fixed or with
    example values if need be, else torch.export: :mod:`mpsearch.profile._capture`); one fp32
    pass caches what later runs need, and for each layer only the part of the network
    downstream of it is re-run (see :mod:`mpsearch.profile._runner`). Models no capture handles
    fall back to forward hooks, with a warning saying why. The ``runner`` column and
    ``info["runner"]`` name the runner (``graph:fx``, ``graph:fx(concrete_args)``,
    ``graph:fx(values)``, ``graph:export``, ``hooks``) and ``info["runner_fallbacks"]`` why
    each capture tried before it failed.
    BatchNorm is folded into the preceding conv (``fold_bn``) so that the folded weight is what
    gets quantized. With ``cache_dir`` each row is appended to a JSONL file as soon as it is
    computed, keyed by hashes of everything it depends on: a killed run resumes where it
    stopped. Pairs a scheme cannot take are kept as ``status="skipped"`` rows with the
    ``reason``, and summarised in a warning.

    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    >>> prof = profile(net, [torch.randn(16, 64)], schemes=["bf16", "w4a16"], progress=False)
    >>> prof.pivot("e2e").shape
    (2, 2)
    >>> opts = ProfileOptions(metric="mse", e2e_samples=None)
    >>> profile(net, [torch.randn(16, 64)], schemes=["w8a8"], options=opts).e2e_metric
    'mse'
    """
    opts = ProfileOptions.resolve(options, overrides, also=PROFILE_KEYWORDS)
    request = _check_request(model, calib_data, schemes, evaluate, loss_fn, opts)
    was_training = model.training
    model.eval()
    try:
        return _profile(request)
    finally:
        model.train(was_training)


@dataclass
class _Request:
    """A checked ``profile`` call."""

    model: nn.Module
    batches: list[Any]
    schemes: list[Scheme]
    names: list[str]
    impl: Backend
    evaluate: Callable[[nn.Module], float] | None
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None
    options: ProfileOptions


def _check_request(
    model: Any,
    calib_data: Any,
    schemes: Any,
    evaluate: Any,
    loss_fn: Any,
    opts: ProfileOptions,
) -> _Request:
    """Everything ``profile`` needs, checked before any long work."""
    check_module(model)
    batches = as_batches(calib_data)
    if opts.max_batches is not None:
        batches = batches[: opts.max_batches]
    scheme_objs = _check_schemes(schemes)
    impl = get_backend(opts.backend)
    why = impl.unavailable_reason()
    if why:
        raise ValueError(f"The {impl.name!r} backend cannot run here: {why}")
    _check_optional_callable("evaluate", evaluate)
    _check_optional_callable("loss_fn", loss_fn)
    all_layers = list(quantizable_layers(model))
    names = all_layers
    if opts.layers is not None:
        for name in opts.layers:
            if name not in all_layers:
                raise unknown("layers", name, all_layers)
        names = [n for n in all_layers if n in set(opts.layers)]
    return _Request(model, batches, scheme_objs, names, impl, evaluate, loss_fn, opts)


def _profile(req: _Request) -> SensitivityProfile:
    runner, e2e_name, e2e_fn = _reference(req)
    plan = _plan_rows(req, runner, e2e_name)
    measurer = _Measurer.start(req, runner, plan, e2e_name, e2e_fn)
    measurer.measure_all()
    return _build_result(req, runner, plan, e2e_name, measurer)


def _reference(req: _Request) -> tuple[Runner, str, MetricFn]:
    """The runner (its fp32 pass done) and the end-to-end metric, both checked."""
    notes: list[str] = []
    runner = build_runner(
        req.model,
        req.batches,
        req.names,
        fold_bn=req.options.fold_bn,
        warn=notes.append,
        e2e_samples=req.options.e2e_samples,
        local_samples=req.options.local_samples,
        n_schemes=len(req.schemes),
    )
    for note in notes:
        warnings.warn(note, stacklevel=4)
    for i, ref in enumerate(runner.outputs):  # the graph runner's others: as they are run
        checked_output(i, ref)
    e2e_name, e2e_fn = resolve_metric(
        req.options.metric,
        runner.outputs[0],
        runner.output_name,
        multi_label=is_multi_label(req.model),
    )
    probe = call_metric(e2e_fn, e2e_name, runner.outputs[0], runner.outputs[0], "fp32 vs fp32")
    if not math.isfinite(probe):
        raise ValueError(f"The metric {e2e_name!r} returned {probe} for identical outputs.")
    return runner, e2e_name, e2e_fn


@dataclass
class _RowPlan:
    """Which rows are skipped (with the reason), found in the cache, or left to compute."""

    n_samples: int
    downstream: float
    n_e2e: int
    pick: str  # which samples the e2e errors use: "all", "first", "uncertain" or "batches"
    skip: dict[tuple[str, str], str] = field(default_factory=dict)
    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    todo: dict[str, list[Scheme]] = field(default_factory=dict)
    cache: RowCache | None = None
    base_key: str = ""
    n_cached: int = 0

    def key(self, name: str, scheme: Scheme) -> str:
        """The cache key of the row (``name``, ``scheme``)."""
        return hash_text(self.base_key, name, json.dumps(scheme.to_dict(), sort_keys=True))


def _plan_rows(req: _Request, runner: Runner, e2e_name: str) -> _RowPlan:
    n_samples = total_samples(req.batches)
    n_e2e = runner.n_e2e
    pick = _pick(req, runner, e2e_name, n_e2e < n_samples)
    if isinstance(runner, GraphRunner) and local_on_e2e(req.options.local_samples, pick, n_e2e):
        runner.use_e2e_for_local()
    plan = _RowPlan(n_samples, runner.downstream_passes(), n_e2e, pick, skip=_skipped(req, runner))
    if req.options.cache_dir is not None:
        plan.base_key, plan.cache = _open_cache(req, runner, e2e_name, n_e2e, pick)
    for name in req.names:
        for scheme in req.schemes:
            if (name, scheme.name) in plan.skip:
                continue
            cached = plan.cache.get(plan.key(name, scheme)) if plan.cache is not None else None
            if cached is not None:
                plan.rows[(name, scheme.name)] = cached
                plan.n_cached += 1
            else:
                plan.todo.setdefault(name, []).append(scheme)
    return plan


def _skipped(req: _Request, runner: Runner) -> dict[tuple[str, str], str]:
    """(layer, scheme) pairs that cannot be measured, with the reason."""
    skip: dict[tuple[str, str], str] = {}
    for name in req.names:
        for scheme in req.schemes:
            if name not in runner.called or name in runner.read_directly:
                why = READ_BESIDES_CALLS if name in runner.called else NEVER_CALLED
                skip[(name, scheme.name)] = why
                continue
            layer = runner.gm.get_submodule(name)
            reason = applicability_error(layer, scheme)
            reason = reason or req.impl.unsupported_reason(layer, scheme)
            if scheme.rounding != "rtn":
                reason = reason or rounding_unsupported(layer)
            if reason:
                skip[(name, scheme.name)] = reason
    return skip


def _open_cache(
    req: _Request, runner: Runner, e2e_name: str, n_e2e: int, pick: str
) -> tuple[str, RowCache]:
    """The rows' base cache key (everything a row depends on) and the model's row cache."""
    opts = req.options
    model_hash = hash_model(req.model)
    base_key = hash_text(
        CODE_VERSION,
        model_hash,
        hash_batches(req.batches),
        e2e_name,
        callable_id(opts.metric if callable(opts.metric) else None),
        callable_id(req.evaluate),
        callable_id(req.loss_fn),
        str(opts.hessian_samples),
        req.impl.name,
        str(opts.fold_bn),
        repr(opts.rounding or RoundingOptions()),
        runner.mode,
        f"e2e_samples={n_e2e}",
        f"local_samples={runner.n_local}" + (" (e2e)" if runner.local_on_e2e else ""),
        f"e2e_pick={pick}",
        f"compute={compute_paths(req.impl, req.schemes)}",
    )
    return base_key, RowCache(Path(opts.cache_dir) / f"profile-{model_hash[:16]}.jsonl")


def _pick(req: _Request, runner: Runner, e2e_name: str, subset: bool) -> str:
    """Which samples the end-to-end errors are measured on: ``"all"``, the first ``n_e2e``
    (``"first"``) or, for ``e2e_samples="auto"`` with the KL metric on one distribution per
    sample, the ``n_e2e`` whose fp32 output is least certain (``"uncertain"``).

    A trained classifier's KL is carried by its few uncertain samples; measured on the trained
    digits ResNet-18 (15 of 256 samples), the uncertain ones rank the (layer, scheme) rows
    with Spearman 0.993 against exact mode (lowest per-scheme 0.943), the first ones 0.946
    (0.762). Where a sample holds many distributions (a language model's tokens) the first
    ones are already a mixed sample and picking by mean entropy ranked no better
    (``benchmarks/bench_e2e_samples.py``), so ``"uncertain"`` is used for one distribution
    per sample only.

    Where cutting a batch's tensors by their leading dimension does not cut it into samples
    (a sequence-first model: ``[time, batch, ...]``; checked by :func:`slices_by_sample`), the
    first whole batches holding ``n_e2e`` samples are used (``"batches"``)."""
    if not subset:
        return "all"
    if not slices_by_sample(runner):
        return "batches"
    one_row = rows_per_sample(runner.outputs[0]) == 1
    return (
        "uncertain"
        if req.options.e2e_samples == "auto" and e2e_name == "kl" and one_row
        else "first"
    )


def _e2e_batches(batches: Sequence[Batch], runner: Runner, plan: _RowPlan) -> Sequence[Batch]:
    """The samples :func:`_pick` chose, as batches."""
    if plan.pick == "all":
        return batches
    if plan.pick == "uncertain":
        return picked_samples(batches, most_uncertain(runner.all_outputs(), plan.n_e2e))
    if plan.pick == "batches":
        return batches[: whole_batches(batches, plan.n_e2e - 1) + 1]
    return first_samples(batches, plan.n_e2e)


@dataclass
class _Measurer:
    """Computes the rows left to compute: what every layer's rows share, then layer by layer."""

    req: _Request
    runner: Runner
    plan: _RowPlan
    scorer: E2EScorer
    sizes: list[int]
    baseline: float | None
    traces: dict[str, float]
    rounder: Rounder | None = None
    n_computed: int = 0

    @classmethod
    def start(
        cls, req: _Request, runner: Runner, plan: _RowPlan, e2e_name: str, e2e_fn: MetricFn
    ) -> _Measurer:
        """The e2e batches and references, the fp32 ``evaluate`` score, the Hessian traces."""
        scorer, sizes = E2EScorer([], e2e_name, e2e_fn), []
        if plan.todo:
            runner.prepare_e2e(_e2e_batches(req.batches, runner, plan))
            # the references' share of the metric (e.g. their softmax), computed once
            pairs = zip(runner.e2e_batches, runner.reference, strict=True)
            masks = [token_mask(b, r) for b, r in pairs]  # per-token outputs: padding left out
            scorer = E2EScorer(runner.reference, e2e_name, e2e_fn, masks)
            sizes = [batch_size(b) for b in runner.e2e_batches]
        baseline = None
        if req.evaluate is not None:
            with torch.inference_mode():
                baseline = float(req.evaluate(runner.gm))
            if not math.isfinite(baseline):
                raise ValueError(f"The 'evaluate' callable returned {baseline} for the fp32 model.")
        traces: dict[str, float] = {}
        if req.loss_fn is not None and plan.todo:
            samples = req.options.hessian_samples
            todo = list(plan.todo)
            traces = hutchinson_traces(runner.gm, req.batches, todo, req.loss_fn, samples=samples)
            for name in todo:
                for w in layer_weights(runner.gm.get_submodule(name)).values():
                    w.requires_grad_(False)
        rounder = None
        rounded = [
            n for n, schemes in plan.todo.items() if any(s.rounding != "rtn" for s in schemes)
        ]
        if rounded:  # one pass gathers every rounded layer's input statistics
            rounder = Rounder(runner.gm, req.batches, options=req.options.rounding)
            rounder.stats(rounded)
        return cls(req, runner, plan, scorer, sizes, baseline, traces, rounder)

    def measure_all(self) -> None:
        """Every row left to compute, cached as soon as it is (with a progress bar if asked)."""
        progress = self.req.options.progress
        show = progress if progress is not None else sys.stderr.isatty()
        total = sum(len(v) for v in self.plan.todo.values())
        bar = None
        if show and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="profile", unit="row")
        try:
            for name, schemes in self.plan.todo.items():
                for scheme, row in zip(schemes, self.layer_rows(name, schemes), strict=True):
                    self.plan.rows[(name, scheme.name)] = row
                    if self.plan.cache is not None:
                        self.plan.cache.put(self.plan.key(name, scheme), row)
                    self.n_computed += 1
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def layer_rows(self, name: str, schemes: list[Scheme]) -> list[dict[str, Any]]:
        """The rows of layer ``name`` under ``schemes``: local and end-to-end errors from the
        runner, then ``task_drop`` and ``hessian`` where asked."""
        runner = self.runner
        layer = runner.gm.get_submodule(name)
        sources = [
            layer if s.rounding == "rtn" or self.rounder is None else self.rounder.layer(name, s)
            for s in schemes
        ]
        qlayers = [
            profile_layer(self.req.impl, src, s) for src, s in zip(sources, schemes, strict=True)
        ]
        local = [LocalStats() for _ in schemes]
        e2e = [E2EStats() for _ in schemes]
        finals: list[torch.Tensor] = []  # per e2e batch: [scheme, *output shape]
        reshaped: dict[int, str] = {}  # scheme index -> how it changed the output's shape
        with torch.inference_mode():
            for b in range(max(runner.n_shared, runner.n_local_batches)):
                if b < runner.n_shared:
                    pairs, final = runner.run(name, qlayers, b)
                    finals.append(stack_finals(final, self.scorer.refs[b], reshaped))
                else:
                    pairs = runner.local(name, qlayers, b)
                if b < runner.n_local_batches:
                    _add_local(local, pairs)
            for b in range(runner.n_shared, len(self.sizes)):
                pairs, final = runner.e2e(name, qlayers, b)
                if runner.local_on_e2e:
                    _add_local(local, pairs)
                finals.append(stack_finals(final, self.scorer.refs[b], reshaped))
            _add_e2e(e2e, finals, self.scorer, self.sizes, name, schemes)
        rows = []
        for i, scheme in enumerate(schemes):
            finite = math.isfinite(e2e[i].mean)
            row = {
                "mse": local[i].mse,
                "sqnr_db": local[i].sqnr_db,
                "e2e": e2e[i].mean,
                "task_drop": math.nan,
                "hessian": math.nan,
                "reason": "" if finite else reshaped.get(i, "quantized output not finite"),
            }
            if self.req.evaluate is not None and self.baseline is not None:
                with swapped(runner.gm, {name: qlayers[i]}), torch.inference_mode():
                    quality = float(self.req.evaluate(runner.gm))
                row["task_drop"] = self.baseline - quality
            if name in self.traces:
                delta = sum(
                    float(
                        (fake_quantize(q.detach().float(), scheme.weight) - w).double().pow(2).sum()
                    )
                    for q, w in zip(
                        layer_weights(sources[i]).values(),
                        layer_weights(layer).values(),
                        strict=True,
                    )
                )
                row["hessian"] = self.traces[name] * delta
            rows.append(row)
        return rows


def _build_result(
    req: _Request, runner: Runner, plan: _RowPlan, e2e_name: str, measurer: _Measurer
) -> SensitivityProfile:
    """The long-format table (one row per (layer, scheme)) and the profile around it."""
    original = quantizable_layers(req.model)
    records = []
    for name in req.names:
        layer = runner.gm.get_submodule(name) if name in runner.called else original[name]
        shapes = weight_shapes(layer)
        params = sum(math.prod(shape) for shape in shapes)
        for scheme in req.schemes:
            bits = sum(scheme.weight_storage_bits(shape) for shape in shapes)
            base = {
                "layer": name,
                "scheme": scheme.name,
                "layer_type": type(original[name]).__name__,
                "params": params,
                "bits_per_weight": float(bits / params),
                "weight_bytes": bits / 8,
            }
            if (name, scheme.name) in plan.skip:
                values = dict.fromkeys(_ERRORS, math.nan)
                values |= {
                    "status": "skipped",
                    "reason": plan.skip[(name, scheme.name)],
                    "runner": "",
                }
            else:
                got = plan.rows[(name, scheme.name)]
                values = {k: got[k] for k in _ERRORS}
                values |= {"status": "ok", "reason": got.get("reason", ""), "runner": runner.mode}
            records.append(base | values)
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    table["params"] = table["params"].astype("int64")
    if plan.skip:
        listed = "\n".join(f"  {lay} / {sch}: {why}" for (lay, sch), why in plan.skip.items())
        warnings.warn(
            f"profile: {len(plan.skip)} (layer, scheme) pairs were skipped "
            f"(status='skipped'):\n{listed}",
            stacklevel=4,
        )
    left_out = table[(table["status"] == "ok") & (table["e2e"] == math.inf)]
    if len(left_out):
        listed = "\n".join(
            f"  {r.layer} / {r.scheme}: {r.reason}" for r in left_out.itertuples(index=False)
        )
        warnings.warn(
            f"profile: {len(left_out)} (layer, scheme) pairs have an infinite end-to-end error "
            f"(the search leaves them out):\n{listed}",
            stacklevel=4,
        )
    rounder = None
    if any(s.rounding != "rtn" for s in req.schemes):
        rounder = measurer.rounder
        if rounder is None or not same_weights(runner.gm, req.model, rounder.layers):
            rounder = Rounder(req.model, req.batches, options=req.options.rounding)
    covered = coverage(req.model)
    if covered.share < COVERAGE_WARNING:
        warnings.warn(f"profile: {covered.summary()}.", stacklevel=4)
    return SensitivityProfile(
        table=table,
        schemes=[s.name for s in req.schemes],
        layers=list(req.names),
        e2e_metric=e2e_name,
        baseline_quality=measurer.baseline,
        rounder=rounder,
        info={
            "runner": runner.mode,
            "runner_fallbacks": dict(runner.fallbacks),
            "capture_s": round(runner.capture_s, 3),
            "computed_rows": measurer.n_computed,
            "cached_rows": plan.n_cached,
            "batches": len(req.batches),
            "fold_bn": req.options.fold_bn,
            "calib_samples": plan.n_samples,
            "e2e_samples": plan.n_e2e,
            "e2e_pick": plan.pick,
            "local_samples": runner.n_local,
            "downstream_passes": round(plan.downstream, 4),
            "compute": compute_paths(req.impl, req.schemes),
            "coverage": covered.share,
            "coverage_note": covered.summary(),
        },
    )
