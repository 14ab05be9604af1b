"""Dtype handlers: quantization error bounds, SQNR floors, real storage, modules vs reference."""

from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------------------- independent references
# Written from the definitions in kdq/quant/dtypes.py's docstring with numpy, sharing no code with the
# quantizers: same IEEE float32 operations, so codes and scales must agree exactly.
def _int8_reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: s = max|w| / 127 (float32, at least float32's tiny), q = clip(rint(w / s), -127, 127)."""
    w = w.astype(np.float32)
    s = np.maximum(np.abs(w).max(axis=1) / np.float32(127), np.finfo(np.float32).tiny).astype(np.float32)
    return np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8), s


def _int4_reference(w: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per row and group of ``group`` columns (zero-padded): s = fp16(max|w| / 7), q = clip(rint(w / s), -8, 7)."""
    w = w.astype(np.float32)
    rows, cols = w.shape
    ngroups = -(-cols // group)
    wg = np.pad(w, ((0, 0), (0, ngroups * group - cols))).reshape(rows, ngroups, group)
    s = np.maximum(np.abs(wg).max(axis=2) / np.float32(7), np.finfo(np.float16).tiny).astype(np.float16)
    q = np.clip(np.rint(wg / s.astype(np.float32)[:, :, None]), -8, 7).astype(np.int8)
    return q.reshape(rows, -1)[:, :cols], s


def _unpack_int4(packed: torch.Tensor, cols: int) -> np.ndarray:
    """Codes from the packed bytes: element 2k is byte k's low nibble, 2k+1 its high one, offset by 8."""
    b = packed.numpy().astype(np.int16)
    q = np.empty((b.shape[0], 2 * b.shape[1]), dtype=np.int16)
    q[:, 0::2], q[:, 1::2] = (b & 0xF) - 8, (b >> 4) - 8
    return q[:, :cols].astype(np.int8)


def _steps(scale_per_group: np.ndarray, cols: int, group: int = 32) -> np.ndarray:
    return np.repeat(scale_per_group.astype(np.float64), group, axis=1)[:, :cols]


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_int8_scale_codes_and_error_against_an_independent_quantizer(shape, seed, scale):
    w = _weights(shape, seed, scale)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    q_ref, s_ref = _int8_reference(w.numpy())
    np.testing.assert_array_equal(s.numpy(), s_ref)  # scale = absmax / 127, computed elsewhere
    np.testing.assert_array_equal(q.numpy(), q_ref)
    a = w.abs().numpy()
    for r in range(shape[0]):  # the full range is used: each nonzero row reaches +-127 at its absmax
        if a[r].max() > 0:
            j = int(a[r].argmax())
            assert int(q[r, j]) == (127 if w[r, j] > 0 else -127) and int(q[r].abs().max()) == 127
    err = np.abs(q_ref.astype(np.float64) * s_ref[:, None] - w.numpy().astype(np.float64))
    assert (err <= s_ref[:, None].astype(np.float64) / 2 * (1 + 1e-6) + 1e-30).all()
    np.testing.assert_array_equal(dequantize_int8(q, s).numpy(), q_ref.astype(np.float32) * s_ref[:, None])


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_int4_codes_scales_and_error_against_an_independent_quantizer(shape, seed, scale):
    w = _weights(shape, seed, scale)
    packed, s = quantize_int4(w)
    ngroups = -(-shape[1] // INT4_GROUP)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], ngroups * INT4_GROUP // 2)
    assert s.dtype == torch.float16 and s.shape == (shape[0], ngroups)
    q_ref, s_ref = _int4_reference(w.numpy())
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(_unpack_int4(packed, shape[1]), q_ref)
    back = dequantize_int4(packed, s, shape[1])
    assert back.shape == w.shape
    # Against the original weights, with the bound the group scales give: half a step (|w| / s <= 7.004
    # after fp16 rounding of s, so the clamp at 7 never costs more than that).
    step = _steps(s_ref, shape[1])
    assert (np.abs(back.numpy().astype(np.float64) - w.numpy()) <= step / 2 * (1 + 1e-6) + 1e-30).all()


def test_int4_packing_is_lossless_on_the_grid():
    q = torch.arange(-8, 8).repeat(3, 4).float()  # [3, 64] values already on the grid with step 1
    q[:, 0] = 7.0  # absmax 8 -> keep |q| <= 7 so the scale is exactly 1
    q[:, 1] = -7.0
    q = q.clamp(-7, 7)
    packed, s = quantize_int4(q)
    assert torch.equal(dequantize_int4(packed, s, q.shape[1]), q)


# Theoretical SQNR of each dtype for N(0, 1) weights (signal power 1), which the floors sit under by 1 dB:
#
# Integer, symmetric, step D = M / L over a block of n values (int8: a row, L = 127; int4: a group of
# 32, L = 7), M = max |w| of the block. Rounding errors of the n - 1 other values are uniform on
# [-D/2, D/2] (D is a tenth of sigma or less), power D^2 / 12; the maximum itself is on the grid (error
# 0). So the noise power is (n - 1) / n * E[M^2] / (12 L^2), and E[M^2] for the maximum of n |N(0, 1)|
# follows from P(M <= m) = erf(m / sqrt 2)^n: E[M^2] = integral_0^inf 2 m (1 - erf(m / sqrt 2)^n) dm.
#
# Float with p significant bits (fp16 11, bf16 8), round to nearest: in the binade [2^e, 2^(e+1)) the
# spacing is 2^(e - p + 1) and the error is uniform, power 4^(e - p + 1) / 12; weighted by the binade's
# probability P(2^e <= |w| < 2^(e+1)) = erf(2^(e+1) / sqrt 2) - erf(2^e / sqrt 2). (Subnormals: a
# 1e-5 share of N(0, 1), negligible.)
def _theory_sqnr_db(dtype: str, cols: int) -> float:
    from scipy.special import erf

    if dtype in ("int8", "int4"):
        levels, n = (127, cols) if dtype == "int8" else (7, INT4_GROUP)
        m = np.linspace(0.0, 12.0, 200_001)
        e_max_sq = np.trapezoid(2 * m * (1 - erf(m / np.sqrt(2)) ** n), m)
        return float(10 * np.log10(12 * levels**2 / (e_max_sq * (n - 1) / n)))
    p = {"fp16": 11, "bf16": 8}[dtype]
    e = np.arange(-40, 8, dtype=np.float64)
    share = erf(2 ** (e + 1) / np.sqrt(2)) - erf(2**e / np.sqrt(2))
    return float(-10 * np.log10((share * 4.0 ** (e - p + 1) / 12).sum()))


def _round_trip(w: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(w))
    if dtype == "int4":
        return dequantize_int4(*quantize_int4(w), w.shape[1])
    return w.to(get_dtype(dtype).storage).float()


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "fp32"])
def test_sqnr_is_the_theoretical_one_and_the_floor_is_within_1_db(dtype):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    theory = _theory_sqnr_db(dtype, 512)
    measured = sqnr_db(w, _round_trip(w, dtype))
    assert abs(measured - theory) < 0.5, (measured, theory)  # a 2x coarser step costs 6 dB
    assert theory - 1.0 <= SQNR_FLOOR_DB[dtype] <= theory and measured >= SQNR_FLOOR_DB[dtype]
    assert sqnr_db(w, w) == float("inf")


