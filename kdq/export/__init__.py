"""ONNX export that checks itself and honours a precision plan.

- ``export_onnx`` / ``validate_onnx``: export a module with named dynamic axes, then compare it with
  PyTorch in ONNX Runtime on other shapes (names, shapes, values; typed errors with the max diff).
- ``merge_decoders``: one decoder file for the first and the cached steps (``use_cache_branch``).
- ``atomic_path`` / ``save_onnx_atomic``: no half-written model on failure.

- ``apply_plan_onnx`` / ``check_conformance``: int8/int4/fp16 per plan group through ONNX Runtime's
  tools, and a check that every node carries its group's dtype. Reads a ``kdq.quant.Plan``; never
  re-plans.
- ``compare_onnx``: max difference and SNR (dB) of a reduced-precision graph against PyTorch fp32.
"""

from __future__ import annotations

from kdq.export.atomic import atomic_path, save_onnx_atomic, write_text_atomic
from kdq.export.merge import MergeError, merge_decoders
from kdq.export.precision import (
    PlanConformanceError,
    PlanExportError,
    PrecisionReport,
    apply_plan_onnx,
    check_conformance,
    node_modules,
)
from kdq.export.onnx_export import (
    OnnxExportError,
    OnnxParityError,
    OnnxValidationError,
    ValidationReport,
    compare_onnx,
    export_onnx,
    ort_session,
    validate_onnx,
)

__all__ = [
    "MergeError",
    "OnnxExportError",
    "OnnxParityError",
    "OnnxValidationError",
    "PlanConformanceError",
    "PlanExportError",
    "PrecisionReport",
    "ValidationReport",
    "apply_plan_onnx",
    "atomic_path",
    "check_conformance",
    "compare_onnx",
    "export_onnx",
    "merge_decoders",
    "node_modules",
    "ort_session",
    "save_onnx_atomic",
    "validate_onnx",
    "write_text_atomic",
]
