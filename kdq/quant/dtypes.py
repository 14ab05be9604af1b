"""Dtype handlers: how a module's own tensors are stored under each plan dtype.

What each dtype name means (bits, which module kinds it converts, storage and compute types, and how
the ONNX export realises it) is the shared table ``kdq.dtypes.TABLE``; this module is its PyTorch side.

A handler converts the tensors a module holds *itself* (not its children's), so converting a subtree
is converting each module in it. Two kinds:

- float casts (``fp32``, ``fp16``, ``bf16``): every floating parameter and persistent floating buffer
  is cast in place (``param.data``), so a tied parameter changes for all its holders at once.
  Non-persistent buffers (recomputed constants such as sinusoidal tables) stay as they are.
- weight-only integer quantization (``int8``, ``int4``): the table's module kinds (``nn.Linear`` and
  ``nn.Embedding``) are replaced by ``Int8Linear``/``Int8Embedding`` (or the ``Int4`` ones) that really store int8 (packed
  int4) weights plus float scales, and dequantize on the fly; activations stay fp32. Other modules
  in an integer group (norms, convolutions, LSTMs) keep fp32 storage, as ONNX Runtime's dynamic
  quantization does.

Quantization (the reference; tests hold it to these bounds):

- int8, per output channel, symmetric: ``s_c = max|W_c| / 127``, ``q = clamp(round(W / s), -127,
  127)``, ``W ~ q * s``; ``|W - q s| <= s / 2`` element-wise. Scales are fp32 (4 bytes per row).
- int4, group-wise along the input dimension (groups of ``INT4_GROUP`` = 32), symmetric:
  ``s_g = max|W_g| / 7``, ``q in [-8, 7]``, two values packed per byte, scales fp16 (2 bytes per
  group); ``|W - q s| <= s / 2`` up to the fp16 rounding of ``s`` (covered by the clamp at 7.5 steps).
  Rows whose length is not a multiple of 32 are zero-padded in storage.

``SQNR_FLOOR_DB`` gives, per dtype, the signal-to-quantization-noise ratio (dB) a Gaussian weight
matrix must keep, 1 dB under the theoretical value; tests check the quantizers against the theory and
against independent numpy quantizers (codes and scales exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdq.dtypes import DEFAULT_DTYPE, DTYPES, TABLE, DtypeInfo
from kdq.errors import close_matches
from kdq.quant.errors import PlanError

__all__ = [
    "DTYPES",
    "DEFAULT_DTYPE",
    "SQNR_FLOOR_DB",
    "INT4_GROUP",
    "DtypeSpec",
    "get_dtype",
    "quantize_int8",
    "dequantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "sqnr_db",
    "Int8Linear",
    "Int8Embedding",
    "Int4Linear",
    "Int4Embedding",
]

INT4_GROUP = 32

#: Minimum SQNR (dB) of a converted 256 x 512 N(0, 1) weight matrix: 1 dB under the theoretical value
#: (fp16 73.65, bf16 55.59, int8 per row 42.59, int4 per group of 32 20.27 dB; derived in
#: tests/test_quant_dtypes.py, which holds the measured values within 0.5 dB of it). int8's depends on
#: the row length (the expected row maximum grows with it): 44.5 dB at 64 columns, 41.6 at 2048.
SQNR_FLOOR_DB: dict[str, float] = {"fp32": float("inf"), "fp16": 72.7, "bf16": 54.6, "int8": 41.6, "int4": 19.3}


@dataclass(frozen=True)
class DtypeSpec:
    """A row of ``kdq.dtypes.TABLE`` with its torch dtypes resolved.

    Attributes:
        info: the table row (bits, weight_only, module kinds, ONNX realisation).
        storage: ``torch.float*`` for float casts, ``torch.int8``/``torch.uint8`` (packed int4) for
            integer weight-only kinds.
        compute: the dtype activations run in for modules of this dtype.
    """

    info: DtypeInfo
    storage: torch.dtype
    compute: torch.dtype

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def bits(self) -> int:
        return self.info.bits

    @property
    def weight_only(self) -> bool:
        return self.info.weight_only


_SPECS = {name: DtypeSpec(info, getattr(torch, info.storage), getattr(torch, info.compute)) for name, info in TABLE.items()}


def get_dtype(name: str) -> DtypeSpec:
    """The ``DtypeSpec`` of a plan dtype name; raises ``PlanError`` naming close matches."""
    spec = _SPECS.get(name)
    if spec is None:
        raise PlanError(f"dtype={name!r} is not known: allowed are {', '.join(DTYPES)}{close_matches(str(name), DTYPES)}")
    return spec


# ---------------------------------------------------------------------------- reference math
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: returns ``(q int8 [rows, cols], scale fp32 [rows])``."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_int8``: ``q * scale`` per row, in ``dtype``."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.to(dtype) * scale.to(dtype).reshape(shape)).to(dtype)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric int4 of a 2-D weight along its last dim.

    Returns:
        ``(packed uint8 [rows, ceil(cols / group) * group / 2], scale fp16 [rows, ceil(cols / group)])``;
        element ``2k`` of a row is the low nibble of byte ``k``.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    ngroups = -(-cols // group)
    pad = ngroups * group - cols
    if pad:
        w = F.pad(w, (0, pad))
    wg = w.reshape(rows, ngroups, group)
    scale = (wg.abs().amax(dim=2) / 7.0).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
    q = torch.round(wg / scale.float()[:, :, None]).clamp_(-8, 7).to(torch.int16).reshape(rows, -1)
    u = (q + 8).to(torch.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed, scale


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32, group: int = INT4_GROUP
) -> torch.Tensor:
    """Inverse of ``quantize_int4``: ``[rows, cols]`` in ``dtype`` (works on any leading dims)."""
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    q = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    q = q.reshape(*packed.shape[:-1], scale.shape[-1], group).to(dtype)
    w = (q * scale.to(dtype)[..., None]).reshape(*packed.shape[:-1], -1)
    return w[..., :cols]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB (inf if exact)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(ref.pow(2).sum() / noise))


# ---------------------------------------------------------------------------- quantized modules
class _WeightOnly(nn.Module):
    """Shared parts of the weight-only modules: a dequantized read-only ``weight`` view."""

    kdq_dtype = ""

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:  # for code that reads ``module.weight`` (shape, dtype, device)
        return self.dequantized_weight()


class Int8Linear(_WeightOnly):
    """``nn.Linear`` with int8 per-output-channel weights; ``y = (x @ q^T) * s + b``, in x's dtype."""

    kdq_dtype = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features = qweight.shape[1]
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def from_float(cls, linear: nn.Linear, memo: dict | None = None) -> Int8Linear:
        if _is_conv1d(linear):  # weight stored [in, out]: quantize the [out, in] view, per output channel
            q, s = _memo_quant(memo, linear.weight, "int8T", lambda w: quantize_int8(w.t()))
        else:
            q, s = _memo_quant(memo, linear.weight, "int8", quantize_int8)
        return cls(q, s, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(_WeightOnly):
    """``nn.Embedding`` with int8 rows and one fp32 scale per row; output fp32."""

    kdq_dtype = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, emb: nn.Embedding, memo: dict | None = None) -> Int8Embedding:
        q, s = _memo_quant(memo, emb.weight, "int8", quantize_int8)
        return cls(q, s, emb.padding_idx)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids][..., None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int4Linear(_WeightOnly):
    """``nn.Linear`` with group-wise int4 weights (packed), dequantized per call to x's dtype."""

    kdq_dtype = "int4"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, in_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = packed.shape[0]
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def from_float(cls, linear: nn.Linear, memo: dict | None = None) -> Int4Linear:
        if _is_conv1d(linear):
            q, s = _memo_quant(memo, linear.weight, "int4T", lambda w: quantize_int4(w.t()))
            return cls(q, s, linear.weight.shape[0], linear.bias)
        q, s = _memo_quant(memo, linear.weight, "int4", quantize_int4)
        return cls(q, s, linear.in_features, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={INT4_GROUP}"


class Int4Embedding(_WeightOnly):
    """``nn.Embedding`` with group-wise int4 rows; output fp32."""

    kdq_dtype = "int4"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__()
        self.num_embeddings = packed.shape[0]
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, emb: nn.Embedding, memo: dict | None = None) -> Int4Embedding:
        q, s = _memo_quant(memo, emb.weight, "int4", quantize_int4)
        return cls(q, s, emb.embedding_dim, emb.padding_idx)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.embedding_dim, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(self.qweight[ids], self.scale[ids], self.embedding_dim, torch.float32)


def _memo_quant(memo: dict | None, weight: torch.Tensor, kind: str, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` once per (tensor, kind): tied weights share the same int tensors."""
    if memo is None:
        return fn(weight)
    key = (id(weight), kind)
    if key not in memo:
        memo[key] = (fn(weight), weight)  # keep ``weight`` alive so its id stays unique
    return memo[key][0]


#: The ``torch.nn`` class of each module kind the table names, and the replacement per dtype.
MODULE_KINDS: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Embedding": nn.Embedding}
HANDLERS: dict[tuple[str, str], type[_WeightOnly]] = {
    ("int8", "Linear"): Int8Linear,
    ("int8", "Embedding"): Int8Embedding,
    ("int4", "Linear"): Int4Linear,
    ("int4", "Embedding"): Int4Embedding,
}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its relatives): a ``Linear`` whose weight is stored ``[in, out]``
    (``y = x @ W + b``). It is converted as a ``Linear``: the ONNX export sees the same MatMul/Gemm, so
    leaving it fp32 here would make an int8 plan mean int8 in the bundle and fp32 in PyTorch."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__ == "transformers.pytorch_utils"


def quantized_class(module: nn.Module, dtype: str) -> type[_WeightOnly] | None:
    """The weight-only class that replaces ``module`` under ``dtype`` (None: module keeps fp32).

    Only the module kinds ``kdq.dtypes.TABLE[dtype].modules`` names are replaced, matched by exact
    type: subclasses may read ``.weight`` in their own way. transformers' ``Conv1D`` counts as a
    ``Linear`` (``_is_conv1d``).
    """
    info = TABLE.get(dtype)
    if info is None or not info.weight_only:
        return None
    kind = "Linear" if _is_conv1d(module) and "Linear" in info.modules else \
        next((k for k in info.modules if type(module) is MODULE_KINDS[k]), None)
    if kind is None:
        return None
    if kind == "Embedding" and (module.max_norm is not None or module.sparse):
        return None
    return HANDLERS[(dtype, kind)]
