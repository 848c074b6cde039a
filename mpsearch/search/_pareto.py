"""Pareto fronts and hypervolume over (quality, memory, latency)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mpsearch.search._optuna_compat import compute_hypervolume


def pareto_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (duplicates all kept).

    >>> pareto_mask(np.array([[1.0, 5.0], [2.0, 6.0], [0.5, 1.0]]), [True, False]).tolist()
    [True, True, True]
    >>> pareto_mask(np.array([[1.0, 5.0], [2.0, 4.0]]), [True, False]).tolist()
    [False, True]
    """
    loss = _as_loss(points, maximize)
    n = len(loss)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(loss <= loss[i], axis=1) & np.any(loss < loss[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def hypervolume(points: np.ndarray, reference: Sequence[float], maximize: Sequence[bool]) -> float:
    """Hypervolume dominated by ``points`` and bounded by ``reference`` (in the points' units).

    Points that do not improve on the reference in every objective add nothing.

    >>> hypervolume(np.array([[1.0, 1.0]]), [0.0, 3.0], [True, False])
    2.0
    """
    if len(points) == 0:
        return 0.0
    loss = _as_loss(np.asarray(points, dtype=float), maximize)
    ref = _as_loss(np.asarray([reference], dtype=float), maximize)[0]
    inside = np.all(loss < ref, axis=1)
    if not inside.any():
        return 0.0
    loss = loss[inside]
    return compute_hypervolume(loss[pareto_mask(loss, [False] * loss.shape[1])], ref)


def _as_loss(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    sign = np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)
    return np.asarray(points, dtype=float) * sign
