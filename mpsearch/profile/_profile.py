"""``profile(model, calib_data, schemes=...)``: per-layer error under each scheme, cached."""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from mpsearch._data import as_batches, batch_size
from mpsearch._validation import invalid, unknown
from mpsearch.backends import get_backend
from mpsearch.layers import quantizable_layers, swapped
from mpsearch.profile._cache import CODE_VERSION, RowCache, hash_batches, hash_model, hash_text
from mpsearch.profile._e2e import (
    check_e2e_samples,
    choose_e2e_samples,
    first_samples,
    total_samples,
)
from mpsearch.profile._emulate import profile_layer
from mpsearch.profile._hessian import hutchinson_traces
from mpsearch.profile._metrics import (
    E2EScorer,
    E2EStats,
    LocalStats,
    call_metric,
    callable_id,
    resolve_metric,
    signal_of,
)
from mpsearch.profile._result import COLUMNS, SensitivityProfile
from mpsearch.profile._runner import build_runner
from mpsearch.schemes import Scheme, fake_quantize, get_scheme

DEFAULT_SCHEMES: tuple[str, ...] = ("bf16", "w8a8", "w4a16")


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


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.is_floating_point() else True


def _add_local(local: list[LocalStats], pairs: list[list[tuple[torch.Tensor, ...]]]) -> None:
    """Add each scheme's (reference, quantized) pairs; the signal of a reference tensor shared
    by several schemes is computed once (keyed by the tensor itself: with the hook runner a
    layer's later calls have per-scheme references)."""
    signals: dict[int, float] = {}  # id of a reference tensor, alive in ``pairs`` meanwhile
    for stats, scheme_pairs in zip(local, pairs, strict=True):
        for y_ref, y_q in scheme_pairs:
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


