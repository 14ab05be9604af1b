"""Dtype handlers: quantization error bounds, SQNR floors, real storage, modules vs reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdq.quant import DTYPES, apply_plan, model_bytes
from kdq.quant.dtypes import (
    INT4_GROUP,
    SQNR_FLOOR_DB,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    get_dtype,
    quantize_int4,
    quantize_int8,
    sqnr_db,
)
from kdq.quant.plan import Plan

SHAPES = [(1, 1), (3, 47), (31, 123), (64, 64), (5, 33)]


def _weights(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    if shape[1] > 2:
        w[0, 1] = 0.0  # exact zeros and an all-zero row must survive
    if shape[0] > 2:
        w[2] = 0.0
    return w


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_int8_error_is_at_most_half_a_step(shape, seed, scale):
    w = _weights(shape, seed, scale)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6) + 1e-30).all())


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_int4_error_is_at_most_half_a_step(shape, seed, scale):
    w = _weights(shape, seed, scale)
    packed, s = quantize_int4(w)
    ngroups = -(-shape[1] // INT4_GROUP)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], ngroups * INT4_GROUP // 2)
    assert s.dtype == torch.float16 and s.shape == (shape[0], ngroups)
    back = dequantize_int4(packed, s, shape[1])
    assert back.shape == w.shape
    step = s.float().repeat_interleave(INT4_GROUP, dim=1)[:, : shape[1]]
    assert bool(((back - w).abs() <= step / 2 * (1 + 1e-3) + 1e-30).all())


def test_int4_packing_is_lossless_on_the_grid():
    q = torch.arange(-8, 8).repeat(3, 4).float()  # [3, 64] values already on the grid with step 1
    q[:, 0] = 7.0  # absmax 8 -> keep |q| <= 7 so the scale is exactly 1
    q[:, 1] = -7.0
    q = q.clamp(-7, 7)
    packed, s = quantize_int4(q)
    assert torch.equal(dequantize_int4(packed, s, q.shape[1]), q)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "fp32"])
def test_sqnr_floor_per_dtype(dtype):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    if dtype == "int8":
        approx = dequantize_int8(*quantize_int8(w))
    elif dtype == "int4":
        approx = dequantize_int4(*quantize_int4(w), w.shape[1])
    else:
        approx = w.to(get_dtype(dtype).storage).float()
    assert sqnr_db(w, approx) >= SQNR_FLOOR_DB[dtype]
    assert sqnr_db(w, w) == float("inf")


@pytest.mark.parametrize("cls, dtype", [(Int8Linear, "int8"), (Int4Linear, "int4")])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_matches_reference(cls, dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(47, 31, bias=bias)
    qlin = cls.from_float(lin)
    assert qlin.qweight.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
    x = torch.randn(3, 5, 47)
    w = qlin.dequantized_weight()
    ref = F.linear(x, w, lin.bias)
    torch.testing.assert_close(qlin(x), ref, rtol=1e-5, atol=1e-5)
    assert sqnr_db(lin(x), qlin(x)) >= SQNR_FLOOR_DB[dtype] - 10  # output noise stays near the weight's
    assert qlin.weight.shape == lin.weight.shape
    xb = x.to(torch.bfloat16)
    assert qlin(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [Int8Embedding, Int4Embedding])
def test_quantized_embedding_matches_reference(cls):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 37, padding_idx=0)
    qemb = cls.from_float(emb)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    torch.testing.assert_close(qemb(ids), F.embedding(ids, qemb.dequantized_weight()), rtol=0, atol=1e-6)
    assert qemb(ids).dtype == torch.float32


def test_the_dtype_table_is_what_kdq_quant_does():
    """kdq.dtypes.TABLE is read by kdq.quant and kdq.export; here its rows against the torch side."""
    from kdq.dtypes import MODULE_OPS, TABLE, WEIGHTED_OPS
    from kdq.quant.dtypes import HANDLERS, MODULE_KINDS, quantized_class

    assert tuple(TABLE) == DTYPES
    for name, info in TABLE.items():
        spec = get_dtype(name)
        packed = 2 if name == "int4" else 1  # int4 stores two values per uint8
        assert torch.empty((), dtype=spec.storage).element_size() * 8 == info.bits * packed
        assert spec.weight_only == info.weight_only and (spec.compute == torch.float32) == (info.weight_only or name == "fp32")
        for kind, cls in MODULE_KINDS.items():
            q = quantized_class(cls(4, 4), name)
            assert (q is not None) == (kind in info.modules), (name, kind)
            assert q is None or (q is HANDLERS[(name, kind)] and q.kdq_dtype == name)
        assert quantized_class(nn.Conv1d(2, 2, 1), name) is None and quantized_class(nn.LayerNorm(4), name) is None
        if info.onnx is None:
            assert info.onnx_refusal, name
            continue
        # Both sides convert the ops of the same module kinds; every exception is explained in the row.
        same = {op: (name if not info.weight_only or any(op in MODULE_OPS[k] for k in info.modules) else "fp32")
                for op in WEIGHTED_OPS}
        for op in WEIGHTED_OPS:
            if info.onnx.get(op) != same[op]:
                assert any(d.startswith(op) for d in info.differences), (name, op, info.onnx.get(op))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_integer_dtypes_convert_exactly_the_tables_module_kinds(dtype):
    m = nn.ModuleDict({"lin": nn.Linear(64, 8), "emb": nn.Embedding(10, 64), "conv": nn.Conv1d(4, 4, 3),
                       "up": nn.ConvTranspose1d(4, 4, 3), "norm": nn.LayerNorm(64)})
    apply_plan(m, Plan({k: dtype for k in m}))
    assert {k for k, v in m.items() if getattr(v, "kdq_dtype", "") == dtype} == {"lin", "emb"}
    assert all(p.dtype == torch.float32 for k in ("conv", "up", "norm") for p in m[k].parameters())


class _TiedLM(nn.Module):
    def __init__(self, vocab: int = 40, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_weights_convert_once_and_consistently(dtype):
    torch.manual_seed(0)
    m = _TiedLM()
    n = {"emb": 40 * 32, "mid": 32 * 32 + 32}
    assert model_bytes(m) == 4 * (n["emb"] + n["mid"])  # the tied weight counts once
    # The head is assigned fp32, but follows the embedding that holds the weight first.
    apply_plan(m, Plan({"emb": dtype, "head": "fp32"}))
    if dtype in ("int8", "int4"):
        assert isinstance(m.emb, (Int8Embedding, Int4Embedding)) and type(m.head).__name__.endswith("Linear")
        assert m.emb.qweight is m.head.qweight and m.emb.scale is m.head.scale
        per = {"int8": 40 * 32 + 40 * 4, "int4": 40 * 16 + 40 * 2}[dtype]
        assert model_bytes(m) == per + 4 * n["mid"]
    else:
        assert m.emb.weight is m.head.weight
        assert model_bytes(m) == get_dtype(dtype).bits // 8 * n["emb"] + 4 * n["mid"]
    out = m(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 40) and bool(torch.isfinite(out).all())


def test_real_storage_after_apply():
    m = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    before = model_bytes(m)
    apply_plan(m, Plan({"0": "int8", "1": "int8", "2": "fp16"}))
    assert isinstance(m[0], Int8Linear) and m[0].qweight.dtype == torch.int8
    assert m[1].weight.dtype == torch.float32  # norms in an int8 group keep fp32
    assert m[2].weight.dtype == torch.float16
    expected = (64 * 64 + 64 * 4 + 64 * 4) + 2 * 64 * 4 + 2 * (64 * 8 + 8)
    assert model_bytes(m) == expected < before
    y = m(torch.randn(2, 64))
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())


class _MaskedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask):
        scores = self.proj(x) + mask  # mask holds finfo(float32).min where nothing may be attended
        return torch.softmax(scores, dim=-1)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _MaskedAttention()
        self.pre = nn.Linear(8, 8)

    def forward(self, x):
        mask = torch.full((x.shape[0], 8), torch.finfo(torch.float32).min)
        return self.inner(self.pre(x), mask=mask)


def test_boundary_casts_keep_fp32_masks_finite_in_fp16():
    m = apply_plan(_Outer(), Plan({"inner": "fp16"}))
    y = m(torch.randn(3, 8))
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())  # -inf masks would give NaN
    z = apply_plan(_Outer(), Plan({"inner": "bf16", "pre": "int8"}))(torch.randn(3, 8))
    assert z.dtype == torch.bfloat16 and bool(torch.isfinite(z).all())
