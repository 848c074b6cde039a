"""The optional C helper gives the portable path's top-2 gaps bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from mpsearch.runtime import _scorers

topgap = pytest.importorskip("mpsearch.runtime._topgap", reason="built without a C compiler")

INF, NAN = math.inf, math.nan
EDGE_ROWS = [
    [1.0, NAN, 0.0],
    [NAN, 1.0, 0.0],
    [1.0, 0.0, NAN],
    [INF, 1.0, 0.0],
    [1.0, INF, 0.0],
    [INF, INF, 0.0],
    [INF, -INF, 0.0],
    [-INF, -INF, -INF],
    [2.0, 2.0, 1.0],
    [1.0, 2.0, 2.0],
    [0.0, -0.0, -1.0],
    [3.0, 1e38, -1e38],
]


def _portable(logits: torch.Tensor, monkeypatch) -> list[float]:
    """The portable path's gaps (the C helper switched off for the call)."""
    with monkeypatch.context() as patch:
        patch.setattr(_scorers, "_topgap", None)
        return _scorers.top2_gaps(logits)


def same(a: list[float], b: list[float]) -> bool:
    """Equal floats, NaN equal to NaN, signed zeros told apart."""
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1, x) == math.copysign(1, y))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("cols", [0, 1, 2, 3, 7, 96, 5000])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_c_gaps_equal_the_topk_path(rows: int, cols: int, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(rows * 10_000 + cols)
    logits = torch.randn(rows, cols, generator=gen) * 5
    if cols >= 2:  # ties to the runner-up and to the top
        logits[:, 1] = logits[:, 0]
        logits[: rows // 2, -1] = logits[: rows // 2].amax(-1)
    expected = _portable(logits, monkeypatch)
    assert same(topgap.gaps(logits.data_ptr(), rows, cols), expected)
    assert same([topgap.gap(r.data_ptr(), cols) for r in logits], expected)
    assert same(_scorers.top2_gaps(logits), expected)  # the C path when it can read them


def test_c_gaps_equal_the_topk_path_on_edge_rows(monkeypatch) -> None:
    logits = torch.tensor(EDGE_ROWS, dtype=torch.float32)
    expected = _portable(logits, monkeypatch)
    assert same(topgap.gaps(logits.data_ptr(), *logits.shape), expected)
    assert same([topgap.gap(r.data_ptr(), r.numel()) for r in logits], expected)
    assert math.isnan(expected[0]) and expected[3] == -INF and math.isnan(expected[5])


def test_c_helper_reads_only_contiguous_float32_cpu_tensors(monkeypatch) -> None:
    base = torch.randn(6, 10)
    assert _scorers._c_readable(base) and _scorers._c_readable(base[2:4])
    assert not _scorers._c_readable(base.t())  # columns: not contiguous
    assert not _scorers._c_readable(base[:, ::2])
    assert not _scorers._c_readable(base.double())
    assert not _scorers._c_readable(base.bfloat16())
    assert not _scorers._c_readable(base[0])  # one dimension
    negated = torch._neg_view(torch.tensor([[1.0, 5.0, 2.0]]))  # memory holds 1, 5, 2
    assert not _scorers._c_readable(negated)
    assert _scorers.top2_gaps(negated) == [-1.0]  # -2 - (-1), not 2 - 5
    # a view with an offset: data_ptr points at its first element
    view = base[3:5]
    assert _scorers.top2_gaps(view) == _portable(view, monkeypatch)


def test_c_helper_refuses_bad_arguments() -> None:
    x = torch.zeros(1, 4)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        topgap.gap(x.data_ptr())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="takes 3 arguments"):
        topgap.gaps(x.data_ptr(), 1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        topgap.gap(x.data_ptr(), -1)
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        topgap.gaps(x.data_ptr(), 1, -4)
    with pytest.raises(TypeError):
        topgap.gap("0", 4)  # type: ignore[arg-type]
