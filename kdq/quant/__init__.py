"""Mixed-precision planning: measure per-submodule sensitivity, solve for a plan, apply it.

- ``DTYPES`` (the shared table ``kdq.dtypes``) and the handlers (``kdq.quant.dtypes``): fp32/fp16/bf16
  casts, int8/int4 weight-only.
- ``Plan`` (``kdq.quant.plan``): rules from module names or ``re:`` patterns to dtypes, as JSON; pure
  data, importable without torch, with ``Plan.check_rules(module_names)`` for rules that match nothing.
- ``apply_plan``, ``explain_plan``, ``model_bytes`` (``kdq.quant.apply``); ``save_quantized`` /
  ``load_quantized`` (``kdq.quant.saving``).
- ``MixedPrecisionPlanner`` (``kdq.quant.profile``): groups, profiling (measured and Fisher tiers),
  solving (``kdq.quant.solve``: exact multiple-choice knapsack) and predicted-vs-measured checks.
- ``DeviceCosts`` (``kdq.quant.costs``): seconds per group and dtype on one device, the input of
  latency budgets; plain data, JSON.
- Score functions (``kdq.quant.scores``): ``OutputKL``, ``RelativeError``, ``SumOfScores``.

Names are imported lazily (on first use), so ``from kdq.quant import Plan`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DTYPES": "kdq.dtypes",
    "DEFAULT_DTYPE": "kdq.dtypes",
    "Plan": "kdq.quant.plan",
    "GroupRecord": "kdq.quant.plan",
    "model_fingerprint": "kdq.quant.plan",
    "PlanError": "kdq.quant.errors",
    "GroupError": "kdq.quant.errors",
    "BudgetError": "kdq.quant.errors",
    "ProfileError": "kdq.quant.errors",
    "ModelFolderError": "kdq.quant.errors",
    "CostError": "kdq.quant.errors",
    "DeviceCosts": "kdq.quant.costs",
    "apply_plan": "kdq.quant.apply",
    "explain_plan": "kdq.quant.apply",
    "model_bytes": "kdq.quant.apply",
    "module_dtypes": "kdq.quant.apply",
    "save_quantized": "kdq.quant.saving",
    "load_quantized": "kdq.quant.saving",
    "default_groups": "kdq.quant.groups",
    "resolve_groups": "kdq.quant.groups",
    "MixedPrecisionPlanner": "kdq.quant.profile",
    "SensitivityTable": "kdq.quant.profile",
    "OutputKL": "kdq.quant.scores",
    "RelativeError": "kdq.quant.scores",
    "SumOfScores": "kdq.quant.scores",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kdq.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
