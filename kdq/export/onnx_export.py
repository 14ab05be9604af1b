"""Export a module to ONNX with named dynamic axes, then validate it in ONNX Runtime.

Validation follows optimum's exporters: run the exported graph in ONNX Runtime on inputs whose
shapes differ from the ones used to export (so that an axis baked in as a constant is caught),
then compare output names, then shapes, then values against PyTorch. A value mismatch raises
``OnnxParityError`` with the largest difference and the tolerance it broke.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdq.errors import KdqError, bad_value
from kdq.export.atomic import atomic_path

DEFAULT_OPSET = 17


class OnnxExportError(KdqError):
    """The export itself failed or was asked for something it cannot do."""


class OnnxValidationError(KdqError):
    """The exported graph's output names or shapes differ from PyTorch's."""


class OnnxParityError(OnnxValidationError):
    """The exported graph's values differ from PyTorch's beyond the tolerance.

    Attributes:
        output: name of the worst output.
        max_diff: largest ``|onnx - torch|`` over that output.
        atol: absolute tolerance; rtol: relative tolerance (``|d| <= atol + rtol * |ref|``).
    """

    def __init__(self, msg: str, *, output: str, max_diff: float, atol: float, rtol: float):
        super().__init__(msg)
        self.output, self.max_diff, self.atol, self.rtol = output, max_diff, atol, rtol


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("kdq.export needs onnx and onnxruntime: pip install 'kdq[onnx]'") from exc


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the export and restore each flag afterwards.

    Calling ``.eval()`` on the wrapper matters: the exporter restores the wrapper's training flag,
    and a wrapper left in training mode re-enables dropout inside the wrapped model.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


def _named_inputs(inputs: Any, input_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """``inputs`` as ``{graph input name: tensor}`` (a mapping names its own; a tuple takes ``input_names``)."""
    if isinstance(inputs, Mapping):
        if input_names is not None and list(input_names) != list(inputs):
            raise bad_value(OnnxExportError, "input_names", list(input_names), f"None, or the mapping's own keys {list(inputs)}",
                            "name the inputs in one place")
        return dict(inputs)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise bad_value(OnnxExportError, "inputs", type(inputs).__name__,
                        "a mapping {name: tensor}, a tuple of tensors, or one tensor",
                        "a trailing dict of keyword arguments (torch.onnx.export accepts one) is not supported: "
                        "pass every input by position")
    names = list(input_names) if input_names is not None else [f"input_{i}" for i in range(len(inputs))]
    if len(names) != len(inputs) or len(set(names)) != len(names):
        raise bad_value(OnnxExportError, "input_names", names, f"{len(inputs)} distinct names, one per input")
    return dict(zip(names, inputs))


def export_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` to ``path`` with named inputs, outputs and dynamic axes (atomically).

    Uses the TorchScript exporter (``dynamo=False``), which exports T5, the MusicGen decoder with its
    KV cache and EnCodec with dynamic axes; the dynamo exporter fails on two of the three.
    ``export_onnx(model, (x,), "model.onnx")`` works as ``torch.onnx.export`` does.

    Args:
        module: called with the inputs in order; must return a tensor or a tuple of tensors (in
            ``output_names`` order).
        inputs: example inputs: ``{graph input name: tensor}`` in the order ``module.forward`` takes
            them, or, in ``torch.onnx.export``'s convention, a tuple of tensors (or one tensor) named by
            ``input_names``.
        path: destination ``.onnx`` file; written only if the export and ``onnx.checker`` succeed.
        input_names: names of tuple inputs (default ``input_0``, ``input_1``, ...).
        output_names: names of the graph outputs (default ``output_0``, ``output_1``, ..., counted on
            one forward pass of ``inputs``).
        dynamic_axes: ``{tensor name: {axis: axis name}}`` for inputs and outputs. Two axes with the
            same name are asserted equal by the exporter: give independent lengths distinct names
            (e.g. self- and cross-attention cache lengths).
        opset: ONNX opset.

    Returns:
        The path written.
    """
    _require_onnx()
    import onnx

    inputs = _named_inputs(inputs, input_names)
    if output_names is None:
        with _eval_mode(module), torch.no_grad():
            output_names = [f"output_{i}" for i in range(len(_as_tuple(module(*inputs.values()))))]
    dynamic_axes = dict(dynamic_axes or {})
    known = set(inputs) | set(output_names)
    for name in dynamic_axes:
        if name not in known:
            raise bad_value(
                OnnxExportError, "dynamic_axes", name, f"keys must be input or output names {sorted(known)}",
                "rename the key or add the tensor to inputs/output_names",
            )
    with _eval_mode(module), atomic_path(path) as tmp, warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(tmp),
            input_names=list(inputs),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        onnx.checker.check_model(str(tmp))
    _surface_tracer_warnings(caught)
    return Path(path)


class TraceWarning(UserWarning):
    """The tracer took a data-dependent branch: the graph holds only the branch the example inputs
    took. Validate the export (``validate_onnx``) on inputs that take the other branches."""


def _surface_tracer_warnings(caught: list) -> None:
    """Re-emit the tracer's warnings (once per message) as ``TraceWarning``; the exporter's own
    deprecation notes are dropped."""
    seen = set()
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and str(w.message) not in seen:
            seen.add(str(w.message))
            where = f"{Path(w.filename).name}:{w.lineno}"
            warnings.warn(f"export_onnx: {w.message} ({where}); the graph holds the branch the example inputs took: "
                          "validate_onnx on inputs that take the others", TraceWarning, stacklevel=3)


