"""ONNX export that checks itself and honours a precision plan.

- ``export_onnx`` / ``validate_onnx``: export a module with named dynamic axes, then compare it with
  PyTorch in ONNX Runtime on other shapes (names, shapes, values; typed errors with the max diff).
- ``merge_decoders``: one decoder file for the first and the cached steps (``use_cache_branch``).
- ``atomic_path`` / ``save_onnx_atomic``: no half-written model on failure.

- ``apply_plan_onnx`` / ``check_conformance``: int8/int4/fp16 per plan group through ONNX Runtime's
  tools, and a check that every node carries its group's dtype. Reads a ``kdq.quant.Plan``; never
  re-plans.
- ``compare_onnx``: max difference and SNR (dB) of a reduced-precision graph against PyTorch fp32.

Names are imported lazily (on first use): ``kdq.export.atomic`` needs neither torch nor onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "atomic_path": "kdq.export.atomic",
    "save_onnx_atomic": "kdq.export.atomic",
    "write_text_atomic": "kdq.export.atomic",
    "MergeError": "kdq.export.merge",
    "merge_decoders": "kdq.export.merge",
    "PlanConformanceError": "kdq.export.precision",
    "PlanExportError": "kdq.export.precision",
    "PrecisionReport": "kdq.export.precision",
    "apply_plan_onnx": "kdq.export.precision",
    "check_conformance": "kdq.export.precision",
    "node_modules": "kdq.export.precision",
    "OnnxExportError": "kdq.export.onnx_export",
    "OnnxParityError": "kdq.export.onnx_export",
    "OnnxValidationError": "kdq.export.onnx_export",
    "TraceWarning": "kdq.export.onnx_export",
    "ValidationReport": "kdq.export.onnx_export",
    "compare_onnx": "kdq.export.onnx_export",
    "export_onnx": "kdq.export.onnx_export",
    "ort_session": "kdq.export.onnx_export",
    "validate_onnx": "kdq.export.onnx_export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kdq.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
