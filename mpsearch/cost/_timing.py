"""Timing helpers: warm-up, repeats, median; wall clock or this process's CPU time.

Samples are taken by the standard library's ``timeit.Timer`` (one call per sample, garbage
collection paused, as ``torch.utils.benchmark.Timer`` does underneath) on a clock that, where
an accelerator is present, first waits for its queued work (``torch.accelerator.synchronize()``,
as ``torch.utils.benchmark.Timer``'s default clock does): a GPU kernel is timed to its end, not
to its launch.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mpsearch._validation import check_positive, invalid, unknown

TIMERS: dict[str, Callable[[], float]] = {
    "wall": timeit.default_timer,
    # CPU time of this process: robust to other processes sharing the cores; use it with
    # num_threads=1 (idle OpenMP threads spinning would otherwise be counted).
    "process": time.process_time,
}
"""The clocks ``median_ms`` (and the cost model) can time with, by name (see :func:`clock`)."""


def _synchronised(base: Callable[[], float]) -> Callable[[], float]:
    def read() -> float:
        torch.accelerator.synchronize()
        return base()

    read.__name__ = f"synchronised_{getattr(base, '__name__', 'clock')}"
    return read


def clock(timer: str = "wall") -> Callable[[], float]:
    """The clock named ``timer`` (see :data:`TIMERS`); where an accelerator is present, one
    that first waits for the accelerator's queued work, so that asynchronous kernels are timed
    to their end.

    >>> clock("process")() >= 0
    True
    """
    if timer not in TIMERS:
        raise unknown("timer", timer, TIMERS)
    base = TIMERS[timer]
    return _synchronised(base) if torch.accelerator.is_available() else base


def median_ms(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int,
    timer: str = "wall",
    stable: float | None = None,
    setup: Callable[[], Any] | None = None,
) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls
    (``setup()``, untimed, before each timed call: e.g. :func:`cache_flusher`'s).

    Runs under ``torch.inference_mode`` with the current number of threads; each call is one
    ``timeit`` sample read on :func:`clock`, which synchronises an accelerator. With
    ``stable`` (a relative tolerance, e.g. ``0.02``), sampling stops early, after at least
    :data:`MIN_STABLE_SAMPLES` calls, once one more chunk of samples moves the median by less
    than ``stable``: a slow layer is not timed 20 times when 5 agree.

    >>> median_ms(lambda: sum(range(100)), repeats=5, warmup=1) >= 0
    True
    """
    read = clock(timer)
    check_positive("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise invalid("warmup", warmup, "a non-negative integer")
    sampler = timeit.Timer(fn, setup=setup or "pass", timer=read)
    chunk = int(repeats) if stable is None else min(int(repeats), MIN_STABLE_SAMPLES)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = sampler.repeat(repeat=chunk, number=1)
        before = statistics.median(times)
        while len(times) < repeats:
            times += sampler.repeat(repeat=min(chunk, int(repeats) - len(times)), number=1)
            now = statistics.median(times)
            if stable is not None and abs(now - before) <= stable * before:
                break
            before = now
    return statistics.median(times) * 1e3


def last_level_cache_bytes() -> int | None:
    """Size of this CPU's last-level cache (Linux ``sysfs``), or ``None`` where unknown.

    >>> size = last_level_cache_bytes()
    >>> size is None or size > 0
    True
    """
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if best is None or level > best[0]:
            best = (level, size)
    return None if best is None else best[1]


@functools.cache
def cache_flusher(nbytes: int) -> Callable[[], None]:
    """A call that touches ``2 * nbytes`` of memory, evicting what the caches held (what a
    layer timed on its own must re-read, as a model whose weights exceed the cache does).

    >>> cache_flusher(1 << 16)()
    """
    buffer = torch.zeros(max(2 * nbytes // 4, 1), dtype=torch.float32)

    def flush() -> None:
        buffer.add_(1.0)

    return flush


MIN_STABLE_SAMPLES = 5
"""Samples :func:`median_ms` takes before it may stop early (and per chunk after that)."""


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


_ISA = (
    ("amx_tile", "AMX"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
)
"""The /proc/cpuinfo flags that decide which low-precision kernel wins, and their names."""


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The first CPU's model name and flags in /proc/cpuinfo (empty where there is none)."""
    name, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


ISA_CAPS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "MKL_ENABLE_INSTRUCTIONS",
)
"""Environment variables that cap the instructions a kernel library uses (oneDNN, ATen and
Inductor, fbgemm, MKL): set, the CPU behaves as a lesser one (``AVX2`` on an AMX Xeon: bf16
runs far slower than fp32 again), so timings and tuning caches taken under a cap are
another machine's."""

_ABOVE_AVX2 = ("avx512", "amx_")
_CAP_DROPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (a word in the cap's value, the flag prefixes a CPU so capped does not use), first match
    ("AMX", ()),
    ("AVX10", ("amx_",)),
    ("BF16", ("amx_",)),
    ("VNNI", ("amx_", "avx512_bf16")),  # AVX512_CORE_VNNI (AVX2_VNNI is read as AVX2)
    ("512", ("amx_", "avx512_bf16", "avx512_vnni")),
    ("AVX2", _ABOVE_AVX2),
    ("AVX", (*_ABOVE_AVX2, "avx2")),
    ("SSE", (*_ABOVE_AVX2, "avx2", "avx")),
)


def capped_flags(flags: frozenset[str], caps: dict[str, str]) -> frozenset[str]:
    """``flags`` less the extensions that the ISA caps in ``caps`` (:data:`ISA_CAPS` to
    value) forbid; the strictest cap wins. ``DEFAULT`` / ``ALL`` or an unknown value caps
    nothing.

    >>> sorted(capped_flags(frozenset({"avx2", "avx512f", "amx_tile"}), {"ONEDNN_MAX_CPU_ISA": "avx2"}))
    ['avx2']
    """
    drop: set[str] = set()
    for value in caps.values():
        upper = value.upper()
        if "AVX2_VNNI" in upper:
            upper = "AVX2"
        drop.update(next((d for word, d in _CAP_DROPS if word in upper), ()))
    return frozenset(f for f in flags if not f.startswith(tuple(drop)))


def isa_caps() -> dict[str, str]:
    """The :data:`ISA_CAPS` set in this process's environment, by name."""
    return {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (``avx2``, ``avx512_bf16``,
    ``amx_tile``...) less those an ISA cap in the environment forbids
    (:func:`capped_flags`); empty where the system has no /proc/cpuinfo."""
    return capped_flags(_cpuinfo()[1], isa_caps())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one, as ``lscpu`` prints it),
    the matrix / vector extensions among :data:`_ISA` its kernels may use, and the ISA caps
    set (:data:`ISA_CAPS`), e.g. ``"AMD EPYC (AVX-512 BF16, AVX-512 VNNI, AVX-512, AVX2)"``
    or ``"Intel(R) Xeon(R) Processor (AVX2; capped: ONEDNN_MAX_CPU_ISA=AVX2)"``. Timing and
    tuning caches are keyed by it."""
    name, _ = _cpuinfo()
    name = name or platform.processor() or platform.machine()
    flags, caps = cpu_flags(), isa_caps()
    isa = [label for flag, label in _ISA if flag in flags]
    if caps:
        isa_text = ", ".join(isa) + "; " if isa else ""
        return f"{name} ({isa_text}capped: {', '.join(f'{k}={v}' for k, v in caps.items())})"
    return name + (f" ({', '.join(isa)})" if isa else "")


def device_name(backend_name: str) -> str:
    """What the timings were taken on: the GPU's name for ``cuda``, the CPU model otherwise."""
    if backend_name == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_model()