def ort_session(path: str | os.PathLike, *, threads: int | None = None, optimize: bool = True):
    """An ``onnxruntime.InferenceSession`` on CPU with ``threads`` intra-op threads."""
    _require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class ValidationReport:
    """Per-output largest absolute difference over all validation inputs, and the tolerance."""

    max_diff: dict[str, float] = field(default_factory=dict)
    atol: float = 0.0
    rtol: float = 0.0
    shapes: list[dict[str, list[int]]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_diff, "atol": self.atol, "rtol": self.rtol, "shapes": self.shapes}


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def validate_onnx(
    path: str | os.PathLike,
    reference: Callable[..., Any],
    inputs: Sequence[Mapping[str, torch.Tensor]],
    *,
    output_names: Sequence[str],
    atol: float = 1e-4,
    rtol: float = 1e-4,
    session: Any = None,
) -> ValidationReport:
    """Check an exported graph against ``reference`` on every input set in ``inputs``.

    Use input shapes other than the export's. Checks, in order: the graph's output names equal
    ``output_names``; each output's shape equals the reference's; values satisfy
    ``|onnx - ref| <= atol + rtol * |ref|``.

    Args:
        path: the ``.onnx`` file.
        reference: called as ``reference(*feed.values())`` under ``torch.no_grad()``; returns outputs
            in ``output_names`` order (usually the exported module itself).
        inputs: one or more feeds ``{input name: tensor}``.
        output_names: expected graph outputs, in order.
        atol, rtol: tolerances.
        session: an existing ONNX Runtime session for ``path`` (one is created otherwise).

    Returns:
        A ``ValidationReport`` with the largest difference per output.

    Raises:
        OnnxValidationError: names or shapes differ.
        OnnxParityError: values differ beyond the tolerance.
    """
    sess = session if session is not None else ort_session(path)
    got_names = [o.name for o in sess.get_outputs()]
    if got_names != list(output_names):
        raise OnnxValidationError(
            f"{path}: graph outputs {got_names} differ from the expected {list(output_names)}; "
            "re-export with the right output_names"
        )
    graph_inputs = {i.name for i in sess.get_inputs()}
    report = ValidationReport(atol=atol, rtol=rtol)
    for k, feed in enumerate(inputs):
        with torch.no_grad():
            ref = [t.detach().cpu().numpy() for t in _as_tuple(reference(*feed.values()))]
        ort_feed = {n: t.detach().cpu().numpy() for n, t in feed.items() if n in graph_inputs}
        got = sess.run(None, ort_feed)
        report.shapes.append({n: list(t.shape) for n, t in feed.items()})
        for name, r, g in zip(output_names, ref, got):
            if tuple(r.shape) != tuple(g.shape):
                raise OnnxValidationError(
                    f"{path}: output {name!r} has shape {list(g.shape)} in ONNX Runtime but {list(r.shape)} in "
                    f"PyTorch on input set {k} ({report.shapes[-1]}); an axis was probably exported as a "
                    "constant: declare it in dynamic_axes"
                )
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            diff = np.abs(r64 - g64)
            worst = float(diff.max()) if diff.size else 0.0
            report.max_diff[name] = max(report.max_diff.get(name, 0.0), worst)
            if diff.size and not np.all(diff <= atol + rtol * np.abs(r64)):
                raise OnnxParityError(
                    f"{path}: output {name!r} differs from PyTorch by up to {worst:.3g} on input set {k} "
                    f"({report.shapes[-1]}), above the tolerance atol={atol:g} + rtol={rtol:g}*|ref|",
                    output=name, max_diff=worst, atol=atol, rtol=rtol,
                )
    return report


_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def compare_onnx(
    path: str | os.PathLike,
    reference: Callable[..., Any],
    inputs: Sequence[Mapping[str, torch.Tensor]],
    *,
    output_names: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Measure (not judge) how far a reduced-precision graph is from its fp32 PyTorch reference.

    Float inputs are cast to the graph's input types (fp16 I/O graphs) and outputs back to float64.
    Non-finite outputs where the reference is finite raise ``OnnxParityError``.
    Returns, per output, the largest absolute difference and the signal-to-noise ratio in dB,
    ``10 log10(sum ref^2 / sum (out - ref)^2)`` over all input sets (inf when equal). Quantization
    error is judged by SNR floors per bit-width rather than by an fp32 tolerance.
    """
    sess = ort_session(path)
    types = {i.name: _ORT_NP.get(i.type) for i in sess.get_inputs()}
    sig: dict[str, float] = {}
    noise: dict[str, float] = {}
    worst: dict[str, float] = {}
    for feed in inputs:
        with torch.no_grad():
            ref = [t.detach().cpu().numpy().astype(np.float64) for t in _as_tuple(reference(*feed.values()))]
        ort_feed = {n: t.detach().cpu().numpy().astype(types[n] or t.detach().cpu().numpy().dtype)
                    for n, t in feed.items() if n in types}
        got = sess.run(None, ort_feed)
        for name, r, g in zip(output_names, ref, got):
            bad = ~np.isfinite(g.astype(np.float64)) & np.isfinite(r)
            if bad.any():
                raise OnnxParityError(
                    f"{path}: output {name!r} has {int(bad.sum())} non-finite values where PyTorch's are finite "
                    "(an fp16 overflow?)", output=name, max_diff=float("inf"), atol=0.0, rtol=0.0,
                )
            d = g.astype(np.float64) - r
            sig[name] = sig.get(name, 0.0) + float((r**2).sum())
            noise[name] = noise.get(name, 0.0) + float((d**2).sum())
            worst[name] = max(worst.get(name, 0.0), float(np.abs(d).max()) if d.size else 0.0)
    out = {}
    for name in output_names:
        snr = float("inf") if noise[name] == 0 else 10 * np.log10(max(sig[name], 1e-30) / noise[name])
        out[name] = {"max_abs_diff": worst[name], "snr_db": round(float(snr), 2)}
    return out