def profile(
    model: nn.Module,
    calib_data: Any,
    *,
    schemes: Sequence[str | Scheme] | str = DEFAULT_SCHEMES,
    metric: str | Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    layers: Sequence[str] | None = None,
    backend: str = "simulate",
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    max_batches: int | None = None,
    fold_bn: bool = True,
    hessian_samples: int = 8,
    e2e_samples: int | str | None = "auto",
) -> SensitivityProfile:
    """Measure each quantizable layer's error under each scheme, one layer quantized at a time.

    For every (layer, scheme) pair the layer alone is quantized (``backend``, default fake
    quantization) and compared with the fp32 model on ``calib_data``:

    - ``mse`` / ``sqnr_db``: the layer's own output vs its fp32 output, from cached inputs;
    - ``e2e``: the error of the model's final output, by ``metric``: ``"kl"`` (KL divergence of
      the softmax over the last dimension), ``"mse"``, or ``callable(ref_out, out) -> float``
      (averaged over batches, weighted by batch size). ``None`` chooses automatically: ``"kl"``
      for a floating output with >= 2 dimensions and a last dimension >= 2 (logits), else
      ``"mse"``;
    - ``task_drop``: ``evaluate(fp32 model) - evaluate(quantized model)`` when ``evaluate`` is
      given (one ``evaluate`` call per pair: the costly part);
    - ``hessian``: with ``loss_fn(output, batch) -> scalar``, the HAWQ-V2 score
      ``tr(H_W)/numel(W) * ||Q(W) - W||^2`` with the trace estimated by Hutchinson's method
      (``hessian_samples`` Hessian-vector products per batch, each about one backward pass).

    Speed: the model is traced with torch.fx; one fp32 pass caches what later runs need, and
    for each layer only the part of the network downstream of it is re-run, several schemes at
    once concatenated along the batch dimension where that saves work. CPU max pooling runs as
    an exact, faster maximum of strided views. Models that do not trace fall back to forward
    hooks (the whole model re-run per pair). BatchNorm is folded into the preceding conv
    (``fold_bn=True``) so that the folded weight is what gets quantized. With the ``simulate``
    backend on CPU, layers computing in bf16/fp16 run as an exact-product float32 emulation
    (see ``mpsearch.profile._emulate``): CPUs without bf16 units run real bf16 convolutions
    10-45x slower than float32.

    ``e2e_samples`` picks the samples ``e2e`` is measured on (``mse``, ``sqnr_db``,
    ``task_drop`` and ``hessian`` always use all of ``calib_data``):

    - ``None``: every calibration sample (exact mode);
    - an int ``n``: the first ``n`` samples, in order (the last batch used is cut). The ``e2e``
      column then equals exact mode's on ``calib_data`` cut to those samples;
    - ``"auto"`` (default): exact mode when its end-to-end work D is at most 2 fp32 passes over
      the calibration data per scheme, else the first ``ceil(N / D)`` of the N samples (at
      least 16), which brings it to about one pass per scheme. D is the ``sum`` over layers of
      the share of the model's multiply-accumulates downstream of the layer: about L/2 on a
      ResNet (9.0 for the bundled ResNet-18: 29 of 256 samples), 1.35 for the digits CNN
      (exact). A profile then costs a few passes per scheme at any depth. D comes from the
      traced graph and the data's shapes (the hook runner counts a whole pass per layer),
      never from timings, so the choice is the same on every run. ``prof.info`` records
      ``e2e_samples``, ``calib_samples`` and ``downstream_passes`` (D).

    Cache: with ``cache_dir``, each row is appended to a JSONL file as soon as it is computed,
    keyed by hashes of the model's weights, the calibration data, the scheme definition, the
    metric, ``evaluate`` / ``loss_fn`` (name and source), the code version and the number of
    samples ``e2e`` was measured on: a killed run resumes where it stopped, a changed model
    never reuses rows, and a row measured on a subset is never reused as an exact one.

    Pairs a scheme cannot take (e.g. a group size that does not divide the layer's input
    size) are kept as ``status="skipped"`` rows with the ``reason``, and summarised in a warning.

    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    >>> prof = profile(net, [torch.randn(16, 64)], schemes=["bf16", "w4a16"], progress=False)
    >>> prof.pivot("e2e").shape
    (2, 2)
    """
    # ---- validation: everything checked before any long work -------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    batches = as_batches(calib_data)
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise invalid("max_batches", max_batches, "None or a positive integer")
        batches = batches[:max_batches]
    scheme_objs = _check_schemes(schemes)
    impl = get_backend(backend)
    why = impl.unavailable_reason()
    if why:
        raise ValueError(f"The {impl.name!r} backend cannot run here: {why}")
    _check_optional_callable("evaluate", evaluate)
    _check_optional_callable("loss_fn", loss_fn)
    if progress is not None and not isinstance(progress, bool):
        raise invalid("progress", progress, "None, True or False")
    if cache_dir is not None and not isinstance(cache_dir, (str, Path)):
        raise invalid("cache_dir", cache_dir, "None or a directory path")
    if (
        isinstance(hessian_samples, bool)
        or not isinstance(hessian_samples, int)
        or hessian_samples < 1
    ):
        raise invalid("hessian_samples", hessian_samples, "a positive integer")
    check_e2e_samples(e2e_samples)
    all_layers = list(quantizable_layers(model))
    if layers is None:
        names = all_layers
    else:
        if isinstance(layers, str) or not isinstance(layers, Iterable):
            raise invalid("layers", layers, "None or a list of quantizable layer names")
        wanted = list(layers)
        for name in wanted:
            if name not in all_layers:
                raise unknown("layers", name, all_layers)
        if not wanted:
            raise invalid("layers", layers, "None or a non-empty list of layer names")
        names = [n for n in all_layers if n in set(wanted)]
    if isinstance(metric, str) or metric is None:
        resolve_metric(metric, torch.zeros(1, 2))  # refuses unknown names now

    was_training = model.training
    model.eval()
    try:
        return _profile(
            model,
            batches,
            scheme_objs,
            names,
            metric=metric,
            evaluate=evaluate,
            loss_fn=loss_fn,
            impl=impl,
            cache_dir=None if cache_dir is None else Path(cache_dir),
            progress=progress,
            fold_bn=fold_bn,
            hessian_samples=hessian_samples,
            e2e_samples=e2e_samples,
        )
    finally:
        model.train(was_training)


