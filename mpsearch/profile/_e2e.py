"""Which calibration samples the profile's errors are measured on: all, the first n, or auto.

End-to-end errors are the costly part of a profile: for every layer the network downstream of
it is re-run once per scheme. On a deep network whose work is spread evenly over its depth
(ResNet-18: about L/2 full passes per scheme) that is many times more than the local errors,
which only re-run the layer itself. ``e2e_samples`` trades that cost against the noise of a
smaller sample. Local errors (``mse``, ``sqnr_db``) average over every element of a layer's
output, thousands per sample: ``local_samples`` bounds them to the first samples.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from mpsearch._data import Batch, batch_size
from mpsearch._validation import invalid

AUTO_EXACT_PASSES = 1.0
"""``e2e_samples="auto"`` measures on every sample when the end-to-end work per scheme is at
most this many full fp32 passes over the calibration data. Above it a classifier's subset is
its least certain samples, which carry a trained classifier's KL: on the trained digits CNN
(D = 1.35) its 95 least certain of 256 samples rank 40 random plans with Spearman 0.966,
as all 256 do (the first 95 samples: 0.950), for 0.5 instead of 1.35 passes per scheme. Their
mean KL is about 3x the mean over all samples: the ``e2e`` column ranks, it does not
estimate the mean over all samples."""

AUTO_E2E_PASSES = 0.5
"""``e2e_samples="auto"`` on a model above :data:`AUTO_EXACT_PASSES` keeps the end-to-end work
per scheme within this many full fp32 passes: ``ceil(samples * AUTO_E2E_PASSES / D)`` samples
(a classifier's least certain ones, else the first: :func:`most_uncertain`), D the model's
downstream work per scheme (``downstream_passes``). With the local errors (on
:data:`AUTO_LOCAL_SAMPLES` samples) and the stored pass, a profile then costs about two fp32
passes per scheme. Spearman rho of the ``e2e`` column against exact mode over all (layer,
scheme) rows (``benchmarks/bench_e2e_samples.py``): 0.993-1.000 on the trained digits
ResNet-18, text transformer and stdlib LM and on the Hugging Face, ResNet-18 and ViT zoo
models; 0.86 and 0.89 on the random-initialised MobileNet-V3 and EfficientNet-B0, whose
near-uniform outputs and many near-equal layers rank little better on twice the samples."""

AUTO_MIN_SAMPLES = 8
"""``e2e_samples="auto"`` never measures end-to-end errors on fewer samples than this (on very
deep networks, EfficientNet-B0 with D = 44, the budget alone would leave 3 of 256), unless
fewer samples already hold :data:`AUTO_MIN_ROWS` output distributions."""

AUTO_MIN_ROWS = 256
"""Output distributions (rows of the output's last dimension) that satisfy the floor of
:data:`AUTO_MIN_SAMPLES` by themselves: two samples of a language model on 128 tokens. With
the sample floor alone, a 13 M-parameter Llama calibrated on 64 sequences of 128 tokens
(D = 17) measured on 8 of them: 2.2 passes per scheme instead of half a pass."""


AUTO_LOCAL_SAMPLES = 64
"""``local_samples="auto"``: local errors on the calibration batches holding the first this
many samples, or on every sample when the end-to-end errors use every sample (they then come
with the same runs). Against all 256 samples (``mse`` column, Spearman rho over all (layer,
scheme) rows): 0.9987 on the Hugging Face Llama, 0.9963 GPT-2, 0.9996 BERT, 0.9995 on the
trained text transformer, where they cut the profile from 1.8-2.4 to 1.4-1.9 fp32 passes
per scheme (``benchmarks/bench_e2e_samples.py``)."""


def check_samples(value: Any, *, argument: str = "e2e_samples", kind: str = "argument") -> None:
    """Refuse a sample budget (``e2e_samples``, ``local_samples``) that is not ``None``,
    ``"auto"`` or an int >= 1.

    >>> check_samples("auto"); check_samples(64); check_samples(None)
    >>> check_samples(0, argument="local_samples")
    Traceback (most recent call last):
    ...
    ValueError: The 'local_samples' argument must be 'auto', None (every calibration sample) or a positive integer (the first n samples). Got 0 instead.
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(
            argument,
            value,
            "'auto', None (every calibration sample) or a positive integer (the first n samples)",
            kind=kind,
        )


def total_samples(batches: Sequence[Batch]) -> int:
    """Number of samples over all batches (leading dimension of each batch's first tensor)."""
    return sum(batch_size(b) for b in batches)


def choose_e2e_samples(
    value: Any, total: int, downstream_passes: float, *, rows_per_sample: int = 1
) -> int:
    """How many samples (the first ones) the end-to-end errors use.

    ``None``: all ``total``. An int: ``min(value, total)``. ``"auto"``: all of them when the
    end-to-end work per scheme, ``downstream_passes`` (in full fp32 passes over all samples),
    is at most :data:`AUTO_EXACT_PASSES`; else the share that brings it down to
    :data:`AUTO_E2E_PASSES`, at least :data:`AUTO_MIN_SAMPLES` or the samples that hold
    :data:`AUTO_MIN_ROWS` of the output's ``rows_per_sample`` distributions, if fewer.
    Deterministic: it depends on the model's structure and the data's shapes only, never on
    timings.

    >>> choose_e2e_samples("auto", 256, 1.0), choose_e2e_samples("auto", 256, 10.0)
    (256, 13)
    >>> choose_e2e_samples("auto", 64, 17.0), choose_e2e_samples("auto", 64, 17.0, rows_per_sample=128)
    (8, 2)
    """
    if value is None:
        return total
    if value == "auto":
        if downstream_passes <= AUTO_EXACT_PASSES:
            return total
        wanted = math.ceil(total * AUTO_E2E_PASSES / downstream_passes)
        floor = min(AUTO_MIN_SAMPLES, math.ceil(AUTO_MIN_ROWS / max(rows_per_sample, 1)))
        return min(total, max(wanted, floor))
    return min(int(value), total)


def choose_local_samples(value: Any, total: int, n_e2e: int) -> int:
    """How many samples (the first ones) the local errors use: all ``total`` for ``None``,
    ``min(value, total)`` for an int; for ``"auto"``, all of them when the end-to-end errors use
    all of them (``n_e2e``: the same runs give both), else at most :data:`AUTO_LOCAL_SAMPLES`
    (unless :func:`local_on_e2e` measures them on a classifier's least certain samples).

    >>> choose_local_samples("auto", 256, 256), choose_local_samples("auto", 256, 15)
    (256, 64)
    >>> choose_local_samples(None, 256, 15), choose_local_samples(100, 256, 256)
    (256, 100)
    """
    if value is None:
        return total
    if value == "auto":
        return total if n_e2e >= total else min(AUTO_LOCAL_SAMPLES, total)
    return min(int(value), total)


def local_on_e2e(value: Any, pick: str, n_e2e: int) -> bool:
    """Whether ``local_samples=value`` measures the local errors on the end-to-end samples,
    from the same runs: for ``"auto"``, when those are a classifier's least certain samples
    (``pick``, see ``mpsearch.profile._profile._pick``), at least
    :data:`AUTO_LOCAL_SAMPLES` of them. The first samples would otherwise need runs of every
    layer's variants of their own: on the zoo's ``flag_net`` (the 122 least certain of 256
    samples) the profile took 53.0 instead of 57.6 ms (machine A, 2 threads).

    >>> local_on_e2e("auto", "uncertain", 122), local_on_e2e("auto", "uncertain", 13)
    (True, False)
    >>> local_on_e2e("auto", "first", 122), local_on_e2e(64, "uncertain", 122)
    (False, False)
    """
    return (
        isinstance(value, str)
        and value == "auto"
        and pick == "uncertain"
        and n_e2e >= AUTO_LOCAL_SAMPLES
    )


def local_batches(value: Any, batches: Sequence[Batch], n_e2e: int) -> tuple[int, int]:
    """(leading batches, samples in them) holding the first samples :func:`choose_local_samples`
    picks: a batch the count ends inside is used whole.

    >>> local_batches(5, [torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)], 12)
    (2, 8)
    """
    wanted = choose_local_samples(value, total_samples(batches), n_e2e)
    count, seen = 0, 0
    for batch in batches:
        if seen >= wanted:
            break
        seen += batch_size(batch)
        count += 1
    return count, seen


def whole_batches(batches: Sequence[Batch], n: int) -> int:
    """How many leading batches lie wholly within the first ``n`` samples.

    >>> whole_batches([torch.zeros(4, 2), torch.zeros(4, 2)], 6)
    1
    """
    count, left = 0, n
    for batch in batches:
        left -= batch_size(batch)
        if left < 0:
            break
        count += 1
    return count


def _slice(batch: Batch, size: int, n: int) -> Batch:
    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == size:
            return t[:n]
        return t

    return pytree.tree_map(cut, batch)


def first_samples(batches: Sequence[Batch], n: int) -> list[Batch]:
    """The first ``n`` samples of ``batches``, as whole batches plus a cut last one.

    A batch is cut by slicing every tensor whose leading dimension is the batch size; other
    values (ints, flags, tensors of another length) are passed unchanged.

    >>> [b.shape[0] for b in first_samples([torch.zeros(4, 2), torch.zeros(4, 2)], 6)]
    [4, 2]
    """
    out: list[Batch] = []
    left = n
    for batch in batches:
        if left <= 0:
            break
        size = batch_size(batch)
        out.append(batch if size <= left else _slice(batch, size, left))
        left -= size
    return out


def rows_per_sample(output: torch.Tensor) -> int:
    """Distributions (rows of the last dimension) one sample of ``output`` holds: 1 for a
    classifier's ``[batch, classes]``, the tokens of a language model's ``[batch, tokens,
    vocab]``.

    >>> rows_per_sample(torch.zeros(4, 10)), rows_per_sample(torch.zeros(4, 32, 50))
    (1, 32)
    """
    return max(output.numel() // max(len(output) * output.shape[-1], 1), 1) if output.dim() else 1


def uncertainty(output: torch.Tensor) -> torch.Tensor:
    """Each sample's mean entropy (nats) of ``softmax(output)`` over the last dimension:
    ``[batch]``, float64. A sample the fp32 model is unsure of moves most under quantization.

    >>> uncertainty(torch.tensor([[0.0, 0.0], [9.0, -9.0]])).round(decimals=3).tolist()
    [0.693, 0.0]
    """
    log_p = torch.log_softmax(output.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return entropy.reshape(len(output), -1).mean(dim=1)


def most_uncertain(outputs: Sequence[torch.Tensor], n: int) -> list[list[int]]:
    """Per calibration batch, the positions (ascending) of the ``n`` samples of highest
    :func:`uncertainty` over all batches (ties: the earlier sample).

    >>> most_uncertain([torch.tensor([[0.0, 0.0], [9.0, 0.0]]), torch.tensor([[1.0, 0.0]])], 2)
    [[0], [0]]
    """
    scores = torch.cat([uncertainty(out) for out in outputs])
    offsets = list(itertools.accumulate((len(out) for out in outputs), initial=0))
    picks: list[list[int]] = [[] for _ in outputs]
    for i in sorted(torch.sort(-scores, stable=True).indices[:n].tolist()):
        b = bisect.bisect_right(offsets, i) - 1
        picks[b].append(i - offsets[b])
    return picks


class _Piece(NamedTuple):
    """Some samples of one batch: its flattened values, those of batch length cut."""

    spec: Any
    leaves: list[Any]
    batched: list[bool]
    size: int

    @classmethod
    def of(cls, batch: Batch, rows: list[int]) -> _Piece:
        full = batch_size(batch)
        leaves, spec = pytree.tree_flatten(batch)
        batched = [
            isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == full for t in leaves
        ]
        index = torch.tensor(rows)
        cut = [t.index_select(0, index) if b else t for t, b in zip(leaves, batched, strict=True)]
        return cls(spec, cut, batched, len(rows))

    def joins(self, other: _Piece) -> bool:
        """Whether ``other`` concatenates to this piece: the same structure, values of batch
        length with the same trailing shapes and dtype, every other value the same."""
        if self.spec != other.spec or self.batched != other.batched:
            return False
        return all(
            (x.shape[1:] == y.shape[1:] and x.dtype == y.dtype) if batched else _same(x, y)
            for x, y, batched in zip(self.leaves, other.leaves, self.batched, strict=True)
        )


def _same(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        both = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        return both and x.shape == y.shape and bool(torch.equal(x, y))
    return bool(x == y)


def picked_samples(batches: Sequence[Batch], picks: Sequence[Sequence[int]]) -> list[Batch]:
    """The samples ``picks[b]`` of each batch ``b``, packed into batches no larger than the
    largest calibration batch: consecutive pieces are concatenated where their structure,
    trailing shapes and other values agree (:func:`first_samples` says which values are cut),
    a piece split where it overfills a batch, so that compatible samples fill whole batches
    (the zoo's ``flag_net``: its 122 least certain of 256 samples in 4 batches, not 5).

    >>> x = [torch.arange(4.0).reshape(4, 1), torch.arange(4.0, 8.0).reshape(4, 1)]
    >>> [b.flatten().tolist() for b in picked_samples(x, [[1, 3], [0, 1, 2]])]
    [[1.0, 3.0, 4.0, 5.0], [6.0]]
    """
    limit = max(batch_size(b) for b in batches)
    groups: list[list[_Piece]] = []
    for batch, picked in zip(batches, picks, strict=True):
        rows = list(picked)
        while rows:
            group = groups[-1] if groups else []
            room = limit - sum(p.size for p in group)
            piece = _Piece.of(batch, rows[:room]) if group and room > 0 else None
            if piece is None or not group[0].joins(piece):
                piece = _Piece.of(batch, rows[:limit])
                groups.append([piece])
            else:
                group.append(piece)
            rows = rows[piece.size :]
    out = []
    for group in groups:
        first = group[0]
        leaves = [
            torch.cat([p.leaves[i] for p in group]) if batched else value
            for i, (value, batched) in enumerate(zip(first.leaves, first.batched, strict=True))
        ]
        out.append(pytree.tree_unflatten(leaves, first.spec))
    return out
