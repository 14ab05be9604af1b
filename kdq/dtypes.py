"""The dtypes a plan may assign, as one table read by ``kdq.quant`` (PyTorch) and ``kdq.export`` (ONNX).

A plan says ``"int8"``; this table says what that means on both sides, so the planner measures what
the export ships. Importable without torch or onnx.

Per dtype:

- ``bits``: bits per stored weight element (scales not counted).
- ``weight_only``: integer kinds change only the weights of the module kinds in ``modules``; every
  other module of the group (norms, convolutions, LSTMs) keeps fp32, and activations run in fp32.
  Float kinds (``fp32``/``fp16``/``bf16``) cast every floating tensor of the group.
- ``storage`` / ``compute``: the torch dtype names of the stored weights and of the activations in
  ``kdq.quant`` (``int4`` packs two values per ``uint8``).
- ``modules``: the ``torch.nn`` module kinds ``kdq.quant`` converts (weight-only kinds only).
- ``onnx``: for each weighted ONNX op (``WEIGHTED_OPS``), the dtype ``kdq.export`` stores its weight
  in. A module kind in ``modules`` becomes the ops in ``MODULE_OPS``. An op missing from the mapping
  cannot be realised: the export reports a conformance error for it. ``None``: the export refuses
  the dtype (``onnx_refusal`` says why).
- ``differences``: where the two sides differ, and why. Nothing else may differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["DEFAULT_DTYPE", "DTYPES", "DtypeInfo", "MODULE_OPS", "TABLE", "WEIGHTED_OPS"]

#: ONNX op types that read a weight initializer (the TorchScript exporter's forms of the modules below).
WEIGHTED_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose")

#: Module kind -> the ONNX ops it exports to: ``Linear`` is ``MatMul`` (+ ``Add``) on 3-D inputs and
#: ``Gemm`` on 2-D ones; ``Embedding`` is ``Gather``.
MODULE_OPS: Mapping[str, tuple[str, ...]] = MappingProxyType({"Linear": ("MatMul", "Gemm"), "Embedding": ("Gather",)})


@dataclass(frozen=True)
class DtypeInfo:
    """One row of the table (see the module docstring for each field)."""

    name: str
    bits: int
    weight_only: bool
    storage: str
    compute: str
    modules: tuple[str, ...] = ()
    onnx: Mapping[str, str] | None = None
    onnx_refusal: str = ""
    differences: tuple[str, ...] = field(default=())

    def onnx_dtype(self, op_type: str) -> str:
        """The dtype the export stores a weighted ``op_type``'s weight in for this plan dtype.

        An op the export cannot realise in this dtype returns the dtype itself, so conformance reports
        the node as not carrying it.
        """
        if self.onnx is None:
            return self.name
        return self.onnx.get(op_type, self.name)


def _float(name: str, bits: int, storage: str, **kw) -> DtypeInfo:
    return DtypeInfo(name, bits, False, storage, storage, onnx=MappingProxyType({op: name for op in WEIGHTED_OPS}), **kw)


_INT_MODULES = ("Linear", "Embedding")


def _weight_only(name: str, bits: int, storage: str, *, overrides: Mapping[str, str | None], differences: tuple[str, ...]) -> DtypeInfo:
    # Both sides convert the ops of ``modules`` and leave every other weighted op fp32; ``overrides``
    # are where ONNX cannot do the same (None: not realisable), each explained in ``differences``.
    onnx = {op: "fp32" for op in WEIGHTED_OPS}
    onnx.update({op: name for kind in _INT_MODULES for op in MODULE_OPS[kind]})
    for op, dtype in overrides.items():
        if dtype is None:
            del onnx[op]
        else:
            onnx[op] = dtype
    return DtypeInfo(name, bits, True, storage, "float32", _INT_MODULES, MappingProxyType(onnx), "", differences)


_ROWS = (
    _float("fp32", 32, "float32"),
    _float(
        "fp16", 16, "float16",
        differences=(
            "ONNX: ops on ONNX Runtime's fp16 converter block list (TopK, Range, CumSum, Min, Max, ...) "
            "run in fp32 inside fp16 groups (counted in the export's report); kdq.quant casts every "
            "module's tensors, and those ops hold none",
        ),
    ),
    DtypeInfo(
        "bf16", 16, False, "bfloat16", "bfloat16",
        onnx=None,
        onnx_refusal="ONNX Runtime's CPU and mobile builds have no bf16 kernels; assign fp16 (phones) or fp32",
    ),
    _weight_only(
        "int8", 8, "int8", overrides={},
        differences=(
            "activations: kdq.quant dequantizes the weights and computes in fp32; ONNX Runtime's dynamic "
            "quantization (MatMulInteger) also quantizes a MatMul's input to uint8 per call, so the "
            "exported graph is slightly noisier than the planner measured (embeddings are weight-only "
            "on both sides)",
        ),
    ),
    _weight_only(
        "int4", 4, "uint8", overrides={"Gather": "int8", "Gemm": None},
        differences=(
            "Gather (Embedding) is stored int8 in ONNX: a 4-bit Gather needs opset 21, which the exporter "
            "and ONNX Runtime's mobile builds do not target; kdq.quant stores it int4, so the export is "
            "larger and closer to fp32 than planned there",
            "Gemm (a Linear on 2-D input) has no 4-bit form (MatMulNBits is a MatMul): the export reports "
            "it as not conforming; export the Linear on 3-D input or assign int8 to it",
            "activations: ONNX Runtime's MatMulNBits at its default accuracy level 4 quantizes a MatMul's "
            "input to int8 per block; kdq.quant computes in fp32",
        ),
    ),
)

#: name -> row, widest first.
TABLE: Mapping[str, DtypeInfo] = MappingProxyType({row.name: row for row in _ROWS})

#: Every dtype a plan may name, widest first.
DTYPES: tuple[str, ...] = tuple(TABLE)

#: The dtype of anything no rule matches.
DEFAULT_DTYPE = "fp32"
