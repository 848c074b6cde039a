"""Timing helpers: warm-up, repeats, median; wall clock or this process's CPU time."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mpsearch._validation import unknown

TIMERS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU time of this process: robust to other processes sharing the cores; use it with
    # num_threads=1 (idle OpenMP threads spinning would otherwise be counted).
    "process": time.process_time,
}


def median_ms(fn: Callable[[], Any], *, repeats: int, warmup: int, timer: str = "wall") -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    >>> median_ms(lambda: sum(range(100)), repeats=5, warmup=1) >= 0
    True
    """
    if timer not in TIMERS:
        raise unknown("timer", timer, TIMERS)
    clock = TIMERS[timer]
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = clock()
            fn()
            times.append(clock() - start)
    return statistics.median(times) * 1e3


@contextmanager
def threads(num_threads: int | None) -> Iterator[int]:
    """Run with ``num_threads`` intra-op threads (``None``: leave as is); restored afterwards."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(backend_name: str) -> str:
    """What the timings were taken on: the GPU's name for ``cuda``, the CPU model otherwise."""
    if backend_name == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_model()
