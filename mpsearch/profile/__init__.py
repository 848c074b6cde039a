"""Layer sensitivity: each quantizable layer's error under each precision scheme.

``mpsearch.profile.profile`` is the profiler function (the subpackage and the function share
the name); ``ProfileOptions`` holds how it runs; ``SensitivityProfile`` holds its table.

>>> import torch
>>> from torch import nn
>>> from mpsearch.profile import profile
>>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
>>> profile(net, [torch.randn(8, 32)], schemes=["w8a8"], progress=False).layers
['0', '2']
"""

from mpsearch.profile._metrics import (
    E2E_METRICS,
    auto_metric,
    bernoulli_kl,
    kl_divergence,
    kl_divergence_channels,
    mean_squared_error,
)
from mpsearch.profile._options import ProfileOptions
from mpsearch.profile._output import select_output
from mpsearch.profile._plotdata import heatmap_data
from mpsearch.profile._profile import DEFAULT_SCHEMES, profile
from mpsearch.profile._result import COLUMNS, SensitivityProfile

__all__ = [
    "COLUMNS",
    "DEFAULT_SCHEMES",
    "E2E_METRICS",
    "ProfileOptions",
    "SensitivityProfile",
    "auto_metric",
    "bernoulli_kl",
    "heatmap_data",
    "kl_divergence",
    "kl_divergence_channels",
    "mean_squared_error",
    "profile",
    "select_output",
]
