"""Number formats, fake-quantization math, activation observers and the registry of schemes."""

from mpsearch.schemes._fakequant import dequantize_codes, fake_quantize, qparams, quantize_codes
from mpsearch.schemes._formats import FORMATS, NumberFormat, int_range, round_to_float_format
from mpsearch.schemes._observers import (
    OBSERVERS,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from mpsearch.schemes._quantspec import QuantSpec
from mpsearch.schemes._scheme import SCHEMES, Scheme, get_scheme, register_scheme

__all__ = [
    "FORMATS",
    "OBSERVERS",
    "SCHEMES",
    "MSEObserver",
    "MinMaxObserver",
    "NumberFormat",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "Scheme",
    "dequantize_codes",
    "fake_quantize",
    "get_scheme",
    "int_range",
    "make_observer",
    "qparams",
    "quantize_codes",
    "register_scheme",
    "round_to_float_format",
]
