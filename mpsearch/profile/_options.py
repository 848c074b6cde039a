"""``ProfileOptions``: how ``profile`` runs, in one frozen, validated object (YAML round trip)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mpsearch._options import (
    Check,
    Options,
    flag,
    optional_flag,
    optional_names,
    optional_path,
    optional_positive_int,
    positive_int,
)
from mpsearch._validation import invalid, unknown
from mpsearch.backends import BACKENDS, Backend
from mpsearch.profile._e2e import check_samples
from mpsearch.profile._metrics import E2E_METRICS
from mpsearch.rounding import RoundingOptions

Metric = str | Callable[[torch.Tensor, torch.Tensor], float] | None


def _metric(name: str, value: Any) -> Metric:
    if value is None or callable(value) or (isinstance(value, str) and value in E2E_METRICS):
        return value
    raise invalid(name, value, f"None, one of {sorted(E2E_METRICS)} or a callable", kind="option")


def _backend(name: str, value: Any) -> str | Backend:
    if isinstance(value, Backend):
        return value
    if value not in BACKENDS:
        raise unknown(name, value, BACKENDS, kind="option")
    return value


def _rounding(name: str, value: Any) -> RoundingOptions | None:
    if value is None or isinstance(value, RoundingOptions):
        return value
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(RoundingOptions)}
        extra = sorted(set(value) - fields)
        if extra:
            raise unknown(f"{name}.{extra[0]}", extra[0], fields, kind="option")
        return RoundingOptions(**value)
    raise invalid(name, value, "None, a RoundingOptions or a mapping of its fields", kind="option")


def _samples(name: str, value: Any) -> int | str | None:
    check_samples(value, argument=name, kind="option")
    return value


@dataclass(frozen=True)
class ProfileOptions(Options):
    """How :func:`~mpsearch.profile.profile` runs (see its docstring for what each one does).

    - ``metric``: the end-to-end error, ``"kl"``, ``"kl_channels"``, ``"bernoulli_kl"``,
      ``"mse"``, a callable ``(ref_out, out) -> float`` or ``None`` (chosen from the output
      and whether the model is a multi-label classifier: ``auto_metric``);
    - ``layers``: the layers to profile (``None``: every quantizable layer);
    - ``backend``: how a layer is quantized (default ``"simulate"``);
    - ``cache_dir``: where rows are cached as they are computed (``None``: no cache);
    - ``progress``: a progress bar (``None``: when stderr is a terminal);
    - ``max_batches``: profile on the first calibration batches only (``None``: all);
    - ``fold_bn``: fold BatchNorm into the preceding convolution first;
    - ``hessian_samples``: Hutchinson samples per batch for the ``hessian`` column;
    - ``e2e_samples``: the samples ``e2e`` is measured on (``task_drop`` and ``hessian``
      always use all of them). ``None``: every calibration sample (exact
      mode); an int ``n``: the first ``n`` samples, in order (the ``e2e`` column then equals
      exact mode's on the data cut to those samples); ``"auto"``: exact mode when its
      end-to-end work D is at most 1 fp32 pass per scheme, else ``ceil(N / (2 D))`` of the
      N samples (at least 8), half a pass per scheme (:mod:`mpsearch.profile._e2e`): with
      the KL metric on one distribution per sample (a classifier), the samples whose fp32
      output has the highest entropy (they carry a trained classifier's KL), else the first
      ones. D is the sum over layers of the
      share of the model's multiply-accumulates downstream of the layer (from the traced graph
      and the data's shapes, never from timings: the same choice on every run); ``prof.info``
      records ``e2e_samples``, ``e2e_pick`` (``all``, ``first`` or ``uncertain``),
      ``calib_samples`` and ``downstream_passes`` (D);
    - ``local_samples``: the samples ``mse`` and ``sqnr_db`` are measured on: the calibration
      batches holding the first ``n`` (an int), every sample (``None``), or ``"auto"``: every
      sample when ``e2e`` uses every one, the samples ``e2e`` uses when they are a
      classifier's least certain ones, at least 64 (the same runs give both), else the first
      64 (:data:`~mpsearch.profile._e2e.AUTO_LOCAL_SAMPLES`). Batches neither error uses get no
      fp32 pass unless ``e2e`` picks a classifier's least certain samples among all of them;
      ``prof.info["local_samples"]`` records how many were used;
    - ``rounding``: how choices with a calibrated rounding (``"w4a16+gptq"``) round
      (:class:`~mpsearch.rounding.RoundingOptions`, or a mapping of its fields; ``None``: its
      defaults). Their weights are rounded from the calibration data, from one pass that
      gathers every such layer's input statistics, shared by all its choices.

    The cache key of a row holds hashes of the model's weights, the calibration data, the
    scheme, the metric, ``evaluate`` / ``loss_fn`` (name and source), the code version and the
    number of samples ``e2e`` was measured on: a changed model never reuses rows, and a row
    measured on a subset is never reused as an exact one.

    Every field is checked when the object is made; it round-trips through a plain dict
    (:meth:`to_dict` / :meth:`from_dict`, e.g. from YAML) when ``metric`` is given by name.

    >>> opts = ProfileOptions(e2e_samples=None, max_batches=4)
    >>> ProfileOptions.from_dict(opts.to_dict()) == opts
    True
    >>> ProfileOptions(hessian_samples=-3)
    Traceback (most recent call last):
    ...
    ValueError: The 'hessian_samples' option must be a positive integer. Got -3 instead.
    """

    metric: Metric = None
    layers: Sequence[str] | None = None
    backend: str | Backend = "simulate"
    cache_dir: str | Path | None = None
    progress: bool | None = None
    max_batches: int | None = None
    fold_bn: bool = True
    hessian_samples: int = 8
    e2e_samples: int | str | None = "auto"
    local_samples: int | str | None = "auto"
    rounding: RoundingOptions | None = None

    CHECKS: ClassVar[dict[str, Check]] = {
        "metric": _metric,
        "layers": optional_names,
        "backend": _backend,
        "cache_dir": optional_path,
        "progress": optional_flag,
        "max_batches": optional_positive_int,
        "fold_bn": flag,
        "hessian_samples": positive_int,
        "e2e_samples": _samples,
        "local_samples": _samples,
        "rounding": _rounding,
    }
    VERB: ClassVar[str] = "profile"

    @staticmethod
    def _plain(name: str, value: Any) -> Any:
        if isinstance(value, RoundingOptions):
            return dataclasses.asdict(value)
        return Options._plain(name, value)
