"""Budgets: the memory and latency a plan may spend."""

from __future__ import annotations

from dataclasses import dataclass

from mpsearch._validation import check_fraction, check_positive, invalid


@dataclass(frozen=True)
class Budget:
    """Limits on a plan's memory (MB, 1e6 bytes) and predicted latency (ms).

    Absolute limits (``memory_mb``, ``latency_ms``) or limits relative to the fp32 model
    (``memory_fraction``, ``latency_fraction``, in (0, 1]); when both are given for one
    quantity, the tighter one applies.

    >>> Budget(memory_mb=5.0).limits(fp32_memory_mb=20.0, fp32_latency_ms=3.0)
    (5.0, None)
    >>> Budget(memory_fraction=0.3).limits(fp32_memory_mb=20.0, fp32_latency_ms=3.0)
    (6.0, None)
    """

    memory_mb: float | None = None
    latency_ms: float | None = None
    memory_fraction: float | None = None
    latency_fraction: float | None = None

    def __post_init__(self) -> None:
        check_positive("memory_mb", self.memory_mb, allow_none=True)
        check_positive("latency_ms", self.latency_ms, allow_none=True)
        for name in ("memory_fraction", "latency_fraction"):
            value = getattr(self, name)
            if value is not None:
                check_fraction(name, value, open_high=False)

    @property
    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (self.memory_mb, self.latency_ms, self.memory_fraction, self.latency_fraction)
        )

    def limits(
        self, *, fp32_memory_mb: float, fp32_latency_ms: float
    ) -> tuple[float | None, float | None]:
        """``(memory_mb, latency_ms)`` limits in absolute units (``None``: no limit)."""
        return (
            _tighter(self.memory_mb, self.memory_fraction, fp32_memory_mb),
            _tighter(self.latency_ms, self.latency_fraction, fp32_latency_ms),
        )


def _tighter(absolute: float | None, fraction: float | None, reference: float) -> float | None:
    values = [
        v for v in (absolute, None if fraction is None else fraction * reference) if v is not None
    ]
    return min(values) if values else None


def as_budget(budget: Budget | dict | None) -> Budget:
    """A ``Budget`` from a ``Budget``, a dict of its fields, or ``None`` (no limit)."""
    if budget is None:
        return Budget()
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, dict):
        try:
            return Budget(**budget)
        except TypeError:
            raise invalid(
                "budget",
                budget,
                "a Budget or a dict with keys memory_mb, latency_ms, memory_fraction, latency_fraction",
            ) from None
    raise invalid("budget", budget, "a Budget, a dict of its fields, or None")
