"""Activation range observers for static quantization: min-max, percentile, MSE-optimal."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from mpsearch._validation import invalid, unknown
from mpsearch.schemes._fakequant import fake_quantize
from mpsearch.schemes._quantspec import QuantSpec


class Observer(ABC):
    """Watches activations and proposes one ``(lo, hi)`` range for per-tensor quantization.

    >>> obs = MinMaxObserver(); obs.update(torch.tensor([-1.0, 3.0])); obs.range()
    (-1.0, 3.0)
    """

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise ValueError(
                "An observer received NaN or inf activations; check the calibration data."
            )
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += x.numel()
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError(
                f"{type(self).__name__} saw no data: run calibration batches through it first."
            )

    @abstractmethod
    def range(self) -> tuple[float, float]: ...


class MinMaxObserver(Observer):
    """The full observed range."""

    def range(self) -> tuple[float, float]:
        self._check()
        return self.lo, self.hi


class _SampleObserver(Observer):
    """Keeps a bounded, seeded sample of the values it sees."""

    def __init__(self, *, max_samples: int = 1 << 18, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._samples: list[torch.Tensor] = []
        self._kept = 0

    def _update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        budget = max(self.max_samples // 8, 1)
        if flat.numel() > budget:
            idx = torch.randint(0, flat.numel(), (budget,), generator=self._gen)
            flat = flat[idx]
        self._samples.append(flat.clone())
        self._kept += flat.numel()
        if self._kept > self.max_samples:
            merged = torch.cat(self._samples)
            idx = torch.randperm(merged.numel(), generator=self._gen)[: self.max_samples]
            self._samples, self._kept = [merged[idx]], self.max_samples

    def sample(self) -> torch.Tensor:
        self._check()
        return torch.cat(self._samples)


class PercentileObserver(_SampleObserver):
    """Clips at the ``percentile`` (and ``100 - percentile``) of the observed values."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        if not (isinstance(percentile, (int, float)) and 50 < percentile <= 100):
            raise invalid("percentile", percentile, "a number in (50, 100]")
        super().__init__(**kwargs)
        self.percentile = float(percentile)

    def range(self) -> tuple[float, float]:
        s = self.sample()
        q = torch.quantile(s, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
        return min(float(q[0]), 0.0), max(float(q[1]), 0.0)


class MSEObserver(_SampleObserver):
    """Chooses the clipping of ``[lo, hi]`` that minimises the quantization MSE under ``spec``."""

    def __init__(self, spec: QuantSpec | None = None, *, grid: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec or QuantSpec("int8", symmetric=False, zero_point_bits=8)
        self.grid = grid

    def range(self) -> tuple[float, float]:
        s = self.sample()
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        best, best_err = (lo, hi), float("inf")
        for i in range(self.grid):
            ratio = 1.0 - i / (self.grid + 1)
            c_lo, c_hi = lo * ratio, hi * ratio
            err = float(((fake_quantize(s, self.spec, lo=c_lo, hi=c_hi) - s) ** 2).mean())
            if err < best_err:
                best, best_err = (c_lo, c_hi), err
        return best


OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str | Observer | Callable[[], Observer], **kwargs) -> Observer:
    """An observer from its registry name (``minmax``, ``percentile``, ``mse``) or a factory."""
    if isinstance(name, Observer):
        return name
    if callable(name):
        return name(**kwargs)
    if name not in OBSERVERS:
        raise unknown("observer", name, OBSERVERS)
    return OBSERVERS[name](**kwargs)
