"""Interactive figures with plotly (optional: imported only when called)."""

from __future__ import annotations

from typing import Any

from mpsearch.viz._data import pareto_data


def have_plotly() -> bool:
    """Whether plotly can be imported here (the notebooks fall back to matplotlib without it).

    >>> isinstance(have_plotly(), bool)
    True
    """
    import importlib.util

    return importlib.util.find_spec("plotly") is not None


def pareto_figure(result: Any, *, x: str = "memory_mb", y: str = "quality") -> Any:
    """A plotly scatter of every evaluated plan by origin, hover showing trial and origin,
    with the front as a step line. Needs plotly (``pip install plotly``).

    >>> pareto_figure(res, x="latency_ms").show()  # doctest: +SKIP
    """
    df = pareto_data(result, x=x, y=y)
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ImportError(
            "pareto_figure needs plotly: pip install plotly (or draw with plot_pareto)."
        ) from None
    fig = go.Figure()
    for kind, part in df.groupby("kind"):
        fig.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                mode="markers",
                name=str(kind),
                text=[
                    f"trial {t} ({o})" for t, o in zip(part["trial"], part["origin"], strict=True)
                ],
            )
        )
    front = df[df["on_front"]].sort_values(x)
    fig.add_trace(
        go.Scatter(x=front[x], y=front[y].cummax(), mode="lines", line_shape="hv", name="front")
    )
    fig.update_layout(xaxis_title=x, yaxis_title=y)
    return fig
