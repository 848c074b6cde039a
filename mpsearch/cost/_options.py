"""``CostOptions``: how ``measure_cost`` times, in one frozen, validated object (YAML round trip)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mpsearch._options import (
    Check,
    Options,
    flag,
    non_negative_int,
    optional_names,
    optional_path,
    optional_positive_int,
    positive_int,
)
from mpsearch._validation import invalid, unknown
from mpsearch.cost._timing import TIMERS


def _cold(name: str, value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise invalid(name, value, "True, False or 'auto'", kind="option")


def _timer(name: str, value: Any) -> str:
    if value not in TIMERS:
        raise unknown(name, value, TIMERS, kind="option")
    return value


def _share(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise invalid(name, value, "None or a number between 0 and 1", kind="option")
    return float(value)


@dataclass(frozen=True)
class CostOptions(Options):
    """How :func:`~mpsearch.cost.measure_cost` measures.

    - ``layers``: the layers to measure (``None``: every quantizable layer);
    - ``repeats``, ``warmup``: timed calls (their median is kept) after untimed ones;
    - ``cache_dir``: where the measurements are stored per device, layer shapes, schemes and
      backend, and reused (``None``: no cache);
    - ``num_threads``: intra-op threads while timing (``None``: as set);
    - ``timer``: ``"wall"`` clock or this ``"process"``'s CPU time (steadier on a shared
      machine; use it with ``num_threads=1``);
    - ``stable``: stop timing a layer early once more samples move its median by less than
      this share (``None``: always ``repeats`` samples);
    - ``autotune``: time every implementation the backend has for a (layer, scheme) and keep
      the fastest (``False``: the backend's default implementation only);
    - ``cold``: time each layer with the caches flushed first (its weights read from memory,
      as in batch-1 decoding of a model whose weights exceed the last-level cache): ``True``,
      ``False`` or ``"auto"`` (when the model's tensors exceed this CPU's last-level cache).

    Every field is checked when the object is made; it round-trips through a plain dict
    (:meth:`to_dict` / :meth:`from_dict`, e.g. from YAML).

    >>> opts = CostOptions(repeats=10, num_threads=1, timer="process")
    >>> CostOptions.from_dict(opts.to_dict()) == opts
    True
    >>> CostOptions(repeats=-3)
    Traceback (most recent call last):
    ...
    ValueError: The 'repeats' option must be a positive integer. Got -3 instead.
    """

    layers: Sequence[str] | None = None
    repeats: int = 20
    warmup: int = 3
    cache_dir: str | Path | None = None
    num_threads: int | None = None
    timer: str = "wall"
    stable: float | None = 0.02
    autotune: bool = True
    cold: bool | str = False

    CHECKS: ClassVar[dict[str, Check]] = {
        "layers": optional_names,
        "repeats": positive_int,
        "warmup": non_negative_int,
        "cache_dir": optional_path,
        "num_threads": optional_positive_int,
        "timer": _timer,
        "stable": _share,
        "autotune": flag,
        "cold": _cold,
    }
    VERB: ClassVar[str] = "measure_cost"

    def settings(self) -> dict[str, Any]:
        """What timing a model again needs: ``repeats``, ``warmup``, ``num_threads``, ``timer``."""
        return {
            "repeats": self.repeats,
            "warmup": self.warmup,
            "num_threads": self.num_threads,
            "timer": self.timer,
            "stable": self.stable,
            "cold": self.cold,
        }
