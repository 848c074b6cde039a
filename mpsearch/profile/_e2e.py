"""Which calibration samples the end-to-end errors are measured on: all, the first n, or auto.

End-to-end errors are the costly part of a profile: for every layer the network downstream of
it is re-run once per scheme. On a deep network whose work is spread evenly over its depth
(ResNet-18: about L/2 full passes per scheme) that is many times more than the local errors,
which only re-run the layer itself. ``e2e_samples`` trades that cost against the noise of a
smaller sample; local errors always use every calibration sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from mpsearch._data import Batch, batch_size
from mpsearch._validation import invalid

AUTO_E2E_PASSES = 0.5
"""``e2e_samples="auto"`` keeps the end-to-end work per scheme within this many full fp32
passes over the calibration data: every sample when the model's downstream work per scheme
(``downstream_passes``, D) is at most this, else the first ``ceil(samples * AUTO_E2E_PASSES /
D)``. With the local errors (about one pass per scheme) and the stored pass, a profile then
costs two to three fp32 passes per scheme. Spearman rho of the ``e2e`` column against exact
mode over all (layer, scheme) rows, zoo models (``benchmarks/bench_e2e_samples.py``): 0.996-1.000
on the Hugging Face, LSTM, audio, ResNet-18 and ViT models (lowest per-scheme rho 0.90 on a
5-layer CNN), as with the previous budget of one pass; 0.94 and 0.92 on the random-initialised
MobileNet-V3 and EfficientNet-B0, whose many near-equal layers rank no better on 16 samples."""

AUTO_MIN_SAMPLES = 8
"""``e2e_samples="auto"`` never measures end-to-end errors on fewer samples than this: on very
deep networks (EfficientNet-B0, D = 44) the budget alone would leave 3 samples."""


def check_e2e_samples(value: Any, *, kind: str = "argument") -> None:
    """Refuse an ``e2e_samples`` value that is not ``None``, ``"auto"`` or an int >= 1.

    >>> check_e2e_samples("auto"); check_e2e_samples(64); check_e2e_samples(None)
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(
            "e2e_samples",
            value,
            "'auto', None (every calibration sample) or a positive integer (the first n samples)",
            kind=kind,
        )


def total_samples(batches: Sequence[Batch]) -> int:
    """Number of samples over all batches (leading dimension of each batch's first tensor)."""
    return sum(batch_size(b) for b in batches)


def choose_e2e_samples(value: Any, total: int, downstream_passes: float) -> int:
    """How many samples (the first ones) the end-to-end errors use.

    ``None``: all ``total``. An int: ``min(value, total)``. ``"auto"``: the share of them
    that keeps the end-to-end work per scheme, ``downstream_passes`` (in full fp32 passes over
    all samples), within :data:`AUTO_E2E_PASSES` (all of them on a shallow model), at least
    :data:`AUTO_MIN_SAMPLES`. Deterministic: it depends on the model's structure and the
    data's shapes only, never on timings.

    >>> choose_e2e_samples("auto", 256, 0.4), choose_e2e_samples("auto", 256, 10.0)
    (256, 13)
    """
    if value is None:
        return total
    if value == "auto":
        wanted = math.ceil(total * AUTO_E2E_PASSES / max(downstream_passes, 1e-12))
        return min(total, max(wanted, AUTO_MIN_SAMPLES))
    return min(int(value), total)


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
