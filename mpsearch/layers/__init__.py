"""Finding quantizable layers by their ``named_modules()`` names, swapping them in and out,
and how much of a model they cover (:func:`coverage`)."""

from mpsearch.layers._attention import split_attention
from mpsearch.layers._batchnorm import fold_batchnorm
from mpsearch.layers._coverage import Coverage, LeftOut, coverage
from mpsearch.layers._layers import (
    QUANTIZABLE_TYPES,
    is_quantizable,
    layer_weights,
    quantizable_layers,
    register_quantizable_type,
    replace_layers,
    swapped,
    weight_shapes,
)
from mpsearch.layers._layers import (
    layer_forward as layer_forward,  # importable here, no longer in __all__
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "Coverage",
    "LeftOut",
    "coverage",
    "fold_batchnorm",
    "is_quantizable",
    "layer_weights",
    "quantizable_layers",
    "register_quantizable_type",
    "replace_layers",
    "split_attention",
    "swapped",
    "weight_shapes",
]
