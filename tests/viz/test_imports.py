from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest


def fake_result() -> SimpleNamespace:
    trials = pd.DataFrame(
        {
            "trial": [0, 1, 2],
            "quality": [0.99, 0.9, 0.95],
            "memory_mb": [4.0, 1.0, 1.2],
            "latency_ms": [4.0, 3.0, 1.2],
            "origin": ["uniform:fp32", "uniform:w8a8", "sampler"],
            "quality_source": ["true"] * 3,
            "state": ["COMPLETE"] * 3,
            "feasible": [True] * 3,
        }
    )
    return SimpleNamespace(trials=trials, pareto=trials)


def test_importing_mpsearch_and_viz_loads_no_plotting_library() -> None:
    code = (
        "import sys, mpsearch, mpsearch.viz; "
        "print(sorted(m for m in ('matplotlib', 'plotly') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pareto_figure_with_plotly(tmp_path) -> None:
    pytest.importorskip("plotly")
    from mpsearch.viz import pareto_figure

    res = fake_result()
    fig = pareto_figure(res)
    assert [t.name for t in fig.data][-1] == "front"
    assert list(fig.data[-1].x) == [1.0, 1.2, 4.0]


def test_pareto_figure_without_plotly_says_how_to_get_it() -> None:
    from mpsearch.viz import have_plotly, pareto_figure

    if have_plotly():
        pytest.skip("plotly is installed")
    res = fake_result()
    with pytest.raises(ImportError, match="pip install plotly"):
        pareto_figure(res)
