"""transformers' Conv1D (GPT-2) is converted as a Linear by int8/int4 plans.

Reproduction (issue 23 coverage matrix): ``apply_plan(gpt2, Plan(default="int8"))`` left every
attention and MLP projection (``Conv1D``, a Linear whose weight is stored [in, out]) in fp32, while the
ONNX export of the same plan quantizes their MatMul/Gemm: one plan, two meanings, and the planner saw
no bytes to save in GPT-2's layers.
"""

from __future__ import annotations

import pytest
import torch

from kdq.quant import Plan, apply_plan, model_bytes
from kdq.quant.dtypes import Int4Linear, Int8Linear, dequantize_int8, quantize_int8

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("dtype, cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_conv1d_is_quantized_like_a_linear(dtype, cls):
    model = _gpt2()
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [in 32, out 96]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref_layer = model.transformer.h[0].attn.c_attn(x)
    fp32_bytes = model_bytes(model)
    apply_plan(model, Plan({"transformer.h.0": dtype}))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, cls) and (layer.in_features, layer.out_features) == (32, 96)
    for name in ("c_proj",):
        assert isinstance(getattr(model.transformer.h[0].attn, name), cls)
    assert isinstance(model.transformer.h[0].mlp.c_fc, cls)
    assert model_bytes(model) < fp32_bytes
    with torch.no_grad():
        got = layer(x)
    if dtype == "int8":  # exactly the reference quantizer on the [out, in] view
        q, s = quantize_int8(w.t())
        assert torch.equal(layer.qweight, q) and torch.equal(layer.scale, s)
        want = x @ dequantize_int8(q, s).t() + layer.bias
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.testing.assert_close(got, ref_layer, rtol=0.2, atol=0.2) is None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
