"""mpsearch: adaptive mixed-precision search for PyTorch models.

>>> import mpsearch as mps
>>> sorted(mps.SCHEMES)[:3]
['bf16', 'fp16', 'fp32']
"""

from mpsearch.backends import BACKENDS, get_backend, quantize, register_backend
from mpsearch.layers import quantizable_layers
from mpsearch.plan import PrecisionPlan
from mpsearch.schemes import SCHEMES, QuantSpec, Scheme, get_scheme, register_scheme

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SCHEMES",
    "PrecisionPlan",
    "QuantSpec",
    "Scheme",
    "__version__",
    "get_backend",
    "get_scheme",
    "quantizable_layers",
    "quantize",
    "register_backend",
    "register_scheme",
]