@pytest.mark.parametrize("rows, cols", [(1024, 64), (64, 2048)])
def test_int8_sqnr_follows_the_row_length(rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    assert abs(sqnr_db(w, _round_trip(w, "int8")) - _theory_sqnr_db("int8", cols)) < 0.5


@pytest.mark.parametrize("cls, dtype", [(Int8Linear, "int8"), (Int4Linear, "int4")])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_against_the_float_layer_and_an_independent_quantizer(cls, dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(47, 31, bias=bias)
    qlin = cls.from_float(lin)
    assert qlin.qweight.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
    w = lin.weight.detach().numpy()
    if dtype == "int8":
        q_ref, s_ref = _int8_reference(w)
        w_ref = q_ref.astype(np.float32) * s_ref[:, None]
        step = np.repeat(s_ref[:, None].astype(np.float64), w.shape[1], axis=1)
    else:
        q_ref, s_ref = _int4_reference(w)
        w_ref = q_ref.astype(np.float32) * _steps(s_ref, w.shape[1]).astype(np.float32)
        step = _steps(s_ref, w.shape[1])
    x = torch.randn(3, 5, 47)
    ref = F.linear(x, torch.from_numpy(w_ref), lin.bias)
    torch.testing.assert_close(qlin(x), ref, rtol=1e-6, atol=1e-6)
    # Against the float layer: |y - y_float| <= sum_j |x_j| |dW_ij| <= |x| @ (step / 2)^T.
    bound = x.abs().double() @ torch.from_numpy(step / 2).T
    assert bool(((qlin(x) - lin(x)).abs().double() <= bound * (1 + 1e-5) + 1e-6).all())
    assert qlin.weight.shape == lin.weight.shape
    xb = x.to(torch.bfloat16)
    assert qlin(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [Int8Embedding, Int4Embedding])
def test_quantized_embedding_against_the_float_table_and_an_independent_quantizer(cls):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 37, padding_idx=0)
    qemb = cls.from_float(emb)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    w = emb.weight.detach().numpy()
    if cls is Int8Embedding:
        q_ref, s_ref = _int8_reference(w)
        step = np.repeat(s_ref[:, None].astype(np.float64), w.shape[1], axis=1)
    else:
        q_ref, s_ref = _int4_reference(w)
        step = _steps(s_ref, w.shape[1])
    w_ref = (q_ref.astype(np.float64) * step).astype(np.float32)
    out = qemb(ids)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), w_ref[ids.numpy()])
    err = np.abs(out.numpy().astype(np.float64) - w[ids.numpy()])
    assert (err <= step[ids.numpy()] / 2 * (1 + 1e-6) + 1e-30).all()


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
