"""Timing: the clock waits for an accelerator's queued work, so kernels are timed to their end."""

from __future__ import annotations

import pytest
import torch

from mpsearch.cost import TIMERS, clock, median_ms
from mpsearch.cost._autotune import machine_key
from mpsearch.cost._timing import ISA_CAPS, capped_flags, cpu_flags, cpu_model


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


XEON = frozenset({"avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"})


@pytest.mark.parametrize(
    ("caps", "kept"),
    [
        ({}, XEON),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"avx", "avx2"}),
        ({"ONEDNN_MAX_CPU_ISA": "avx2_vnni_2"}, {"avx", "avx2"}),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, XEON - {"amx_tile", "amx_bf16"}),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, {"avx", "avx2", "avx512f", "avx512_vnni"}),
        ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"}, {"avx", "avx2", "avx512f"}),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "ATEN_CPU_CAPABILITY": "avx2"}, {"avx", "avx2"}),
        ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, set()),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, XEON),
    ],
)
def test_isa_caps_remove_the_extensions_they_forbid(caps, kept) -> None:
    assert capped_flags(XEON, caps) == frozenset(kept)


def test_a_capped_cpu_is_another_machine(monkeypatch) -> None:
    for name in ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    native = cpu_model()
    assert "capped" not in native
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = cpu_model()
    assert capped.endswith("capped: ONEDNN_MAX_CPU_ISA=AVX2)") and capped != native
    assert not any(f.startswith(("avx512", "amx_")) for f in cpu_flags())
    assert "AMX" not in capped and "AVX-512" not in capped
    meta = {"device": native, "torch": "t", "backend": "cpu", "num_threads": 1, "timer": "wall"}
    assert machine_key(meta) != machine_key({**meta, "device": capped})
