"""ONNX export that checks itself and honours a precision plan.

- ``export_onnx`` / ``validate_onnx``: export a module with named dynamic axes, then compare it with
  PyTorch in ONNX Runtime on other shapes (names, shapes, values; typed errors with the max diff).
- ``merge_decoders``: one decoder file for the first and the cached steps (``use_cache_branch``).
- ``atomic_path`` / ``save_onnx_atomic``: no half-written model on failure.

Plan application (``apply_plan_onnx``, ``check_conformance``) lives in ``kdq.export.precision`` and
reads a ``kdq.quant.Plan``; it never re-plans.
"""

from __future__ import annotations

from kdq.export.atomic import atomic_path, save_onnx_atomic, write_text_atomic
from kdq.export.merge import MergeError, merge_decoders
from kdq.export.onnx_export import (
    OnnxExportError,
    OnnxParityError,
    OnnxValidationError,
    ValidationReport,
    export_onnx,
    ort_session,
    validate_onnx,
)

__all__ = [
    "MergeError",
    "OnnxExportError",
    "OnnxParityError",
    "OnnxValidationError",
    "ValidationReport",
    "atomic_path",
    "export_onnx",
    "merge_decoders",
    "ort_session",
    "save_onnx_atomic",
    "validate_onnx",
    "write_text_atomic",
]
