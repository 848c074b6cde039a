"""Calibrated rounding of weights onto their scheme's grid (GPTQ, AdaRound, bias correction)
and SmoothQuant-style activation smoothing: what makes 4 bits and below keep quality.

A layer's choice ``"<scheme>+<rounding>"`` (``"w4a16+gptq"``) keeps the scheme's format and grid
and picks other grid points than the nearest, from the layer's calibration inputs. The
:class:`Rounder` computes the rounded weights (one input pass for all layers, each weight once).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(32, 8)).eval()
>>> Rounder(net, [torch.randn(16, 32)]).weight("0", "w4a16+gptq")[0].shape
torch.Size([8, 32])
"""

from mpsearch.rounding._adaround import adaround
from mpsearch.rounding._gptq import gptq
from mpsearch.rounding._grid import Grid, output_error
from mpsearch.rounding._rounder import Rounder, RoundingOptions
from mpsearch.rounding._smoothing import SmoothingResult, smooth_activations
from mpsearch.rounding._stats import collect_stats
from mpsearch.schemes._rounding import ROUNDINGS, Rounding, register_rounding

__all__ = [
    "ROUNDINGS",
    "Grid",
    "Rounder",
    "Rounding",
    "RoundingOptions",
    "SmoothingResult",
    "adaround",
    "collect_stats",
    "gptq",
    "output_error",
    "register_rounding",
    "smooth_activations",
]
