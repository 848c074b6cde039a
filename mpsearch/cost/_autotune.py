"""Autotuning: time every implementation of a (layer, scheme) on the layer's real input and keep
the fastest, as torchao's autoquant does per layer; the picks are cached per machine.

A backend lists the implementations (:meth:`~mpsearch.backends._kernels.KernelBackend.candidates`,
the default first); :func:`fastest` times them and returns the winner with every timing.
:class:`TuneCache` keeps the winners in one JSON file per machine fingerprint (CPU model and
ISA, torch version, threads), written atomically, so a second model with the same layer shapes
on the same machine is not timed again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpsearch.cost._cache import cache_key, read_cache, write_cache


@dataclass(frozen=True)
class Tuned:
    """The autotuner's pick for one (layer, scheme): the winning implementation's name and
    the median ms of every implementation timed (``inf`` for one that failed to build or
    run; ``errors`` says why)."""

    choice: str
    times_ms: dict[str, float]
    errors: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "times_ms": self.times_ms, "errors": self.errors}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tuned:
        return cls(str(data["choice"]), dict(data["times_ms"]), dict(data.get("errors", {})))


def fastest(names: Sequence[str], time_ms: Callable[[str], float], *, margin: float = 0.1) -> Tuned:
    """Time each implementation (``time_ms(name)``, median ms) and pick the fastest; the
    first (the default) keeps the place unless another beats it by more than ``margin``
    (a layer timed alone is not timed in its model: only a clear gain is worth a switch).
    An implementation that raises is recorded with its error and never picked.

    >>> fastest(["default", "im2col"], {"default": 2.0, "im2col": 1.0}.__getitem__).choice
    'im2col'
    """
    if not names:
        raise ValueError("fastest() needs at least one implementation to time")
    times: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            times[name] = float(time_ms(name))
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            times[name], errors[name] = float("inf"), f"{type(exc).__name__}: {exc}"
    first = names[0]
    best = min(times, key=times.__getitem__)
    if times[best] >= times[first] * (1 - margin):
        best = first
    if times[best] == float("inf"):
        raise RuntimeError(f"no implementation ran: {errors}")
    return Tuned(best, times, errors)


def machine_key(meta: Mapping[str, Any]) -> str:
    """The fingerprint a tuning cache is valid for: device, torch version, threads, timer."""
    return cache_key({k: meta[k] for k in ("device", "torch", "backend", "num_threads", "timer")})


class TuneCache:
    """Autotuning picks of one machine, by ``"<choice key> x=<input shape, dtype, strides>"``; read once, written
    back atomically (a torn or foreign file is ignored and re-measured)."""

    def __init__(self, cache_dir: str | Path | None, meta: Mapping[str, Any]) -> None:
        self.key = machine_key(meta)
        self.path = None if cache_dir is None else Path(cache_dir) / f"autotune-{self.key}.json"
        payload = read_cache(self.path, self.key) if self.path is not None else None
        self.entries: dict[str, Tuned] = {
            k: Tuned.from_dict(v) for k, v in (payload or {}).get("entries", {}).items()
        }
        self._dirty = False

    @staticmethod
    def entry(choice_key: str, x: torch.Tensor) -> str:
        return f"{choice_key} x={tuple(x.shape)}:{x.dtype}:{x.stride()}"

    def get(self, entry: str) -> Tuned | None:
        return self.entries.get(entry)

    def put(self, entry: str, tuned: Tuned) -> None:
        self.entries[entry] = tuned
        self._dirty = True

    def save(self) -> None:
        if self.path is not None and self._dirty:
            write_cache(
                self.path, self.key, {"entries": {k: v.to_dict() for k, v in self.entries.items()}}
            )
            self._dirty = False


__all__ = ["TuneCache", "Tuned", "fastest", "machine_key"]
