"""Error measures: layer-output MSE/SQNR and end-to-end output metrics (KL, MSE, callables)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mpsearch._validation import invalid

MetricFn = Callable[[Tensor, Tensor], float]


def kl_divergence(ref: Tensor, out: Tensor) -> float:
    """Mean KL(softmax(ref) || softmax(out)) over all rows (last dimension = classes), in nats.

    >>> kl_divergence(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]))
    0.0
    """
    return KLAgainst(ref)(out)


def _log_probs(t: Tensor) -> Tensor:
    return torch.log_softmax(t.double().reshape(-1, t.shape[-1]), dim=-1)


CHUNK_ELEMENTS = 2**16
"""Elements (512 KiB in float64) of the float64 temporaries the batched KL works in: blocks
that stay in the cores' caches, where large temporaries are fresh memory at every allocation
(page faults); per-row results do not depend on the blocking. Measured on machine A (Xeon,
2 MiB L2 per core), the zoo's ``hf_llama`` (three schemes' outputs on 480 rows of 512
logits): 2**16 scored a layer in 1.5 ms, 2**19 in 3.7 ms, and the profile's scoring took 30
instead of 70 ms."""


class KLAgainst:
    """``kl_divergence(ref, out)`` for many ``out``: the reference's softmax computed once.

    >>> KLAgainst(torch.tensor([[1.0, 2.0]]))(torch.tensor([[1.0, 2.0]]))
    0.0
    """

    def __init__(self, ref: Tensor) -> None:
        self.log_p = _log_probs(ref)
        self.p = self.log_p.exp()

    def __call__(self, out: Tensor) -> float:
        kl = (self.p * (self.log_p - _log_probs(out))).sum(dim=-1)
        return float(kl.clamp_min(0.0).mean())

    def terms(self, outs: Tensor) -> Tensor:
        """Per-row KL of each ``outs[i]``: float64 ``[len(outs), rows]`` (its mean: the KL).

        Computed a block of rows at a time (:data:`CHUNK_ELEMENTS`), ``p * (log_p - log_q)``
        in place as ``-log_q + log_p`` (exactly ``log_p - log_q``): the numbers of
        :func:`kl_divergence`, without float64 temporaries the size of ``outs``.
        """
        x = outs.reshape(len(outs), -1, outs.shape[-1])
        step = max(1, CHUNK_ELEMENTS // (len(outs) * outs.shape[-1]))
        parts = []
        for start in range(0, x.shape[1], step):
            rows = slice(start, start + step)
            log_q = torch.log_softmax(x[:, rows].double(), dim=-1)
            parts.append(log_q.neg_().add_(self.log_p[rows]).mul_(self.p[rows]).sum(dim=-1))
        return torch.cat(parts, dim=1).clamp_min(0.0)

    @staticmethod
    def rows(shape: torch.Size) -> tuple[int, ...]:
        """The grid of terms (rows) of one output of ``shape``: all but its last dimension."""
        return tuple(shape[:-1])


def mean_squared_error(ref: Tensor, out: Tensor) -> float:
    """Mean squared difference of two outputs (float64 accumulation).

    >>> mean_squared_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    2.0
    """
    return float((ref.double() - out.double()).pow(2).mean())


def kl_divergence_channels(ref: Tensor, out: Tensor) -> float:
    """:func:`kl_divergence` with the classes in dimension 1: per-pixel class logits
    ``[B, C, H, W]`` of a segmentation model.

    >>> ref = torch.randn(2, 5, 3, 4)  # [B, C, H, W]
    >>> kl_divergence_channels(ref, ref.flip(-1)) == kl_divergence(
    ...     ref.movedim(1, -1), ref.flip(-1).movedim(1, -1))
    True
    """
    return KLChannelsAgainst(ref)(out)


class KLChannelsAgainst(KLAgainst):
    """:class:`KLAgainst` with the classes in dimension 1 (of each output)."""

    def __init__(self, ref: Tensor) -> None:
        super().__init__(ref.movedim(1, -1))

    def __call__(self, out: Tensor) -> float:
        return super().__call__(out.movedim(1, -1))

    def terms(self, outs: Tensor) -> Tensor:
        return super().terms(outs.movedim(2, -1))

    @staticmethod
    def rows(shape: torch.Size) -> tuple[int, ...]:
        return (shape[0], *shape[2:])


def label_pairs(logits: Tensor) -> Tensor:
    """Multi-label logits ``[..., L]`` as two-class logits ``[..., L, 2]``, ``(0, x)`` per
    label: their softmax is ``(1 - sigmoid(x), sigmoid(x))``, their arg-max ``x > 0``.

    >>> label_pairs(torch.tensor([[2.0, -1.0]])).softmax(-1)[0, :, 1].tolist() == (
    ...     torch.tensor([2.0, -1.0]).sigmoid().tolist())
    True
    """
    return torch.stack((torch.zeros_like(logits), logits), dim=-1)


def bernoulli_kl(ref: Tensor, out: Tensor) -> float:
    """KL divergence of a multi-label classifier's outputs (one independent sigmoid per label in
    the last dimension): per sample (row), the sum over its labels of
    ``KL(Bernoulli(sigmoid(ref)) || Bernoulli(sigmoid(out)))``, the KL of the two
    distributions over label sets; the mean over samples, in nats.

    >>> bernoulli_kl(torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, -2.0]]))
    0.0
    """
    return BernoulliKLAgainst(ref)(out)


class BernoulliKLAgainst(KLAgainst):
    """:func:`bernoulli_kl` for many outputs: :class:`KLAgainst` on :func:`label_pairs`, the
    labels' terms summed per sample."""

    def __init__(self, ref: Tensor) -> None:
        super().__init__(label_pairs(ref))
        self.labels = ref.shape[-1]

    def __call__(self, out: Tensor) -> float:
        return float(self.terms(out.unsqueeze(0)).mean())

    def terms(self, outs: Tensor) -> Tensor:
        per_label = super().terms(label_pairs(outs))
        return per_label.view(len(outs), -1, self.labels).sum(-1)

    @staticmethod
    def rows(shape: torch.Size) -> tuple[int, ...]:
        return tuple(shape[:-1])


