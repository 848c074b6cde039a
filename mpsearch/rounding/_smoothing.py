"""SmoothQuant-style scale migration: activation outliers moved from a normalisation's output
into the weights of the Linear layers it feeds (Xiao et al. 2023), for w8a8 quantization."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from mpsearch._data import as_batches, copied, output_tensor, run_model
from mpsearch._validation import (
    check_fraction,
    check_module,
    check_positive,
    invalid,
    unknown,
    wrong_type,
)
from mpsearch.layers._layers import is_hf_conv1d, is_quantizable, standard_form
from mpsearch.schemes import QuantSpec, Scheme, get_scheme
from mpsearch.schemes._fakequant import fake_quantize, group_error

SCALE_RANGE: tuple[float, float] = (1e-5, 1e5)
"""Smoothing factors are clamped to this range."""

_WEIGHT_FLOOR = 1e-5  # a weight column's max is floored here (an all-zero column)

NOT_FROM_NORM = "input is not a normalisation output"

AUTO_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""The migration strengths ``alpha="auto"`` tries for each normalisation (besides no fold)."""

_ERROR_ROWS = 4096  # at most this many rows of a normalisation's output judge its fold
_ERROR_BYTES = 256 * 2**20  # and the rows kept for all normalisations take at most this

TABLE_COLUMNS = [
    "layer",
    "source",
    "smoothed",
    "reason",
    "act_outlier_ratio_before",
    "act_outlier_ratio_after",
    "max_scale",
    "alpha",
    "error_before",
    "error_after",
]


