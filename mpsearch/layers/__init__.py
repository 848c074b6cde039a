"""Finding quantizable layers by their ``named_modules()`` names, swapping them in and out,
and how much of a model they cover (:func:`coverage`)."""

from mpsearch.layers._batchnorm import fold_batchnorm
from mpsearch.layers._coverage import Coverage, LeftOut, coverage
from mpsearch.layers._layers import (
    QUANTIZABLE_TYPES,
    is_quantizable,
    layer_forward,
    layer_weights,
    quantizable_layers,
    register_quantizable_type,
    replace_layers,
    swapped,
    weight_shapes,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "Coverage",
    "LeftOut",
    "coverage",
    "fold_batchnorm",
    "is_quantizable",
    "layer_forward",
    "layer_weights",
    "quantizable_layers",
    "register_quantizable_type",
    "replace_layers",
    "swapped",
    "weight_shapes",
]
