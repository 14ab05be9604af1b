"""Mixed-precision planning: measure per-submodule sensitivity, solve for a plan, apply it.

- ``DTYPES`` and the handlers (``kdq.quant.dtypes``): fp32/fp16/bf16 casts, int8/int4 weight-only.
- ``Plan`` (``kdq.quant.plan``): rules from module names or ``re:`` patterns to dtypes, as JSON.
- ``apply_plan``, ``model_bytes`` (``kdq.quant.apply``).
- ``MixedPrecisionPlanner`` (``kdq.quant.profile``): groups, profiling (measured and Fisher tiers),
  solving (``kdq.quant.solve``: exact multiple-choice knapsack) and predicted-vs-measured checks.
- Score functions (``kdq.quant.scores``): ``OutputKL``, ``RelativeError``, ``SumOfScores``.
"""

from kdq.quant.apply import apply_plan, model_bytes, module_dtypes
from kdq.dtypes import DEFAULT_DTYPE, DTYPES
from kdq.quant.errors import BudgetError, GroupError, PlanError, ProfileError
from kdq.quant.groups import default_groups, resolve_groups
from kdq.quant.plan import GroupRecord, Plan, model_fingerprint
from kdq.quant.profile import MixedPrecisionPlanner, SensitivityTable
from kdq.quant.scores import OutputKL, RelativeError, SumOfScores

__all__ = [
    "DTYPES",
    "DEFAULT_DTYPE",
    "Plan",
    "GroupRecord",
    "apply_plan",
    "model_bytes",
    "module_dtypes",
    "model_fingerprint",
    "MixedPrecisionPlanner",
    "SensitivityTable",
    "OutputKL",
    "RelativeError",
    "SumOfScores",
    "default_groups",
    "resolve_groups",
    "PlanError",
    "GroupError",
    "BudgetError",
    "ProfileError",
]
