"""Finding quantizable layers by their ``named_modules()`` names, swapping them in and out."""

from mpsearch.layers._batchnorm import fold_batchnorm
from mpsearch.layers._layers import (
    QUANTIZABLE_TYPES,
    is_quantizable,
    layer_forward,
    quantizable_layers,
    register_quantizable_type,
    replace_layers,
    swapped,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "fold_batchnorm",
    "is_quantizable",
    "layer_forward",
    "quantizable_layers",
    "register_quantizable_type",
    "replace_layers",
    "swapped",
]
