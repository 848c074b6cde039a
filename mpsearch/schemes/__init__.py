"""Number formats, fake-quantization math, activation observers and the registry of schemes.

>>> from mpsearch.schemes import SCHEMES, QuantSpec, Scheme
>>> SCHEMES["w8a8"].weight.format
'int8'
>>> Scheme("w7", QuantSpec("int7", granularity="channel")).bits_per_weight((4, 8))
11.0
"""

from mpsearch.schemes._fakequant import fake_quantize
from mpsearch.schemes._formats import FORMATS
from mpsearch.schemes._observers import (
    OBSERVERS,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
)
from mpsearch.schemes._quantspec import QuantSpec
from mpsearch.schemes._scheme import SCHEMES, Scheme, get_scheme, register_scheme

__all__ = [
    "FORMATS",
    "OBSERVERS",
    "SCHEMES",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "Scheme",
    "fake_quantize",
    "get_scheme",
    "register_scheme",
]
