"""Timing: the clock waits for an accelerator's queued work, so kernels are timed to their end."""

from __future__ import annotations

import pytest
import torch

from mpsearch.cost import TIMERS, clock, median_ms


class _FakeAccelerator:
    def __init__(self) -> None:
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> _FakeAccelerator:
    fake = _FakeAccelerator()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "synchronize", fake.synchronize)
    return fake


@pytest.mark.parametrize("timer", sorted(TIMERS))
def test_clock_synchronises_where_an_accelerator_is_present(accelerator, timer: str) -> None:
    read = clock(timer)
    read()
    assert accelerator.syncs == 1
    median_ms(lambda: None, repeats=4, warmup=1, timer=timer)
    assert accelerator.syncs >= 1 + 2 * 4  # a reading before and after every timed call


def test_clock_is_the_plain_one_without_an_accelerator(monkeypatch) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert clock("wall") is TIMERS["wall"] and clock("process") is TIMERS["process"]


def test_bad_timer_and_repeats() -> None:
    with pytest.raises(ValueError, match="'timer'"):
        median_ms(lambda: None, repeats=3, warmup=0, timer="cpu")
    with pytest.raises(ValueError, match="'repeats'"):
        median_ms(lambda: None, repeats=0, warmup=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_work_is_finished_when_the_clock_reads() -> None:
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # a kernel that keeps the GPU busy after its launch returns
    clock("wall")()
    assert torch.cuda.current_stream().query()  # nothing left queued


def test_stable_stops_early_once_the_median_settles() -> None:
    calls = []
    median_ms(lambda: calls.append(1), repeats=40, warmup=0, stable=0.5)
    assert 10 <= len(calls) < 40  # two chunks of 5 agree within 50% on a constant call
    calls.clear()
    median_ms(lambda: calls.append(1), repeats=40, warmup=0)
    assert len(calls) == 40


def test_cold_timing_option_and_its_helpers() -> None:
    from mpsearch.cost import CostOptions
    from mpsearch.cost._timing import cache_flusher, last_level_cache_bytes

    size = last_level_cache_bytes()
    assert size is None or size >= 1 << 16
    flush = cache_flusher(1 << 16)
    assert cache_flusher(1 << 16) is flush  # one buffer per size
    flush()
    assert CostOptions(cold="auto").settings()["cold"] == "auto"
    assert CostOptions.from_dict(CostOptions(cold=True).to_dict()).cold is True
    with pytest.raises(ValueError, match="'cold' option must be True, False or 'auto'"):
        CostOptions(cold="yes")
