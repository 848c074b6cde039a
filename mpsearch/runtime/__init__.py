"""Run time: per-input precision switching with calibrated thresholds and an audit log.

>>> import torch
>>> from torch import nn
>>> from mpsearch.runtime import Controller
>>> net = nn.Sequential(nn.Linear(16, 4)).eval()
>>> ctrl = Controller(net, ["w8a8", "fp32"], backend="simulate")
>>> ctrl(torch.randn(2, 16)).shape
torch.Size([2, 4])
"""

from mpsearch.runtime._audit import AuditLog
from mpsearch.runtime._calibration import (
    PVALUES,
    CalibrationReport,
    LTTResult,
    binomial_pvalue,
    cascade_cost,
    default_grid,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    learn_then_test,
    losses,
    quantile_grid,
    served_answers,
    served_stage,
)
from mpsearch.runtime._controller import Controller, Variant, plan_label, time_module
from mpsearch.runtime._scorers import (
    SCORERS,
    FunctionScorer,
    GateScorer,
    Scorer,
    answer_logits,
    cut_point,
    entropy_score,
    fit_logistic,
    gate_features,
    make_scorer,
    margin_score,
    max_softmax_score,
    ratio_score,
)
from mpsearch.runtime._selection import rank_cascades

__all__ = [
    "PVALUES",
    "SCORERS",
    "AuditLog",
    "CalibrationReport",
    "Controller",
    "FunctionScorer",
    "GateScorer",
    "LTTResult",
    "Scorer",
    "Variant",
    "answer_logits",
    "binomial_pvalue",
    "cascade_cost",
    "cut_point",
    "default_grid",
    "entropy_score",
    "fit_logistic",
    "fixed_sequence_test",
    "gate_features",
    "hoeffding_bentkus_pvalue",
    "learn_then_test",
    "losses",
    "make_scorer",
    "margin_score",
    "max_softmax_score",
    "plan_label",
    "quantile_grid",
    "rank_cascades",
    "ratio_score",
    "served_answers",
    "served_stage",
    "time_module",
]
