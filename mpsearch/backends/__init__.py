"""Executing plans: ``simulate`` (fake quantization) and real-kernel backends, chosen by name.

A user quantizes with :func:`quantize`, picks or adds a backend by name (:func:`get_backend`,
:func:`register_backend`, :data:`BACKENDS`), adds a CPU kernel (:class:`Kernel`,
:func:`register_cpu_kernel`), collects static activation ranges
(:func:`collect_activation_ranges`) and counts a quantized model's bytes
(:func:`storage_bytes`). The kernels themselves live in the private modules.
"""

from mpsearch.backends._compiled import CpuInductorBackend
from mpsearch.backends._cpu import CpuBackend, register_cpu_kernel
from mpsearch.backends._cuda import CudaBackend
from mpsearch.backends._kernels import Kernel, onednn_u8s8_saturates, storage_bytes
from mpsearch.backends._pt2e import CpuPt2eBackend
from mpsearch.backends._quantize import collect_activation_ranges, quantize
from mpsearch.backends._registry import BACKENDS, Backend, get_backend, register_backend
from mpsearch.backends._simulate import SimulateBackend

register_backend("simulate", SimulateBackend)
register_backend("cpu", CpuBackend)
register_backend("cpu-inductor", CpuInductorBackend)
register_backend("cpu-pt2e", CpuPt2eBackend)
register_backend("cuda", CudaBackend)

__all__ = [
    "BACKENDS",
    "Backend",
    "Kernel",
    "collect_activation_ranges",
    "get_backend",
    "onednn_u8s8_saturates",
    "quantize",
    "register_backend",
    "register_cpu_kernel",
    "storage_bytes",
]
