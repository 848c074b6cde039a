"""PrecisionPlan: which scheme each layer runs in (with the substitutions a layer's shape forces); versioned JSON."""

from mpsearch.plan._plan import PLAN_VERSION, PrecisionPlan, Substitution

__all__ = ["PLAN_VERSION", "PrecisionPlan", "Substitution"]
