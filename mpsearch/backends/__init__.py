"""Executing plans: ``simulate`` (fake quantization) and real-kernel backends, chosen by name."""

from mpsearch.backends._cpu import CPU_KERNELS, CpuBackend, register_cpu_kernel
from mpsearch.backends._cuda import CUDA_KERNELS, CudaBackend
from mpsearch.backends._kernels import (
    FbgemmInt8Linear,
    Int8Linear,
    Kernel,
    KernelBackend,
    RealLayer,
    fbgemm_int8_linear_preferred,
    int8_activation_spec,
    int8_kernel_scheme,
    onednn_u8s8_saturates,
    storage_bytes,
)
from mpsearch.backends._quantize import (
    as_plan,
    check_assignment,
    collect_activation_ranges,
    quantize,
)
from mpsearch.backends._registry import BACKENDS, Backend, get_backend, register_backend
from mpsearch.backends._simulate import SimulateBackend, SimulatedLayer

register_backend("simulate", SimulateBackend)
register_backend("cpu", CpuBackend)
register_backend("cuda", CudaBackend)

__all__ = [
    "BACKENDS",
    "CPU_KERNELS",
    "CUDA_KERNELS",
    "Backend",
    "CpuBackend",
    "CudaBackend",
    "FbgemmInt8Linear",
    "Int8Linear",
    "Kernel",
    "KernelBackend",
    "RealLayer",
    "SimulateBackend",
    "SimulatedLayer",
    "as_plan",
    "check_assignment",
    "collect_activation_ranges",
    "fbgemm_int8_linear_preferred",
    "get_backend",
    "int8_activation_spec",
    "int8_kernel_scheme",
    "onednn_u8s8_saturates",
    "quantize",
    "register_backend",
    "register_cpu_kernel",
    "storage_bytes",
]