@dataclass
class SmoothingResult:
    """What :func:`smooth_activations` returns.

    - ``model``: the smoothed copy (eval mode); the model passed in is untouched;
    - ``table``: one row per Linear-like layer considered (``layer``, ``source``: the
      normalisation module feeding it, missing when none does, ``smoothed``, ``reason``: why not, ``""``
      when smoothed, ``act_outlier_ratio_before`` / ``_after``: max over input channels of the
      per-channel absolute max divided by their median, ``max_scale``: the largest factor
      ``s_j`` of its normalisation, ``NaN`` when not smoothed, ``alpha``: the migration strength
      of its normalisation's fold (``NaN`` when not smoothed), ``error_before`` / ``_after``: the
      quantization error of its normalisation's Linear consumers together under ``scheme``
      on held-out calibration rows (see :func:`_held_out_error`) without and with the fold,
      ``NaN`` when not judged);
    - ``scales``: ``{normalisation name: s}`` (one factor per channel) of the folds kept;
    - ``alpha``: the migration strength asked for (a number, or ``"auto"``);
    - ``alphas``: ``{normalisation name: alpha}`` of the folds kept.
    """

    model: nn.Module
    table: pd.DataFrame
    scales: dict[str, Tensor] = field(default_factory=dict)
    alpha: float | str = 0.5
    alphas: dict[str, float] = field(default_factory=dict)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` (subclasses included) or Hugging Face's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_affine_norm_candidate(module: nn.Module) -> bool:
    """Whether ``module`` looks like an elementwise-affine normalisation: a leaf module, not a
    quantizable layer, whose only own parameters are a 1-D ``weight`` and an optional 1-D
    ``bias`` of the same size (``nn.LayerNorm``, Hugging Face RMSNorms...). That its output is
    linear in them is checked numerically when folding."""
    if next(module.children(), None) is not None or is_quantizable(module):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or weight.dim() != 1 or not set(params) <= {"weight", "bias"}:
        return False
    return bias is None or (bias.dim() == 1 and bias.shape == weight.shape)


def outlier_ratio(channel_max: Tensor) -> float:
    """Max over channels of the per-channel absolute max, over their median (``inf`` when the
    median is 0).

    >>> outlier_ratio(torch.tensor([1.0, 2.0, 2.0, 8.0]))
    4.0
    """
    values = channel_max.double()
    median = float(torch.quantile(values, 0.5))
    top = float(values.max())
    if median == 0.0:
        return math.inf if top > 0 else 1.0
    return top / median


def smoothing_scales(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's factors ``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` (float64),
    weight maxima floored at 1e-5, clamped to :data:`SCALE_RANGE`, 1 where ``max|X_j| = 0``.

    >>> smoothing_scales(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 2.0]), 0.5).tolist()
    [2.0, 1.0]
    """
    act = act_max.double()
    weight = weight_max.double().clamp_min(_WEIGHT_FLOOR)
    scales = (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp(*SCALE_RANGE)
    return torch.where(act > 0, scales, torch.ones_like(scales))


def _column_max(layer: nn.Module) -> Tensor:
    """Per input channel, the max absolute weight of ``layer`` (``max_i |W_ij|``)."""
    return standard_form(layer).weight.detach().abs().amax(dim=0)


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


@dataclass
class _Observed:
    """What one calibration pass saw."""

    act_max: dict[str, Tensor]  # Linear-like layer -> per-input-channel abs max, all batches
    sources: dict[str, list[str | None]]  # Linear-like layer -> producing norm per call (batch 0)
    norm_calls: dict[str, tuple[tuple[Any, ...], dict[str, Any], Tensor]]  # first call, batch 0
    reference: Tensor  # the model's output on batch 0
    norm_rows: dict[str, list[Tensor]]  # norm -> per batch, rows of its first call's output


def _observe(
    model: nn.Module, batches: list[Any], linears: dict[str, nn.Module], norms: dict[str, nn.Module]
) -> _Observed:
    act_max: dict[str, Tensor] = {}
    sources: dict[str, list[str | None]] = {name: [] for name in linears}
    norm_calls: dict[str, tuple[tuple[Any, ...], dict[str, Any], Tensor]] = {}
    norm_rows: dict[str, list[Tensor]] = {name: [] for name in norms}
    batch = [0]
    width = sum(int(m.weight.numel()) for m in norms.values())
    rows = min(_ERROR_ROWS, _ERROR_BYTES // max(1, 4 * width))  # float32 rows, all norms
    per_batch = max(1, rows // len(batches))
    produced: dict[int, tuple[str, Tensor]] = {}  # id(output) -> (norm, output kept alive)
    first = [True]

    def norm_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() == 0:
                return
            if output.shape[-1] != module.weight.numel():
                return
            if len(norm_rows[name]) == batch[0]:
                norm_rows[name].append(_spaced_rows(output.detach(), per_batch).clone())
            if not first[0]:
                return
            produced[id(output)] = (name, output)
            if name not in norm_calls:  # copies: the model may later change them in place
                norm_calls[name] = (copied(args), copied(kwargs), output.detach().clone())

        return hook

    def linear_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = _input_of(args, kwargs)
            if not isinstance(x, Tensor) or x.dim() == 0:
                return
            seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double()
            act_max[name] = torch.maximum(act_max[name], seen) if name in act_max else seen
            if first[0]:
                hit = produced.get(id(x))
                sources[name].append(hit[0] if hit is not None and hit[1] is x else None)

        return hook

    handles = [
        m.register_forward_hook(norm_hook(n), with_kwargs=True) for n, m in norms.items()
    ] + [m.register_forward_pre_hook(linear_hook(n), with_kwargs=True) for n, m in linears.items()]
    try:
        with torch.no_grad():
            reference = output_tensor(run_model(model, batches[0])).detach().clone()
            first[0] = False
            produced.clear()
            for batch[0], inputs in enumerate(batches[1:], start=1):
                run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return _Observed(act_max, sources, norm_calls, reference, norm_rows)


def _relative_error(output: Tensor, reference: Tensor) -> float:
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    err = float((output.double() - reference.double()).abs().max()) if output.numel() else 0.0
    return err / scale if scale > 0 else err


class _Fold:
    """One normalisation and its Linear consumers, with their parameters before folding."""

    def __init__(self, norm_name: str, norm: nn.Module, consumers: dict[str, nn.Module]) -> None:
        self.norm_name = norm_name
        self.norm = norm
        self.consumers = consumers
        self.scales = torch.ones(norm.weight.numel(), dtype=torch.float64)
        self.alpha = math.nan
        self.error_before = self.error_after = math.nan
        self.bias: Tensor | None = getattr(norm, "bias", None)
        params = [norm.weight] + ([self.bias] if self.bias is not None else [])
        params += [layer.weight for layer in consumers.values()]
        self.saved = [(p, p.detach().clone()) for p in params]

    def apply(self, scales: Tensor) -> None:
        self.scales = scales
        with torch.no_grad():
            for p in [self.norm.weight, self.bias]:
                if p is not None:
                    p.copy_((p.double() / scales.to(p.device)).to(p.dtype))
            for layer in self.consumers.values():
                w = layer.weight
                s = scales.to(w.device)
                factor = s[:, None] if is_hf_conv1d(layer) else s[None, :]
                w.copy_((w.double() * factor).to(w.dtype))

    def undo(self) -> None:
        with torch.no_grad():
            for param, value in self.saved:
                param.copy_(value)


def _weight_spec(spec: QuantSpec, shape: torch.Size) -> QuantSpec:
    """``spec``, per output channel where its groups do not divide the fan-in."""
    if group_error(tuple(shape), spec) is None:
        return spec
    return replace(spec, granularity="channel", group_size=None)


def _spaced_rows(x: Tensor, n: int) -> Tensor:
    """At most ``n`` evenly spaced rows of ``x`` seen as rows x channels (float32)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows[:: max(1, math.ceil(rows.shape[0] / n))].float()