E2E_METRICS: dict[str, MetricFn] = {
    "kl": kl_divergence,
    "kl_channels": kl_divergence_channels,
    "bernoulli_kl": bernoulli_kl,
    "mse": mean_squared_error,
}
CLASS_DIMS: dict[str, int] = {"kl": -1, "kl_channels": 1}
"""The dimension holding the classes, for the metrics that compare one class per position."""


def _same_argmax(dim: int) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda out, ref: out.argmax(dim) == ref.argmax(dim)


AGREEMENT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl": _same_argmax(-1),
    "kl_channels": _same_argmax(1),
    "bernoulli_kl": lambda out, ref: ((out > 0) == (ref > 0)).all(-1),
}
"""Metric -> ``(out, ref) -> bool tensor``: whether ``out`` gives ``ref``'s answer at each
position (sample, token, pixel): the same arg-max class; for multi-label logits the same set
of labels (every label's ``logit > 0`` equal)."""


def answers_agree(out: Tensor, ref: Tensor, metric: str) -> Tensor:
    """Whether ``out`` gives the answer of ``ref`` at each position, for outputs compared by
    ``metric`` (:data:`AGREEMENT`; another metric: the arg-max of the last dimension, what a
    top-1 check of any output compares).

    >>> ref = torch.tensor([[2.0, -1.0], [1.0, 3.0]])
    >>> answers_agree(ref.flip(1), ref, "kl").tolist()
    [False, False]
    >>> answers_agree(torch.tensor([[0.5, -3.0], [1.0, -1.0]]), ref, "bernoulli_kl").tolist()
    [True, False]
    """
    return AGREEMENT.get(metric, AGREEMENT["kl"])(out, ref)


