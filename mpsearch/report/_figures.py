"""The report's figures as PNG bytes: thin matplotlib drawing over the tested report / viz data.

matplotlib is imported here only (``Figure`` without pyplot: no GUI backend, no global state).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from mpsearch.report._data import controller_curve_data, speedup_table
from mpsearch.report._record import StudyRecord


def _new_axes(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig.subplots()


def _png(ax: Any) -> bytes:
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _mark_chosen(record: StudyRecord, ax: Any, x: str) -> None:
    if record.best is None or not record.best.metadata:
        return
    meta = record.best.metadata
    if x in meta and "quality" in meta:
        ax.scatter(
            [meta[x]],
            [meta["quality"]],
            marker="*",
            s=220,
            color="crimson",
            edgecolor="black",
            zorder=5,
            label="chosen",
        )
        ax.legend(fontsize=8)


def draw_front(record: StudyRecord, ax: Any, *, x: str) -> None:
    """Every evaluated plan and the front (``mpsearch.viz.plot_pareto``), the chosen plan starred."""
    from mpsearch.viz import plot_pareto

    plot_pareto(record, x=x, y="quality", ax=ax)
    _mark_chosen(record, ax, x)
    label = {"memory_mb": "memory (MB)", "latency_ms": "predicted latency (ms)"}[x]
    ax.set_xlabel(label)
    ax.set_title(f"quality × {label.split(' (')[0]}")
    ax.grid(alpha=0.3)


def draw_speedups(record: StudyRecord, ax: Any) -> None:
    """Horizontal bars: measured speed-up over fp32 of each plan in ``summary.csv``."""
    df = speedup_table(record)
    colors = {"reference": "tab:gray", "chosen": "crimson", "best uniform": "tab:blue"}
    ax.barh(df["plan"], df["speedup"], color=[colors.get(r, "tab:cyan") for r in df["role"]])
    for i, (value, q) in enumerate(zip(df["speedup"], df["quality"], strict=True)):
        ax.text(value, i, f" {value:.2f}× (q {q:.3f})", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("measured speed-up over fp32 (×)")
    ax.set_xlim(0, max(1.0, float(df["speedup"].max())) * 1.35)
    ax.set_title("measured on the real backend")


def draw_bits(record: StudyRecord, ax: Any) -> None:
    """Weight bits per layer of each front plan and the chosen one (``plot_bit_allocation``)."""
    from mpsearch.viz import plot_bit_allocation

    plans = list(record.pareto["plan"]) if record.pareto is not None else []
    labels = [f"trial {int(t)}" for t in record.pareto["trial"]] if plans else []
    if record.best is not None:
        plans.append(record.best)
        labels.append("chosen")
    plot_bit_allocation(plans, record.layers, labels=labels, ax=ax)
    ax.set_title("weight bits per layer")


def draw_controller(record: StudyRecord, ax: Any) -> None:
    """Disagreement with fp32 against per-input latency: controller series as lines, static plans as points."""
    df = controller_curve_data(record.controller)
    for series, part in df.groupby("series", sort=False):
        if series == "static":
            ax.scatter(part["latency_ms"], part["disagreement"], color="black", s=30, zorder=4)
            for row in part.itertuples():
                ax.annotate(
                    row.method.split(":", 1)[-1],
                    (row.latency_ms, row.disagreement),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        else:
            ax.plot(part["latency_ms"], part["disagreement"], marker="o", label=series)
    ax.set_xlabel("latency per input (ms)")
    ax.set_ylabel("disagreement with fp32")
    ax.set_title("run-time controller")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def report_figures(record: StudyRecord) -> dict[str, bytes]:
    """PNG bytes of every figure the record has data for, by name (``front_memory``, ...)."""
    jobs: dict[str, tuple[Callable[[Any], None], tuple[float, float]]] = {}
    if record.trials is not None and record.pareto is not None and len(record.pareto):
        jobs["front_memory"] = (lambda ax: draw_front(record, ax, x="memory_mb"), (5.4, 3.8))
        jobs["front_latency"] = (lambda ax: draw_front(record, ax, x="latency_ms"), (5.4, 3.8))
    if record.summary is not None and len(record.summary):
        jobs["speedups"] = (
            lambda ax: draw_speedups(record, ax),
            (7.0, 0.9 + 0.45 * len(record.summary)),
        )
    if record.layers and (record.pareto is not None or record.best is not None):
        n = (len(record.pareto) if record.pareto is not None else 0) + 1
        jobs["bits"] = (lambda ax: draw_bits(record, ax), (7.0, 1.5 + 0.22 * n))
    if record.controller is not None and len(record.controller):
        jobs["controller"] = (lambda ax: draw_controller(record, ax), (5.4, 3.6))
    out = {}
    for name, (draw, size) in jobs.items():
        ax = _new_axes(*size)
        draw(ax)
        out[name] = _png(ax)
    return out