def _halves(parts: list[Tensor]) -> tuple[Tensor, Tensor] | None:
    """Two disjoint sets of rows: alternate calibration batches, or the halves of the one batch
    (``None`` under two rows)."""
    if len(parts) >= 2:
        return torch.cat(parts[0::2]), torch.cat(parts[1::2])
    rows = parts[0] if parts else torch.empty(0)
    if rows.shape[0] < 2:
        return None
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


def _held_out_error(
    fold: _Fold,
    halves: tuple[Tensor, Tensor],
    weight_max: Tensor,
    alpha: float | None,
    scheme: Scheme,
) -> float:
    """The quantization error under ``scheme`` of ``fold``'s consumers together on held-out
    rows, relative to their float output (``sum ||Q(X/s) Q(W s)^T - X W^T||^2 / sum
    ||X W^T||^2``), both ways round: factors ``s`` (``alpha`` ``None``: no fold) and static
    activation ranges from one half, the error on the other. Judged on rows not used for the
    factors because a fold that flattens the activations leaves no headroom: unseen inputs that
    exceed a channel's calibrated maximum saturate (on a ConvNeXt classifier fed 24
    calibration samples, 0.5 lowered the error on them and tripled it on new inputs)."""
    assert scheme.activation is not None
    weights = [standard_form(layer).weight.detach().float() for layer in fold.consumers.values()]
    error = total = 0.0
    for fit, test in (halves, halves[::-1]):
        s = torch.ones(fit.shape[-1], dtype=torch.float64)
        if alpha is not None:
            s = smoothing_scales(fit.abs().amax(dim=0), weight_max, alpha)
        s = s.float()
        lo, hi = torch.aminmax(fit / s)
        qx = fake_quantize(test / s, scheme.activation, lo=lo, hi=hi)
        for w in weights:
            qw = fake_quantize(w * s, _weight_spec(scheme.weight, w.shape))
            reference = test @ w.T
            error += float((qx @ qw.T - reference).double().square().sum())
            total += float(reference.double().square().sum())
    return error / total if total > 0 else error


def _owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), []).append(full)
    return owners


def _tied_reason(fold: _Fold, owners: dict[int, list[str]], model: nn.Module) -> str | None:
    modules = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    for module in [fold.norm, *fold.consumers.values()]:
        name = modules[id(module)]
        scaled = [module.weight]
        if module is fold.norm and fold.bias is not None:
            scaled.append(fold.bias)
        for param in scaled:
            others = [o for o in owners.get(id(param), []) if not o.startswith(f"{name}.")]
            if others:
                return (
                    f"the weight of {name} is shared with {', '.join(others)} (tied): "
                    "scaling it would change that module too"
                )
    return None


