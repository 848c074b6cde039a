"""Heat-map data of a profile (tested) and its thin matplotlib drawing (imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mpsearch.profile._result import SensitivityProfile


def heatmap_data(
    profile: SensitivityProfile, metric: str = "e2e"
) -> tuple[np.ndarray, list[str], list[str]]:
    """``(matrix, row labels, column labels)``: ``metric`` per layer (rows) and scheme (columns).

    Skipped pairs are NaN.

    >>> from mpsearch.profile import SensitivityProfile  # doctest: +SKIP
    >>> matrix, layers, schemes = heatmap_data(prof, "e2e")  # doctest: +SKIP
    """
    wide = profile.pivot(metric)
    if "status" in profile.table.columns:
        skipped = profile.table[profile.table["status"] == "skipped"]
        for layer, scheme in zip(skipped["layer"], skipped["scheme"], strict=True):
            wide.loc[layer, scheme] = np.nan
    return wide.to_numpy(dtype=float), list(wide.index), list(wide.columns)


def plot_heatmap(profile: SensitivityProfile, metric: str = "e2e", *, ax: Any = None) -> Any:
    """Draw :func:`heatmap_data` (log10 for error metrics) on ``ax``; returns the axes."""
    import matplotlib.pyplot as plt

    matrix, rows, cols = heatmap_data(profile, metric)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.3 * len(rows) + 2))
    shown = matrix
    label = metric
    if metric != "sqnr_db":
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.log10(np.where(matrix > 0, matrix, np.nan))
        label = f"log10 {metric}"
    image = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.figure.colorbar(image, ax=ax, label=label)
    ax.set_title(f"per-layer sensitivity ({metric})")
    return ax
