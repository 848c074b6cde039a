"""End-to-end metrics scored for many outputs at once equal the metric of each output."""

from __future__ import annotations

import math

import pytest
import torch

from mpsearch.profile import kl_divergence, mean_squared_error
from mpsearch.profile._metrics import E2EScorer


def _outputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 10, generator=g) * 3
    outs = ref + 0.1 * torch.randn(4, 16, 10, generator=g)
    return ref, outs


@pytest.mark.parametrize(("name", "fn"), [("kl", kl_divergence), ("mse", mean_squared_error)])
def test_batched_builtin_metrics_equal_one_at_a_time(name: str, fn) -> None:
    ref, outs = _outputs()
    scorer = E2EScorer(ref, name, fn)
    assert scorer.batched is not None
    got = scorer(outs, [f"output {i}" for i in range(len(outs))])
    want = [fn(ref, out) for out in outs]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert all(v > 0 for v in got)


def test_per_token_logits_are_scored_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4, 5, 7, generator=g)
    outs = torch.stack([ref, ref + 0.2 * torch.randn(4, 5, 7, generator=g)])
    got = E2EScorer(ref, "kl", kl_divergence)(outs, ["a", "b"])
    assert got[0] == 0.0
    assert got[1] == pytest.approx(kl_divergence(ref, outs[1]), rel=1e-12)


def test_non_finite_output_scores_inf_and_others_are_kept() -> None:
    ref, outs = _outputs()
    outs[1, 3, 2] = torch.inf
    outs[2, 0, 0] = torch.nan
    for name, fn in (("kl", kl_divergence), ("mse", mean_squared_error)):
        got = E2EScorer(ref, name, fn)(outs, ["a", "b", "c", "d"])
        assert got[1] == got[2] == math.inf
        assert got[0] == pytest.approx(fn(ref, outs[0]), rel=1e-12)


def test_callable_metric_is_called_per_finite_output_with_where_in_errors() -> None:
    ref, outs = _outputs()
    outs[3, 0, 0] = torch.inf
    calls = []

    def max_abs(r: torch.Tensor, o: torch.Tensor) -> float:
        calls.append(o.shape)
        return float((r - o).abs().max())

    got = E2EScorer(ref, "max_abs", max_abs)(outs, ["a", "b", "c", "d"])
    assert len(calls) == 3 and got[3] == math.inf
    assert got[:3] == [max_abs(ref, o) for o in outs[:3]]

    def nan_metric(r: torch.Tensor, o: torch.Tensor) -> float:
        return math.nan

    with pytest.raises(RuntimeError, match="'nan_metric' returned NaN on layer 'x', batch 2"):
        E2EScorer(ref, "nan_metric", nan_metric)(outs[:1], ["layer 'x', batch 2"])