def _norm_check(fold: _Fold, observed: _Observed, tolerance: float) -> str | None:
    """Why the folded normalisation's output is not its old output divided by ``s`` (its first
    call on the first calibration batch), or ``None``."""
    args, kwargs, before = observed.norm_calls[fold.norm_name]
    with torch.no_grad():
        after = fold.norm(*args, **kwargs)
    error = _relative_error(after.double() * fold.scales.to(after.device), before)
    if error > tolerance:
        return (
            f"its output does not scale with its weight (relative error {error:.1e} > "
            f"check_tolerance {tolerance:g}): not an elementwise-affine normalisation"
        )
    return None


def _check_layers(layers: Any, linears: dict[str, nn.Module]) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise wrong_type("layers", layers, "None or a list of layer names")
    names = list(layers)
    for name in names:
        if not isinstance(name, str) or name not in linears:
            raise unknown("layers", name, linears)
    return names


def smooth_activations(
    model: nn.Module,
    calib: Any,
    *,
    alpha: float | str = 0.5,
    layers: Iterable[str] | None = None,
    scheme: str | Scheme = "w8a8",
    check_tolerance: float = 1e-4,
) -> SmoothingResult:
    """A copy of ``model`` with activation outliers migrated into weights (SmoothQuant), so
    that int8 per-tensor activations (``w8a8``) lose less; its float output is unchanged.

    For each Linear (or Hugging Face ``Conv1D``) whose input is the very output of an
    elementwise-affine normalisation (``nn.LayerNorm``, Hugging Face RMSNorms: any leaf module
    with a 1-D ``weight`` and optional ``bias`` only, whose output is linear in them), per input
    channel ``j``: ``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` (see
    :func:`smoothing_scales`; activation maxima over all ``calib`` batches, weight maxima over
    all the Linears that normalisation feeds, which share ``s``). The normalisation's weight and
    bias are divided by ``s``, every consumer's weight column ``j`` multiplied by ``s_j``.

    Pairs are found without tracing: on the first batch, forward hooks record each
    normalisation's output tensor and each Linear's input tensor; a Linear whose input *is* a
    normalisation output (the same object, in every call) is its consumer. Each fold is then
    checked (the normalisation's output must scale by ``1/s``), and the smoothed model's output
    on the first batch must equal the original's within ``check_tolerance`` (relative to its
    largest magnitude); a fold that breaks it (e.g. the normalisation output also feeds a
    residual connection) is undone, and the table says why. Tied weights are left alone.

    ``alpha`` in [0, 1] is the migration strength: 0 gives ``s_j = 1 / max|W_j|`` (the weights
    flattened, all difficulty left in the activations), 1 gives ``s_j = max|X_j|`` (the
    activations flattened, all of it moved into the weights). ``alpha="auto"`` chooses it per
    normalisation: of :data:`AUTO_ALPHAS` and no fold at all, the one whose consumers'
    quantization error under ``scheme`` is lowest on calibration rows the factors and ranges
    were not taken from (weights and activations fake-quantized; alternate batches, or the
    halves of a single one). A fixed alpha can raise that error: without outlier channels,
    flattened activations leave new inputs no headroom below the calibrated range; the table's
    ``error_before`` / ``error_after`` say by how much either way. ``scheme`` (``w8a8`` unless
    given; one that quantizes activations) is the quantization that error is measured under.
    ``layers`` restricts the work to the
    normalisations feeding those Linear layers; their other consumers are compensated too and
    appear in the table. The copy is returned in eval mode; ``model`` itself is never modified.

    >>> _ = torch.manual_seed(0)
    >>> block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> res = smooth_activations(block, [torch.randn(16, 8)])
    >>> res.table[["layer", "source", "smoothed", "reason"]].values.tolist()[0]
    ['1', '0', True, '']
    >>> res.table.loc[1, "reason"]
    'input is not a normalisation output'
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(res.model(x), block(x), atol=1e-6)
    True
    """
    check_module(model)
    batches = as_batches(calib, argument="calib")
    if alpha != "auto":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise wrong_type("alpha", alpha, "a number in [0, 1] or 'auto'")
        check_fraction("alpha", alpha, open_low=False, open_high=False)
        alpha = float(alpha)
    check_positive("check_tolerance", check_tolerance)
    scheme = _judging_scheme(scheme)

    work = copy.deepcopy(model).eval()
    linears = {n: m for n, m in work.named_modules() if n and is_linear_like(m)}
    selected = _check_layers(layers, linears)
    if not linears:
        raise ValueError(
            f"The model ({type(model).__name__}) has no Linear layers: smoothing migrates "
            "activation scales into Linear (or Hugging Face Conv1D) weights."
        )
    norms = {n: m for n, m in work.named_modules() if n and is_affine_norm_candidate(m)}
    observed = _observe(work, batches, linears, norms)

    source, reason, groups = _sources(observed, linears)

    rows = list(linears) if selected is None else _rows_for(selected, source, groups)
    wanted = {source[n] for n in rows if source[n] in groups}
    folds = [_Fold(n, norms[n], groups[n]) for n in norms if n in wanted]

    fixed = None if alpha == "auto" else float(alpha)
    applied = _apply_folds(folds, work, observed, fixed, scheme, check_tolerance, reason)
    kept = _verified(work, batches[0], observed.reference, applied, check_tolerance, reason)

    scales = {fold.norm_name: fold.scales.float() for fold in kept}
    by_norm = {fold.norm_name: fold for fold in folds}
    table = pd.DataFrame(
        [
            _row(n, source[n], reason.get(n, ""), observed, scales, by_norm.get(source[n] or ""))
            for n in rows
        ],
        columns=TABLE_COLUMNS,
    )
    alphas = {fold.norm_name: fold.alpha for fold in kept}
    return SmoothingResult(model=work, table=table, scales=scales, alpha=alpha, alphas=alphas)