def _profile(
    model: nn.Module,
    batches: list[Any],
    schemes: list[Scheme],
    names: list[str],
    *,
    metric: Any,
    evaluate: Callable[[nn.Module], float] | None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None,
    impl: Any,
    cache_dir: Path | None,
    progress: bool | None,
    fold_bn: bool,
    hessian_samples: int,
    e2e_samples: int | str | None,
) -> SensitivityProfile:
    notes: list[str] = []
    runner = build_runner(model, batches, names, fold_bn=fold_bn, warn=notes.append)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    for i, ref in enumerate(runner.outputs):
        if not _finite(ref):
            raise ValueError(
                f"The fp32 model's output on calibration batch {i} is not finite (NaN or inf); "
                "check the 'calib_data' batches and the model before profiling."
            )
    e2e_name, e2e_fn = resolve_metric(metric, runner.outputs[0])
    probe = call_metric(e2e_fn, e2e_name, runner.outputs[0], runner.outputs[0], "fp32 vs fp32")
    if not math.isfinite(probe):
        raise ValueError(f"The metric {e2e_name!r} returned {probe} for identical outputs.")
    work = runner.gm
    modules = {n: work.get_submodule(n) for n in names if n in runner.called}
    n_samples = total_samples(batches)
    downstream = runner.downstream_passes()
    n_e2e = choose_e2e_samples(e2e_samples, n_samples, downstream)
    original = quantizable_layers(model)

    # ---- rows: skips, cache keys ------------------------------------------------------------
    skip: dict[tuple[str, str], str] = {}
    for name in names:
        for scheme in schemes:
            if name not in runner.called:
                skip[(name, scheme.name)] = "the layer is never called in the model's forward pass"
                continue
            layer = modules[name]
            reason = scheme.applicability_error(tuple(layer.weight.shape))
            reason = reason or impl.unsupported_reason(layer, scheme)
            if reason:
                skip[(name, scheme.name)] = reason

    cache = None
    base_key = ""
    if cache_dir is not None:
        model_hash = hash_model(model)
        base_key = hash_text(
            CODE_VERSION,
            model_hash,
            hash_batches(batches),
            e2e_name,
            callable_id(metric if callable(metric) else None),
            callable_id(evaluate),
            callable_id(loss_fn),
            str(hessian_samples),
            impl.name,
            str(fold_bn),
            runner.mode,
            f"e2e_samples={n_e2e}",
        )
        cache = RowCache(cache_dir / f"profile-{model_hash[:16]}.jsonl")

    def row_key(name: str, scheme: Scheme) -> str:
        return hash_text(base_key, name, json.dumps(scheme.to_dict(), sort_keys=True))

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    todo: dict[str, list[Scheme]] = {}
    n_cached = 0
    for name in names:
        for scheme in schemes:
            if (name, scheme.name) in skip:
                continue
            cached = cache.get(row_key(name, scheme)) if cache is not None else None
            if cached is not None:
                rows[(name, scheme.name)] = cached
                n_cached += 1
            else:
                todo.setdefault(name, []).append(scheme)

    scorer = E2EScorer([], e2e_name, e2e_fn)
    sizes: list[int] = []
    if todo:
        runner.prepare_e2e(batches if n_e2e >= n_samples else first_samples(batches, n_e2e))
        # the references' share of the metric (e.g. their softmax), computed once for all layers
        scorer = E2EScorer(runner.reference, e2e_name, e2e_fn)
        sizes = [batch_size(b) for b in runner.e2e_batches]

    baseline = None
    if evaluate is not None:
        with torch.inference_mode():
            baseline = float(evaluate(work))
        if not math.isfinite(baseline):
            raise ValueError(f"The 'evaluate' callable returned {baseline} for the fp32 model.")

    traces: dict[str, float] = {}
    if loss_fn is not None and todo:
        traces = hutchinson_traces(work, batches, list(todo), loss_fn, samples=hessian_samples)
        for name in todo:
            modules[name].weight.requires_grad_(False)

    # ---- the work ---------------------------------------------------------------------------
    show = progress if progress is not None else sys.stderr.isatty()
    total = sum(len(v) for v in todo.values())
    bar = None
    if show and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="profile", unit="row")
    n_computed = 0
    try:
        for name, todo_schemes in todo.items():
            layer = modules[name]
            qlayers = [profile_layer(impl, layer, s) for s in todo_schemes]
            local = [LocalStats() for _ in todo_schemes]
            e2e = [E2EStats() for _ in todo_schemes]
            finals: list[torch.Tensor] = []  # per e2e batch: [scheme, *output shape]
            with torch.inference_mode():
                for b in range(len(batches)):
                    if runner.shared:
                        pairs, final = runner.run(name, qlayers, b)
                        finals.append(final)
                    else:
                        pairs = runner.local(name, qlayers, b)
                    _add_local(local, pairs)
                if not runner.shared:
                    finals = [runner.e2e(name, qlayers, b) for b in range(len(sizes))]
                _add_e2e(e2e, finals, scorer, sizes, name, todo_schemes)
            for i, scheme in enumerate(todo_schemes):
                row = {
                    "mse": local[i].mse,
                    "sqnr_db": local[i].sqnr_db,
                    "e2e": e2e[i].mean,
                    "task_drop": math.nan,
                    "hessian": math.nan,
                    "reason": "" if math.isfinite(e2e[i].mean) else "quantized output not finite",
                }
                if evaluate is not None:
                    with swapped(work, {name: qlayers[i]}), torch.inference_mode():
                        quality = float(evaluate(work))
                    row["task_drop"] = baseline - quality
                if name in traces:
                    w = layer.weight.detach().float()
                    delta = float((fake_quantize(w, scheme.weight) - w).double().pow(2).sum())
                    row["hessian"] = traces[name] * delta
                rows[(name, scheme.name)] = row
                if cache is not None:
                    cache.put(row_key(name, scheme), row)
                n_computed += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    # ---- the table --------------------------------------------------------------------------
    records = []
    for name in names:
        layer = modules.get(name, original[name])
        shape = tuple(layer.weight.shape)
        for scheme in schemes:
            base = {
                "layer": name,
                "scheme": scheme.name,
                "layer_type": type(original[name]).__name__,
                "params": int(layer.weight.numel()),
                "bits_per_weight": float(scheme.bits_per_weight(shape)),
                "weight_bytes": scheme.weight_storage_bits(shape) / 8,
            }
            if (name, scheme.name) in skip:
                nan = math.nan
                values = {"mse": nan, "sqnr_db": nan, "e2e": nan, "task_drop": nan, "hessian": nan}
                values |= {"status": "skipped", "reason": skip[(name, scheme.name)]}
            else:
                got = rows[(name, scheme.name)]
                values = {k: got[k] for k in ("mse", "sqnr_db", "e2e", "task_drop", "hessian")}
                values |= {"status": "ok", "reason": got.get("reason", "")}
            records.append(base | values)
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    table["params"] = table["params"].astype("int64")
    if skip:
        listed = "\n".join(f"  {layer} / {scheme}: {why}" for (layer, scheme), why in skip.items())
        warnings.warn(
            f"profile: {len(skip)} (layer, scheme) pairs were skipped (status='skipped'):\n{listed}",
            stacklevel=3,
        )
    return SensitivityProfile(
        table=table,
        schemes=[s.name for s in schemes],
        layers=list(names),
        e2e_metric=e2e_name,
        baseline_quality=baseline,
        info={
            "runner": runner.mode,
            "computed_rows": n_computed,
            "cached_rows": n_cached,
            "batches": len(batches),
            "fold_bn": fold_bn,
            "calib_samples": n_samples,
            "e2e_samples": n_e2e,
            "downstream_passes": round(downstream, 4),
        },
    )
