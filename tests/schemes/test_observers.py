from __future__ import annotations

import pytest
import torch

from mpsearch.schemes import MinMaxObserver, MSEObserver, PercentileObserver
from mpsearch.schemes._observers import make_observer


def test_minmax_observer_tracks_extremes() -> None:
    obs = MinMaxObserver()
    obs.update(torch.tensor([0.5, 2.0]))
    obs.update(torch.tensor([-3.0, 1.0]))
    assert obs.range() == (-3.0, 2.0)


def test_percentile_observer_clips_outliers() -> None:
    x = torch.cat([torch.linspace(-1, 1, 100_001), torch.tensor([1000.0])])
    obs = PercentileObserver(99.9)
    obs.update(x)
    lo, hi = obs.range()
    assert -1.0 <= lo < -0.99 and 0.99 < hi <= 1.0


def test_mse_observer_clips_heavy_tail_and_beats_minmax() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g)
    x[:5] = 40.0
    mse = MSEObserver()
    mse.update(x)
    lo, hi = mse.range()
    assert hi < 40.0
    from mpsearch.schemes import fake_quantize

    err_mse = ((fake_quantize(x, mse.spec, lo=lo, hi=hi) - x) ** 2).mean()
    err_mm = ((fake_quantize(x, mse.spec, lo=x.min(), hi=x.max()) - x) ** 2).mean()
    assert err_mse < err_mm


def test_observer_errors() -> None:
    with pytest.raises(ValueError, match="saw no data"):
        MinMaxObserver().range()
    with pytest.raises(ValueError, match="NaN or inf"):
        MinMaxObserver().update(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="'observer' argument must be one of"):
        make_observer("histogram")