def class_dim(output: Tensor, name: str | None = None) -> int:
    """The dimension holding the classes of ``output`` (named ``name``), by the metric
    :func:`auto_metric` picks for it; the last where it holds none (an arg-max there is what
    a top-1 agreement of such an output compares).

    >>> class_dim(torch.zeros(2, 5)), class_dim(torch.zeros(2, 5, 8, 8), "logits")
    (-1, 1)
    """
    return CLASS_DIMS.get(auto_metric(output, name), -1)


class _MSEAgainst:
    def __init__(self, ref: Tensor) -> None:
        self.ref = ref.double()

    def terms(self, outs: Tensor) -> Tensor:
        return (outs.double() - self.ref).square_().reshape(len(outs), -1)

    @staticmethod
    def rows(shape: torch.Size) -> tuple[int, ...]:
        return tuple(shape)


def kept_terms(rows: tuple[int, ...], mask: Tensor | None) -> Tensor | None:
    """Which terms ``[prod(rows)]`` of one output laid out on the grid ``rows`` a token mask
    ``[B, T]`` keeps (:func:`~mpsearch._data.token_mask`): those of real tokens, not of padding;
    ``None`` without a mask or where the grid does not start with its positions.

    >>> kept_terms((2, 3), torch.tensor([[True, True, False], [True, False, False]])).tolist()
    [True, True, False, True, False, False]
    """
    if mask is None or tuple(rows[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(*mask.shape, *[1] * (len(rows) - 2)).expand(rows).reshape(-1)


def _kept_mean(terms: Tensor, kept: Tensor | None) -> Tensor:
    """Per-output mean of ``terms`` ``[outputs, n]`` over the ``kept`` ones (all of them where
    none is kept or there is no mask)."""
    if kept is None or not bool(kept.any()):
        return terms.mean(dim=-1)
    return terms[:, kept].mean(dim=-1)


BATCHED_METRICS: dict[MetricFn, Callable[[Tensor], Any]] = {
    kl_divergence: KLAgainst,
    kl_divergence_channels: KLChannelsAgainst,
    bernoulli_kl: BernoulliKLAgainst,
    mean_squared_error: _MSEAgainst,
}
"""Built-in metric -> a class built from a reference output whose ``terms(outs)`` gives, for
every ``outs[i]`` at once, terms whose mean is the metric (float64 ``[len(outs), count]``),
laid out on the grid ``rows(shape)`` of one output."""


class E2EScorer:
    """The end-to-end metric of each scheme's output on each e2e batch, against the references.

    Built-in metrics (:data:`BATCHED_METRICS`) score all schemes on all batches in one set of
    tensor operations (the references' share, e.g. their softmax, computed once; the numbers
    equal the metric's own up to the order of float64 sums); a callable metric is called per
    output. A non-finite output scores ``inf`` (a callable is not called on it). ``masks``
    (per batch, :func:`~mpsearch._data.token_mask` or ``None``) leave the padding of per-token
    outputs out of the built-in metrics.

    >>> ref = torch.tensor([[1.0, 2.0]])
    >>> scorer = E2EScorer([ref], "kl", kl_divergence)
    >>> scorer([torch.stack([ref, ref + torch.inf])], lambda b, i: f"batch {b}, output {i}")
    [[0.0, inf]]
    """

    def __init__(
        self,
        refs: Sequence[Tensor],
        name: str,
        fn: MetricFn,
        masks: Sequence[Tensor | None] | None = None,
    ) -> None:
        self.refs, self.name, self.fn = list(refs), name, fn
        self.kind = BATCHED_METRICS.get(fn)
        self.joint = None
        self.kept: list[Tensor | None] = [None] * len(self.refs)
        if self.kind is not None and masks is not None:
            self.kept = [
                kept_terms(self.kind.rows(r.shape), m)
                for r, m in zip(self.refs, masks, strict=True)
            ]
        shapes = {tuple(r.shape[1:]) for r in self.refs}
        if self.kind is not None and len(shapes) == 1 and all(r.dim() >= 1 for r in self.refs):
            self.joint = self.kind(torch.cat(self.refs))
            self.counts = [math.prod(self.kind.rows(r.shape)) for r in self.refs]
        self._per_batch: dict[int, Any] = {}

    def __call__(
        self, outs: Sequence[Tensor], where: Callable[[int, int], str]
    ) -> list[list[float]]:
        """``values[b][i]``: the metric of ``outs[b][i]`` (output i on e2e batch b) against the
        reference of batch b; ``where(b, i)`` names that output in error messages."""
        if self.kind is None:
            return [self._called(b, out, where) for b, out in enumerate(outs)]
        if self.joint is not None and all(o.shape[2:] == outs[0].shape[2:] for o in outs):
            terms = self.joint.terms(outs[0] if len(outs) == 1 else torch.cat(list(outs), dim=1))
            if len(set(self.counts)) == 1 and all(k is None for k in self.kept):
                means = terms.view(len(terms), len(outs), -1).mean(dim=-1)
            else:
                parts = terms.split(self.counts, 1)
                means = torch.stack(
                    [_kept_mean(t, k) for t, k in zip(parts, self.kept, strict=True)], 1
                )
            values = means.T.tolist()
        else:
            values = [
                _kept_mean(self._batched(b).terms(out), self.kept[b]).tolist()
                for b, out in enumerate(outs)
            ]
        for b, row in enumerate(values):
            for i, value in enumerate(row):
                if not math.isfinite(value):  # a non-finite output, or the metric's NaN
                    if bool(torch.isfinite(outs[b][i]).all()):
                        if math.isnan(value):
                            raise RuntimeError(
                                f"The metric {self.name!r} returned NaN on {where(b, i)}."
                            )
                    else:
                        row[i] = math.inf
        return values

    def _batched(self, b: int) -> Any:
        if b not in self._per_batch:
            self._per_batch[b] = self.kind(self.refs[b])  # type: ignore[misc]
        return self._per_batch[b]

    def _called(self, b: int, outs: Tensor, where: Callable[[int, int], str]) -> list[float]:
        finite = torch.isfinite(outs.reshape(len(outs), -1)).all(dim=1).tolist()
        return [
            call_metric(self.fn, self.name, self.refs[b], out, where(b, i)) if ok else math.inf
            for i, (out, ok) in enumerate(zip(outs, finite, strict=True))
        ]


def may_hold_scores(name: str | None) -> bool:
    """Whether an output named ``name`` may hold class scores: no name (a tensor returned as it
    is, a tuple's item), ``out``, ``output`` or a name holding ``logit``; not a field such as
    ``last_hidden_state`` or ``waveform``.

    >>> may_hold_scores("start_logits"), may_hold_scores("last_hidden_state")
    (True, False)
    """
    return name in (None, "out", "output") or "logit" in name


def auto_metric(output: Tensor, name: str | None = None, *, multi_label: bool = False) -> str:
    """The end-to-end metric chosen for a model output ``output`` named ``name`` (its key in
    the model's dict or ``ModelOutput``: :func:`~mpsearch._data.main_output`) of a model that
    is a multi-label classifier or not (``multi_label``: :func:`~mpsearch._data.is_multi_label`).

    A multi-label classifier's ``[B, L]`` logits (one sigmoid per label) are compared by
    ``"bernoulli_kl"``.

    Class scores, a floating output whose classes hold at least 2 entries, are compared by KL
    divergence of their softmax: ``"kl"`` over the last dimension (``[B, C]``, per-token
    ``[B, T, V]``), ``"kl_channels"`` over dimension 1 for 4-D and larger logits (per-pixel
    ``[B, C, H, W]`` of a segmentation model: a Hugging Face ``logits``, torchvision's
    ``out``). Class scores are an output of 2 or 3 dimensions with no name, the name ``out`` or
    ``output``, or a name holding ``logit``, and a 4-D or larger one named ``out`` or holding
    ``logit``. Everything else is compared by ``"mse"``: a named field that holds no logits
    (``last_hidden_state``, ``waveform``, ``reconstruction``, ``prediction_outputs``), an
    unnamed output of 4 or more dimensions (an image), regressors (``[B]``, ``[B, 1]``) and
    integer outputs.

    >>> auto_metric(torch.zeros(4, 10)), auto_metric(torch.zeros(4, 1))
    ('kl', 'mse')
    >>> auto_metric(torch.zeros(4, 8, 16), "last_hidden_state")
    'mse'
    >>> auto_metric(torch.zeros(4, 21, 8, 8), "logits"), auto_metric(torch.zeros(4, 3, 8, 8))
    ('kl_channels', 'mse')
    >>> auto_metric(torch.zeros(4, 6), "logits", multi_label=True)
    'bernoulli_kl'
    """
    if not output.is_floating_point() or output.dim() < 2:
        return "mse"
    if multi_label and output.dim() == 2 and may_hold_scores(name):
        return "bernoulli_kl"
    if output.dim() <= 3:
        return "kl" if may_hold_scores(name) and output.shape[-1] >= 2 else "mse"
    class_first = name is not None and ("logit" in name or name == "out")
    return "kl_channels" if class_first and output.shape[1] >= 2 else "mse"


def callable_id(fn: Any) -> str:
    """A stable identity of a callable for cache keys: its qualified name and source text."""
    if fn is None:
        return ""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return f"{name}\n{source}"


def resolve_metric(
    metric: Any, reference: Tensor, output_name: str | None = None, *, multi_label: bool = False
) -> tuple[str, MetricFn]:
    """``(name, function)`` for the ``metric`` argument given the fp32 output ``reference``
    (named ``output_name`` in the model's output) of a multi-label classifier or not."""
    if metric is None:
        name = auto_metric(reference, output_name, multi_label=multi_label)
        return name, E2E_METRICS[name]
    if isinstance(metric, str):
        if metric not in E2E_METRICS:
            raise invalid("metric", metric, f"None, one of {sorted(E2E_METRICS)} or a callable")
        return metric, E2E_METRICS[metric]
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__), metric
    raise invalid("metric", metric, f"None, one of {sorted(E2E_METRICS)} or a callable")


def call_metric(fn: MetricFn, name: str, ref: Tensor, out: Tensor, where: str) -> float:
    """``fn(ref, out)`` as a float, with a clear error naming the metric and ``where``."""
    try:
        value = fn(ref, out)
        value = float(value)
    except Exception as exc:
        raise RuntimeError(
            f"The metric {name!r} failed on {where}: {type(exc).__name__}: {exc}. "
            "A metric callable must take (reference_output, output) tensors and return a float."
        ) from exc
    if math.isnan(value):
        raise RuntimeError(f"The metric {name!r} returned NaN on {where}.")
    return value


def signal_of(ref: Tensor) -> float:
    """``sum(ref**2)`` (the SQNR numerator of one output), float32 cascade summation.

    >>> signal_of(torch.tensor([1.0, 2.0]))
    5.0
    """
    return float(ref.float().square().sum())


@dataclass
class LocalStats:
    """Running sums for a layer output's MSE and SQNR over calibration batches."""

    err: float = 0.0
    signal: float = 0.0
    count: int = 0
    finite: bool = True

    def update(self, ref: Tensor, out: Tensor, *, signal: float | None = None) -> None:
        """Add one (reference, quantized) output pair; ``signal``: ``sum(ref**2)`` if known.

        The difference and its squares are float32, summed by torch's cascade summation.
        """
        diff = out.float() - ref.float()
        e = float(diff.square_().sum())
        if not math.isfinite(e):
            self.finite = False
        self.err += e
        self.signal += signal_of(ref) if signal is None else signal
        self.count += ref.numel()

    @property
    def mse(self) -> float:
        return self.err / self.count if self.finite else math.inf

    @property
    def sqnr_db(self) -> float:
        if not self.finite:
            return -math.inf
        if self.err == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.err)


@dataclass
class E2EStats:
    """Sample-weighted mean of a per-batch end-to-end metric."""

    total: float = 0.0
    weight: int = 0
    finite: bool = True

    def update(self, value: float, n: int) -> None:
        if not math.isfinite(value):
            self.finite = False
        self.total += value * n
        self.weight += n

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.finite else math.inf