def _sources(
    observed: _Observed, linears: dict[str, nn.Module]
) -> tuple[dict[str, str | None], dict[str, str], dict[str, dict[str, nn.Module]]]:
    """Which normalisation feeds each Linear (``None``: none, or it cannot be used, with the
    reason), and the Linears each usable normalisation feeds."""
    source: dict[str, str | None] = {}
    reason: dict[str, str] = {}
    blocked: dict[str, str] = {}  # norm -> a Linear it feeds that cannot be compensated
    for name, calls in observed.sources.items():
        found = {s for s in calls if s is not None}
        source[name] = next(iter(found)) if len(found) == 1 else None
        if not calls:
            reason[name] = "not called during calibration"
        elif not found:
            reason[name] = NOT_FROM_NORM
        elif len(found) > 1:
            reason[name] = "fed by several normalisations: " + ", ".join(sorted(found))
        elif None in calls:
            reason[name] = f"also called on inputs that are not the output of {source[name]}"
        for norm in found if name in reason else ():
            blocked.setdefault(norm, name)
    groups: dict[str, dict[str, nn.Module]] = {}
    for name, norm in source.items():
        if norm is not None and norm not in blocked:
            groups.setdefault(norm, {})[name] = linears[name]
        elif norm is not None and name not in reason:
            reason[name] = f"{norm} also feeds {blocked[norm]}, which cannot be compensated"
    return source, reason, groups


def _judging_scheme(name: Any) -> Scheme:
    """The scheme ``scheme=`` names, refused unless it quantizes activations."""
    scheme = get_scheme(name, argument="scheme")
    if scheme.activation is None or scheme.activation.granularity == "none":
        raise invalid(
            "scheme",
            name,
            "a scheme that quantizes activations (smoothing helps their quantization), "
            "e.g. 'w8a8', 'w4a8'",
        )
    return scheme


