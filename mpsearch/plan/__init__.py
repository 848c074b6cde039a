"""PrecisionPlan: which scheme each layer runs in; versioned JSON."""

from mpsearch.plan._plan import PLAN_VERSION, PrecisionPlan

__all__ = ["PLAN_VERSION", "PrecisionPlan"]
