"""Layer sensitivity: each quantizable layer's error under each precision scheme.

``mpsearch.profile.profile`` is the profiler function (the subpackage and the function share
the name); ``SensitivityProfile`` holds its table.

>>> import torch
>>> from torch import nn
>>> from mpsearch.profile import profile
>>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
>>> profile(net, [torch.randn(8, 32)], schemes=["w8a8"], progress=False).layers
['0', '2']
"""

from mpsearch.layers._batchnorm import fold_batchnorm
from mpsearch.profile._cache import CODE_VERSION, hash_batches, hash_model
from mpsearch.profile._e2e import (
    AUTO_E2E_PASSES,
    AUTO_EXACT_PASSES,
    AUTO_MIN_SAMPLES,
    choose_e2e_samples,
    first_samples,
)
from mpsearch.profile._hessian import hutchinson_traces
from mpsearch.profile._metrics import E2E_METRICS, auto_metric, kl_divergence, mean_squared_error
from mpsearch.profile._plotdata import heatmap_data
from mpsearch.profile._profile import DEFAULT_SCHEMES, profile
from mpsearch.profile._result import COLUMNS, SensitivityProfile

__all__ = [
    "AUTO_E2E_PASSES",
    "AUTO_EXACT_PASSES",
    "AUTO_MIN_SAMPLES",
    "CODE_VERSION",
    "COLUMNS",
    "DEFAULT_SCHEMES",
    "E2E_METRICS",
    "SensitivityProfile",
    "auto_metric",
    "choose_e2e_samples",
    "first_samples",
    "fold_batchnorm",
    "hash_batches",
    "hash_model",
    "heatmap_data",
    "hutchinson_traces",
    "kl_divergence",
    "mean_squared_error",
    "profile",
]
