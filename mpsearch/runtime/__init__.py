"""Run time: per-input precision switching with calibrated thresholds and an audit log, and
lossless per-token switching for causal language models (:class:`SpeculativeController`: a
cheap plan drafts, the reference plan verifies; ``SpeculativeOptions``, ``StepCosts`` in
``_speculative``).

>>> import torch
>>> from torch import nn
>>> from mpsearch.runtime import Controller
>>> net = nn.Sequential(nn.Linear(16, 4)).eval()
>>> ctrl = Controller(net, ["w8a8", "fp32"], backend="simulate")
>>> ctrl(torch.randn(2, 16)).shape
torch.Size([2, 4])

The building blocks (scores, p-values, grids, served stages) live in the private modules
``_scorers``, ``_calibration`` and ``_selection``.
"""

from mpsearch.runtime._audit import AuditLog
from mpsearch.runtime._calibration import (
    PVALUES,
    CalibrateOptions,
    CalibrationReport,
    learn_then_test,
    min_calibration_size,
)
from mpsearch.runtime._controller import Controller
from mpsearch.runtime._scorers import SCORERS, FunctionScorer, Scorer, make_scorer
from mpsearch.runtime._selection import rank_cascades
from mpsearch.runtime._speculative import SpeculativeController

__all__ = [
    "PVALUES",
    "SCORERS",
    "AuditLog",
    "CalibrateOptions",
    "CalibrationReport",
    "Controller",
    "FunctionScorer",
    "Scorer",
    "SpeculativeController",
    "learn_then_test",
    "make_scorer",
    "min_calibration_size",
    "rank_cascades",
]
