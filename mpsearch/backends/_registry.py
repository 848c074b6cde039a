"""The backend interface and its registry: backends are chosen by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

from torch import nn

from mpsearch._validation import unknown
from mpsearch.schemes import Scheme


class Backend(ABC):
    """How a plan is executed.

    A backend turns one layer into its quantized counterpart for one scheme. ``real``
    backends run real low-precision kernels (speed and memory are real); ``simulate`` fakes
    the arithmetic in float32 for any scheme on any device.
    """

    name: ClassVar[str]
    real: ClassVar[bool] = False
    needs_calib: ClassVar[bool] = False
    """Whether :meth:`finalize` calibrates the whole model (it then takes ``calib=``)."""

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine (``None`` when it can)."""
        return None

    def unsupported_reason(self, layer: nn.Module, scheme: Scheme) -> str | None:
        """Why ``layer`` cannot run in ``scheme`` on this backend (``None`` when it can)."""
        return None

    @abstractmethod
    def quantize_layer(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> nn.Module:
        """A new module computing ``layer`` in ``scheme``; ``layer`` itself is left untouched."""

    def finalize(self, model: nn.Module, assignment: Mapping[str, str]) -> nn.Module:
        """Whole-model step after every layer is swapped (e.g. conversions at the boundaries)."""
        return model


BACKENDS: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend factory under ``name`` (instantiated lazily, once)."""
    BACKENDS[name] = factory
    _INSTANCES.pop(name, None)


def get_backend(backend: str | Backend) -> Backend:
    """The backend called ``backend`` (a ``Backend`` instance is returned as is).

    >>> get_backend("simulate").name
    'simulate'
    """
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise unknown("backend", backend, BACKENDS)
    if backend not in _INSTANCES:
        _INSTANCES[backend] = BACKENDS[backend]()
    return _INSTANCES[backend]
