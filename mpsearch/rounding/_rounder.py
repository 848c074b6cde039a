"""``Rounder``: a model's layer weights rounded by each (scheme, rounding method) choice, from
calibration data, computed once per (layer, choice) and shared by whoever quantizes."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mpsearch._data import as_batches
from mpsearch._validation import check_module, invalid, wrong_type
from mpsearch.layers import quantizable_layers
from mpsearch.layers._experts import expert_rows, expert_weights, from_expert_rows, is_expert_bank
from mpsearch.layers._layers import is_hf_conv1d, make_plain, standard_form
from mpsearch.rounding._adaround import adaround
from mpsearch.rounding._gptq import gptq
from mpsearch.rounding._grid import Grid, output_error
from mpsearch.rounding._stats import BankStats, LayerStats, collect_stats, rounding_unsupported
from mpsearch.schemes import Scheme, fake_quantize, get_scheme
from mpsearch.schemes._rounding import DEFAULT_ROUNDING, Rounding, get_rounding, register_rounding

Weight = Tensor | dict[str, Tensor]
"""A rounded weight: a layer's standard-form weight, or a Mixture-of-Experts bank's expert
weights by name."""

REPORT_COLUMNS = ["layer", "scheme", "rounding", "error_rtn", "error", "bias_corrected", "seconds"]


@dataclass(frozen=True)
class RoundingOptions:
    """How calibrated rounding runs.

    - ``damp``, ``act_order``, ``block_size``: GPTQ's damping (a fraction of the mean Hessian
      diagonal), column order (largest diagonal first) and block of lazy updates;
    - ``adaround_iters``, ``adaround_lr``, ``adaround_reg``: AdaRound's Adam steps, learning
      rate and rounding regulariser weight;
    - ``bias_correction``: add each output channel's mean shift (``(W - Q(W)) E[x]`` over the
      calibration inputs) to the bias of every layer with integer weights (``rtn`` ones too).

    >>> RoundingOptions(damp=0.1).act_order
    True
    """

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    adaround_iters: int = 400
    adaround_lr: float = 1e-2
    adaround_reg: float = 0.01
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise invalid("damp", self.damp, "a number in [0, 1)", kind="option")
        for name in ("block_size", "adaround_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise invalid(name, value, "a positive integer", kind="option")
        for name in ("adaround_lr", "adaround_reg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise invalid(name, value, "a non-negative number", kind="option")


def _gptq(w: Tensor, h: Tensor, spec: Any, opts: RoundingOptions) -> Tensor:
    return gptq(w, h, spec, damp=opts.damp, act_order=opts.act_order, block_size=opts.block_size)


def _adaround(w: Tensor, h: Tensor, spec: Any, opts: RoundingOptions) -> Tensor:
    return adaround(
        w, h, spec, iters=opts.adaround_iters, lr=opts.adaround_lr, reg=opts.adaround_reg
    )


register_rounding(
    Rounding("gptq", "GPTQ: column-wise rounding with inverse-Hessian error feedback", _gptq)
)
register_rounding(
    Rounding(
        "adaround",
        "AdaRound: learned up/down rounding minimising the layer output error",
        _adaround,
    )
)


class Rounder:
    """Rounded weights of ``model``'s layers for (scheme, rounding) choices (``"w4a16+gptq"``).

    The input statistics of a layer (:class:`LayerStats`, one pass of ``model`` over ``calib``)
    are gathered the first time one of its choices is asked for, together with every layer
    asked for at that time; each rounded weight is computed once. ``model`` is only read.
    ``report`` has one row per rounded (layer, choice): the layer's output error on the
    calibration inputs under round to nearest and under the choice (``tr(ΔW H ΔW^T)``).

    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    >>> rounder = Rounder(net, [torch.randn(64, 64)])
    >>> qnet = rounder.apply(net, {"0": "w4a16+gptq", "2": "w8a8"})
    >>> float(rounder.report.loc[0, "error"]) <= float(rounder.report.loc[0, "error_rtn"])
    True
    """

    def __init__(
        self, model: nn.Module, calib: Iterable[Any], *, options: RoundingOptions | None = None
    ) -> None:
        check_module(model)
        if options is not None and not isinstance(options, RoundingOptions):
            raise wrong_type("options", options, "a RoundingOptions")
        self.model = model
        self.batches = as_batches(calib, argument="calib")
        self.options = options or RoundingOptions()
        self.layers = quantizable_layers(model)
        self._stats: dict[str, LayerStats | BankStats] = {}
        self._weights: dict[tuple[str, str], tuple[Weight, Tensor | None]] = {}
        self._rows: list[list[Any]] = []
        self._lock = threading.Lock()

    # -------------------------------------------------------------- what is asked

    def needed(self, assignment: Mapping[str, str]) -> dict[str, Scheme]:
        """The layers of ``assignment`` (``{layer: choice}``) this rounder changes: those with a
        calibrated rounding, and with ``bias_correction`` every one with integer weights.
        Refuses, naming them, layers calibrated rounding cannot take."""
        out: dict[str, Scheme] = {}
        problems = []
        for name, choice in assignment.items():
            scheme = get_scheme(choice)
            calibrated = scheme.rounding != DEFAULT_ROUNDING
            corrected = (
                self.options.bias_correction
                and scheme.weight.fmt.kind == "int"
                and not is_expert_bank(self.layers[name])
            )
            if not (calibrated or corrected):
                continue
            why = rounding_unsupported(self.layers[name])
            if why is None:
                out[name] = scheme
            elif calibrated:
                problems.append(f"  {name} in {choice!r}: {why}")
        if problems:
            raise ValueError(
                "Calibrated rounding cannot take these layers:\n"
                + "\n".join(problems)
                + "\nGive them a scheme without '+<rounding>' (round to nearest)."
            )
        return out

    def stats(self, layers: Iterable[str]) -> dict[str, LayerStats | BankStats]:
        """:class:`LayerStats` of ``layers`` (gathered in one pass for those not yet known)."""
        layers = list(layers)
        missing = [n for n in layers if n not in self._stats]
        if missing:
            self._stats.update(collect_stats(self.model, self.batches, missing))
        return {n: self._stats[n] for n in layers}

    # -------------------------------------------------------------- rounding

    def weight(self, layer: str, scheme: str | Scheme) -> tuple[Weight, Tensor | None]:
        """``(weight, bias)`` of ``layer`` under ``scheme``: the weight rounded (shaped as the
        layer's standard form, ``[out, in, ...]``; a Mixture-of-Experts bank's expert weights
        by name, in the bank's own layout) and the bias (corrected with ``bias_correction``;
        ``None`` where the layer has none and nothing is added; a bank's is never corrected)."""
        scheme = get_scheme(scheme)
        key = (layer, scheme.name)
        with self._lock:
            if key not in self._weights:
                self._weights[key] = self._round(layer, scheme)
            return self._weights[key]

    def _round(self, name: str, scheme: Scheme) -> tuple[Weight, Tensor | None]:
        start = time.perf_counter()
        layer = self.layers[name]
        stats = self.stats([name])[name]
        if isinstance(stats, dict):  # a bank: each expert weight, one group per expert
            weights, err_rtn, err, count = {}, 0.0, 0.0, 0
            for weight_name, w in expert_weights(layer).items():
                rows = expert_rows(layer, w.detach().float())
                grouped = rows.reshape(w.shape[0], -1, rows.shape[1])
                r, e_rtn, e = self._round_groups(grouped, stats[weight_name], scheme)
                r = _kept(grouped, r, scheme)
                weights[weight_name] = from_expert_rows(layer, r.reshape(rows.shape), w.shape)
                err_rtn, err, count = err_rtn + e_rtn, err + e, count + stats[weight_name].count
            self._report(name, scheme, err_rtn / count, err / count, start)
            return {n: w.to(layer._parameters[n].dtype) for n, w in weights.items()}, None
        layer = standard_form(layer)
        w = layer.weight.detach().float()
        rows = w.reshape(stats.hessian.shape[0], w.shape[0] // stats.hessian.shape[0], -1)
        r_all, err_rtn, err = self._round_groups(rows, stats, scheme)  # conv groups: rows of each
        bias = None if layer.bias is None else layer.bias.detach().float()
        if self.options.bias_correction:
            shift = ((rows - r_all).double() @ stats.mean.unsqueeze(2)).reshape(-1).float()
            bias = shift if bias is None else bias + shift
        self._report(name, scheme, err_rtn / stats.count, err / stats.count, start)
        return _kept(rows, r_all, scheme).reshape(w.shape).to(layer.weight.dtype), bias

    def _round_groups(
        self, rows: Tensor, stats: LayerStats, scheme: Scheme
    ) -> tuple[Tensor, float, float]:
        """``rows`` (``[groups, out, in]``) rounded by the scheme's method, group ``g`` on
        Hessian ``g`` (the identity where it is zero: no input reached that group, and the
        method then rounds to nearest), with the output errors under round to nearest and
        under the method."""
        method = get_rounding(scheme.rounding)
        rounded, err_rtn, err = [], 0.0, 0.0
        for g in range(rows.shape[0]):
            h = stats.hessian[g]
            rtn = fake_quantize(rows[g], scheme.weight)
            r = rtn
            if method.round is not None:
                seen = h if bool(h.any()) else torch.eye(h.shape[0], dtype=h.dtype)
                r = method.round(rows[g], seen, scheme.weight, self.options)
            err_rtn += output_error(rows[g], rtn, h)
            err += output_error(rows[g], r, h)
            rounded.append(r)
        return torch.stack(rounded), err_rtn, err

    def _report(self, name: str, scheme: Scheme, err_rtn: float, err: float, start: float) -> None:
        self._rows.append(
            [
                name,
                scheme.base_name,
                scheme.rounding,
                err_rtn,
                err,
                self.options.bias_correction,
                time.perf_counter() - start,
            ]
        )

    def latent(self, layer: str, scheme: str | Scheme) -> Weight:
        """The float weight of ``layer`` nearest to its own that rounds to nearest to
        ``scheme``'s calibrated rounding, on the same grid (:meth:`Grid.latent`): where a
        quantization-aware fine-tune starts, keeping the rounding and the weights' fractional
        positions (standard form, as :meth:`weight`; a bank's expert weights by name)."""
        scheme = get_scheme(scheme)
        module = self.layers[layer]
        rounded = self.weight(layer, scheme)[0]
        if isinstance(rounded, dict):
            return {
                name: from_expert_rows(
                    module,
                    _latent_rows(
                        expert_rows(module, w), expert_rows(module, rounded[name]), scheme
                    ),
                    w.shape,
                ).to(w.dtype)
                for name, w in expert_weights(module).items()
            }
        w = standard_form(module).weight
        return _latent_rows(
            w.reshape(w.shape[0], -1), rounded.reshape(w.shape[0], -1), scheme
        ).reshape(w.shape)

    def layer(self, name: str, scheme: str | Scheme) -> nn.Module:
        """A copy of layer ``name`` holding its weight (and bias) under ``scheme`` (the layer
        itself where ``scheme`` changes nothing); the model's own layer is left as it is."""
        scheme = get_scheme(scheme)
        original = self.layers[name]
        if not self.needed({name: scheme.name}):
            return original
        if parametrize.is_parametrized(original):  # torch refuses shallow copies of these
            layer = copy.deepcopy(original)
        else:
            layer = copy.copy(original)
            layer._parameters = dict(original._parameters)  # its own: the original keeps its
        set_weight(layer, *self.weight(name, scheme))
        return layer

    def apply(
        self,
        model: nn.Module,
        assignment: Mapping[str, str],
        *,
        inplace: bool = False,
        latent: bool = False,
    ) -> nn.Module:
        """``model`` (this rounder's model or a copy of it: same layer names) with the weights
        (and biases) of ``assignment``'s rounded layers replaced; a copy unless ``inplace``.
        The quantized kernels of each layer's scheme then store exactly the rounded codes.
        The result records them (``mpsearch_rounded``: ``{layer: choice}``), so that
        ``quantize`` does not round those layers again. With ``latent``, the layers get their
        :meth:`latent` weights instead (what a fine-tune starts from; not recorded)."""
        done = rounded_layers(model)
        needed = self.needed({n: c for n, c in assignment.items() if done.get(n) != c})
        self.stats(needed)
        target = model if inplace else copy.deepcopy(model)
        layers = quantizable_layers(target)
        for name, scheme in needed.items():
            weight, bias = self.weight(name, scheme)
            if latent and scheme.rounding != DEFAULT_ROUNDING:
                weight = self.latent(name, scheme)
            set_weight(layers[name], weight, bias)
        if not latent:
            target.mpsearch_rounded = {**done, **{n: s.name for n, s in needed.items()}}
        return target

    @property
    def report(self) -> pd.DataFrame:
        """One row per rounded (layer, choice): output errors (mean over calibration rows)
        under round to nearest and under the choice, and the seconds it took."""
        return pd.DataFrame(self._rows, columns=REPORT_COLUMNS)


def _latent_rows(rows: Tensor, rounded: Tensor, scheme: Scheme) -> Tensor:
    """:meth:`Grid.latent` of weight ``rows`` (``[out, in]``) for their ``rounded`` values."""
    grid = Grid(rows.detach().float(), scheme.weight)
    return grid.latent(rows.detach().float(), grid.codes(rounded.float()))


def _kept(rows: Tensor, rounded: Tensor, scheme: Scheme) -> Tensor:
    """What a layer keeps of its rounded ``rows``: round to nearest keeps the weight as it is
    (the kernels round it themselves)."""
    return rows if get_rounding(scheme.rounding).round is None else rounded


def rounded_layers(model: nn.Module) -> dict[str, str]:
    """``{layer: choice}`` of the layers :meth:`Rounder.apply` rounded in ``model``."""
    return dict(getattr(model, "mpsearch_rounded", {}))


def _own_layout(layer: nn.Module, weight: Tensor) -> Tensor:
    """A standard-form weight in ``layer``'s own layout (HF ``Conv1D``: transposed)."""
    own = weight.t() if is_hf_conv1d(layer) else weight.reshape(layer.weight.shape)
    return own.to(layer.weight.dtype).contiguous().clone()


def set_weight(layer: nn.Module, weight: Weight, bias: Tensor | None) -> None:
    """Give ``layer`` a standard-form ``weight`` (and ``bias``) as new parameters of its own:
    a tensor it shared with another module (a tied embedding) keeps its values there; a layer
    that transforms its weight (``weight_norm``, weight standardization) becomes the plain
    layer it computes (:func:`~mpsearch.layers._layers.make_plain`). A Mixture-of-Experts bank
    takes its expert weights by name, in its own layout."""
    if isinstance(weight, dict):
        for name, w in weight.items():
            old_w = layer._parameters[name]
            setattr(layer, name, nn.Parameter(w.clone(), requires_grad=old_w.requires_grad))
        return
    old = layer.weight
    make_plain(layer)  # weight_norm, weight standardization: the rounded weight is computed with
    layer.weight = nn.Parameter(_own_layout(layer, weight), requires_grad=old.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(old.dtype).clone(), requires_grad=old.requires_grad)
