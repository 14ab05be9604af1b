"""kdq: compress generative models for on-device use.

Subsystems (data flows one way, left to right):

- ``kdq.losses`` and ``kdq.schedules``: distillation divergences and ``StageMixedKL``; they know
  nothing of models.
- ``kdq.quant``: ``MixedPrecisionPlanner`` and ``Plan``; knows modules and dtypes, not ONNX.
- ``kdq.export``: ONNX export that reads a ``Plan`` and never re-plans.
- ``kdq.metrics``: Frechet distance and friends.

Top-level names are imported lazily so that ``import kdq`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "StageMixedKL": "kdq.losses",
    "MixedPrecisionPlanner": "kdq.quant",
    "Plan": "kdq.quant",
    "apply_plan": "kdq.quant",
    "model_bytes": "kdq.quant",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kdq' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