def _choose(fold: _Fold, observed: _Observed, alpha: float | None, scheme: Scheme) -> str | None:
    """Fold ``alpha``'s scales into ``fold`` (``None``: the one of :data:`AUTO_ALPHAS` with the
    lowest held-out error under ``scheme``, see :func:`_held_out_error`, or none when no fold
    lowers it: the reason is returned)."""
    act = torch.stack([observed.act_max[c] for c in fold.consumers]).amax(dim=0)
    weight = torch.stack([_column_max(c).double() for c in fold.consumers.values()])
    weight_max = weight.amax(dim=0).to(act.device)
    candidates = AUTO_ALPHAS if alpha is None else (alpha,)
    halves = _halves(observed.norm_rows.get(fold.norm_name, []))
    if halves is not None:
        fold.error_before = _held_out_error(fold, halves, weight_max, None, scheme)
        errors = {a: _held_out_error(fold, halves, weight_max, a, scheme) for a in candidates}
        best = min(errors, key=errors.__getitem__)
        if alpha is None and errors[best] >= fold.error_before:
            return (
                f"no alpha in {AUTO_ALPHAS[0]:g}..{AUTO_ALPHAS[-1]:g} lowers its consumers' "
                f"{scheme.name} error on held-out calibration rows "
                f"({fold.error_before:.3g} without smoothing)"
            )
        fold.error_after = errors[best]
    elif alpha is None:
        return "too few calibration rows (under 2) to judge a fold"
    else:
        best = alpha
    fold.alpha = best
    fold.apply(smoothing_scales(act, weight_max, best))
    return None


def _apply_folds(
    folds: list[_Fold],
    work: nn.Module,
    observed: _Observed,
    alpha: float | None,
    scheme: Scheme,
    check_tolerance: float,
    reason: dict[str, str],
) -> list[_Fold]:
    """Fold each normalisation's scales (``alpha`` ``None``: searched, see :func:`_choose`;
    tied weights refused, each fold checked alone and undone when the normalisation's output
    does not scale by ``1/s``); the folds kept. Why a fold was refused goes to its consumers'
    ``reason``."""
    owners = _owners(work)
    applied: list[_Fold] = []
    for fold in folds:
        why = _tied_reason(fold, owners, work)
        if why is None:
            why = _choose(fold, observed, alpha, scheme)
        if why is None:
            why = _norm_check(fold, observed, check_tolerance)
            if why is not None:
                fold.undo()
        if why is None:
            applied.append(fold)
        else:
            for name in fold.consumers:
                reason[name] = why
    return applied


def _rows_for(
    selected: list[str], source: dict[str, str | None], groups: dict[str, dict[str, nn.Module]]
) -> list[str]:
    """The selected layers and every other consumer of the normalisations feeding them, in
    model order."""
    wanted = set(selected)
    for name in selected:
        wanted.update(groups.get(source[name] or "", {}))
    return [n for n in source if n in wanted]


def _verified(
    model: nn.Module,
    batch: Any,
    reference: Tensor,
    folds: list[_Fold],
    tolerance: float,
    reason: dict[str, str],
) -> list[_Fold]:
    """The folds kept: all of them when the model's output still equals ``reference``; else
    each is retried on top of those kept before it, and undone (its reason recorded) when it
    breaks the equality."""

    def error() -> float:
        with torch.no_grad():
            return _relative_error(output_tensor(run_model(model, batch)), reference)

    if not folds or error() <= tolerance:
        return folds
    for fold in folds:
        fold.undo()
    kept: list[_Fold] = []
    for fold in folds:
        fold.apply(fold.scales)
        err = error()
        if err <= tolerance:
            kept.append(fold)
            continue
        fold.undo()
        for name in fold.consumers:
            reason[name] = (
                f"smoothing {fold.norm_name} changed the model's output (relative error "
                f"{err:.1e} > check_tolerance {tolerance:g}): its output has other users "
                "besides its Linear consumers (e.g. a residual connection)"
            )
    return kept


def _row(
    name: str,
    source: str | None,
    why: str,
    observed: _Observed,
    scales: dict[str, Tensor],
    fold: _Fold | None,
) -> dict[str, Any]:
    act = observed.act_max.get(name)
    before = outlier_ratio(act) if act is not None else math.nan
    s = scales.get(source) if source is not None and not why else None
    after = outlier_ratio(act / s.to(act)) if act is not None and s is not None else before
    return {
        "layer": name,
        "source": source,
        "smoothed": s is not None,
        "reason": "" if s is not None else why or "not smoothed",
        "act_outlier_ratio_before": before,
        "act_outlier_ratio_after": after,
        "max_scale": float(s.max()) if s is not None else math.nan,
        "alpha": fold.alpha if s is not None and fold is not None else math.nan,
        "error_before": fold.error_before if fold is not None else math.nan,
        "error_after": fold.error_after if s is not None and fold is not None else math.nan,
    }
