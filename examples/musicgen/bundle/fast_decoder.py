"""MusicGen's decoder as two hand-written ONNX graphs with a KV cache updated in place.

The TorchScript export of the decoder (``decoder_model_merged``) concatenates each layer's past keys
and values with the new position every step (48 ``Concat`` copies of the whole cache at
MusicGen-small size) and runs about 2,360 nodes per step, most of them dynamic shape arithmetic
(docs/device.md, "Where a cached step's time goes"). This module writes the same decoder with
``onnx.helper``, from a loaded ``MusicgenForConditionalGeneration``, as two graphs:

- ``cross_kv``: ``encoder_hidden_states`` (B, L, text_hidden), ``encoder_attention_mask`` (B, L) ->
  ``cross_key.{i}``, ``cross_value.{i}`` (B, H, L, D) for every layer. Run once per clip. As in
  ``MusicgenForConditionalGeneration.forward`` the states are projected (``enc_to_dec_proj``, when
  MusicGen uses it) and multiplied by the mask before the keys and values are computed.
- ``decoder_step``: ``input_ids`` (B*K, S), ``encoder_attention_mask`` (B, L), the cross keys and
  values, ``past_key.{i}``/``past_value.{i}`` (B, H, T_max, D) preallocated buffers, ``seqlens_k``
  (B,) int32 = total length - 1, ``total_sequence_length`` () int32 = past length + S -> ``logits``
  (B*K, S, V) (the layout of ``decoder_model_merged``'s logits), ``present_key.{i}``,
  ``present_value.{i}``. Self-attention is ONNX Runtime's ``com.microsoft.GroupQueryAttention``
  (``kv_num_heads = num_heads``): it writes the new keys and values at position ``past`` of the
  buffer, and when the runtime binds the same ``OrtValue`` as ``past_key.i`` and ``present_key.i``
  it does so in place (nothing else of the cache is copied). Cross-attention is
  ``com.microsoft.MultiHeadAttention`` over the precomputed keys and values (BNSH) with the encoder
  mask as key padding mask.

What each step computes, exactly as transformers' ``MusicgenForCausalLM`` (pre-LayerNorm layers):
``x = sum_k embed_tokens[k](ids[:, k]) * embed_scale + sinusoid(past + arange(S))``; per layer
``x += out_proj(attn(LN(x)))`` (causal self-attention), ``x += out_proj(cross_attn(LN(x), K_enc, V_enc))``,
``x += fc2(gelu(fc1(LN(x))))``; then ``LN(x)`` and one ``lm_heads[k]`` per codebook. Attention scale
``head_dim ** -0.5``; positions are computed in the graph as ``[cos(p * f), sin(p * f)]`` with the
frequencies ``f`` of ``MusicgenSinusoidalPositionalEmbedding`` (no table, so no weight a plan could
quantize by accident). The unconditional guidance row has an all-zero encoder mask: transformers
adds ``finfo.min`` to every score of that row (a uniform softmax) over keys and values that are
exactly zero (the states were multiplied by the mask, and the projections have no bias), so the
cross-attention output is exactly zero; the key padding mask here gives the same.

Limits of ``GroupQueryAttention`` on CPU (ONNX Runtime 1.32): fp32 or fp16 only, ``head_dim`` a
multiple of 8, and more than one new position per call only with an empty past (the first step) or
batch 1. The generation loop only ever feeds one position per step.

Every weight ``MatMul``/``Gather`` is named after the module scope the TorchScript exporter gives it
(``/decoder/model/decoder/layers.0/self_attn/q_proj/MatMul``, ``/decoder/lm_heads.0/MatMul``,
``/enc_to_dec_proj/MatMul``), so ``kdq.export.precision.apply_plan_onnx`` and ``check_conformance``
apply a plan to these graphs exactly as to the exported ones. fp16 is refused (``check_inplace_plan``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kdq.errors import KdqError, bad_value
from musicgen.bundle.parts import DecoderStep

#: The two graphs of the in-place decoder, in the order the runtime runs them.
INPLACE_GRAPHS = ("cross_kv", "decoder_step")
OPSET = 20  # standard Gelu (20), LayerNormalization (17), Split with num_outputs (18)
_P = "/decoder/model/decoder"


class InplaceDecoderError(KdqError):
    """The model or plan cannot be written as the in-place decoder graphs."""


@dataclass(frozen=True)
class DecoderDims:
    """Sizes of a MusicGen decoder, read from the loaded model."""

    layers: int
    heads: int
    head_dim: int
    hidden: int
    ffn: int
    codebooks: int
    vocab: int
    text_hidden: int
    max_positions: int
    project: bool

    @classmethod
    def of(cls, model) -> DecoderDims:
        cfg = model.decoder.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        if head_dim % 8:
            raise bad_value(InplaceDecoderError, "decoder.hidden_size / num_attention_heads", head_dim,
                            "a multiple of 8 (ONNX Runtime's CPU GroupQueryAttention)", "use decoder='merged'")
        if cfg.hidden_size % 2:
            raise bad_value(InplaceDecoderError, "decoder.hidden_size", cfg.hidden_size, "an even number (sinusoidal positions)")
        if cfg.activation_function != "gelu":
            raise bad_value(InplaceDecoderError, "decoder.activation_function", cfg.activation_function,
                            "'gelu' (the exact erf GELU of every MusicGen checkpoint)", "use decoder='merged'")
        step = DecoderStep(model, with_past=False)
        return cls(layers=cfg.num_hidden_layers, heads=heads, head_dim=head_dim, hidden=cfg.hidden_size,
                   ffn=cfg.ffn_dim, codebooks=cfg.num_codebooks, vocab=cfg.vocab_size,
                   text_hidden=model.text_encoder.config.hidden_size, max_positions=cfg.max_position_embeddings,
                   project=step.project)


class _Graph:
    """A small builder over ``onnx.helper``: named nodes, initializers from torch tensors."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.value_info: list = []
        self._init_names: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; a name already added (a shared constant) is kept as it is."""
        from onnx import numpy_helper

        if name not in self._init_names:
            self._init_names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
        return name

    def const(self, name: str, values, dtype) -> str:
        return self.init(name, np.asarray(values, dtype=dtype))

    def weight_t(self, linear: nn.Linear, name: str) -> str:
        """``linear.weight`` transposed to (in, out), as the TorchScript exporter stores a MatMul weight."""
        return self.init(name, linear.weight.detach().float().t().contiguous().numpy())

    def node(self, op: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, domain: str = "",
             **attrs) -> Any:
        """Append a node; returns its output name (or names). ``outputs``: a count (names derived from
        the node's) or the names themselves (graph outputs)."""
        from onnx import helper

        outs = list(outputs) if isinstance(outputs, list) else [f"{name}_output_{j}" for j in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def float_info(self, name: str, shape: list) -> None:
        """Declare a float tensor's type (contrib op outputs are unknown to ONNX shape inference, which
        ONNX Runtime's quantizers rely on)."""
        from onnx import TensorProto, helper

        self.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def model(self):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits, value_info=self.value_info)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="kdq-musicgen-fast-decoder")
        m.ir_version = 10
        return m


def _io(name: str, elem: int, shape: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _scope_path(module_name: str) -> str:
    """``decoder.model.decoder.layers.3.fc1`` -> ``/decoder/model/decoder/layers.3/fc1`` (ModuleList items
    keep their ``list.i`` component, as in TorchScript scopes)."""
    parts = module_name.split(".")
    out: list[str] = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}.{p}"
        else:
            out.append(p)
    return "/" + "/".join(out)


def _linear(g: _Graph, x: str, linear: nn.Linear, module_name: str) -> str:
    """``x @ W.T`` (+ bias) as a MatMul (and Add) named after the module."""
    path = _scope_path(module_name)
    y = g.node("MatMul", [x, g.weight_t(linear, f"{module_name}.weight_t")], f"{path}/MatMul")
    if linear.bias is not None:
        y = g.node("Add", [g.init(f"{module_name}.bias", linear.bias.detach().float().numpy()), y], f"{path}/Add")
    return y


def _ln(g: _Graph, x: str, ln: nn.LayerNorm, module_name: str) -> str:
    w = g.init(f"{module_name}.weight", ln.weight.detach().float().numpy())
    b = g.init(f"{module_name}.bias", ln.bias.detach().float().numpy())
    return g.node("LayerNormalization", [x, w, b], f"{_scope_path(module_name)}/LayerNormalization", axis=-1,
                  epsilon=float(ln.eps))


def cache_names(layers: int, prefix: str) -> list[str]:
    """``{prefix}_key.0, {prefix}_value.0, ...`` (prefix ``past``, ``present`` or ``cross``)."""
    return [f"{prefix}_{kv}.{i}" for i in range(layers) for kv in ("key", "value")]


def cross_kv_names(layers: int) -> list[str]:
    """``cross_key.0, cross_value.0, cross_key.1, ...``."""
    return cache_names(layers, "cross")


def build_cross_kv(model):
    """The ``cross_kv`` graph (see the module docstring) as an ``onnx.ModelProto``."""
    from onnx import TensorProto as T

    d = DecoderDims.of(model)
    dec = model.decoder.model.decoder
    g = _Graph("musicgen_cross_kv")
    g.inputs = [_io("encoder_hidden_states", T.FLOAT, ["batch_size", "encoder_sequence_length", d.text_hidden]),
                _io("encoder_attention_mask", T.INT64, ["batch_size", "encoder_sequence_length"])]
    h = "encoder_hidden_states"
    if d.project:
        h = _linear(g, h, model.enc_to_dec_proj, "enc_to_dec_proj")
    m = g.node("Cast", ["encoder_attention_mask"], "/Cast", to=T.FLOAT)
    m = g.node("Unsqueeze", [m, g.const("axes_last", [-1], np.int64)], "/Unsqueeze")
    h = g.node("Mul", [h, m], "/Mul")
    heads_shape = g.const("shape_bl_h_d", [0, 0, d.heads, d.head_dim], np.int64)
    for i in range(d.layers):
        attn = dec.layers[i].encoder_attn
        for kv, p in (("key", "k_proj"), ("value", "v_proj")):
            name = f"decoder.model.decoder.layers.{i}.encoder_attn.{p}"
            y = _linear(g, h, getattr(attn, p), name)
            path = _scope_path(name.rsplit(".", 1)[0])
            y = g.node("Reshape", [y, heads_shape], f"{path}/Reshape_{kv}")
            g.node("Transpose", [y], f"{path}/Transpose_{kv}", outputs=[f"cross_{kv}.{i}"], perm=[0, 2, 1, 3])
            g.outputs.append(_io(f"cross_{kv}.{i}", T.FLOAT, ["batch_size", d.heads, "encoder_sequence_length", d.head_dim]))
    return g.model()


def build_decoder_step(model):
    """The ``decoder_step`` graph (see the module docstring) as an ``onnx.ModelProto``."""
    from onnx import TensorProto as T

    d = DecoderDims.of(model)
    dec = model.decoder.model.decoder
    g = _Graph("musicgen_decoder_step")
    g.inputs = [_io("input_ids", T.INT64, ["batch_size_x_codebooks", "sequence_length"]),
                _io("encoder_attention_mask", T.INT64, ["batch_size", "encoder_sequence_length"])]
    for name in cross_kv_names(d.layers):
        g.inputs.append(_io(name, T.FLOAT, ["batch_size", d.heads, "encoder_sequence_length", d.head_dim]))
    for name in cache_names(d.layers, "past"):
        g.inputs.append(_io(name, T.FLOAT, ["batch_size", d.heads, "max_sequence_length", d.head_dim]))
    g.inputs += [_io("seqlens_k", T.INT32, ["batch_size"]), _io("total_sequence_length", T.INT32, [])]

    # token embeddings: ids (B*K, S) -> (B, K, S) -> one Gather per codebook table, summed in codebook order
    seq = g.node("Shape", ["input_ids"], f"{_P}/Shape", start=1, end=2)  # [S]
    shape = g.node("Concat", [g.const("minus1_k", [-1, d.codebooks], np.int64), seq], f"{_P}/Concat", axis=0)
    ids = g.node("Reshape", ["input_ids", shape], f"{_P}/Reshape")
    split = g.node("Split", [ids], f"{_P}/Split", outputs=d.codebooks, axis=1, num_outputs=d.codebooks)
    split = split if isinstance(split, list) else [split]
    x = None
    for k in range(d.codebooks):
        table = g.init(f"decoder.model.decoder.embed_tokens.{k}.weight", dec.embed_tokens[k].weight.detach().float().numpy())
        e = g.node("Gather", [table, split[k]], f"{_P}/embed_tokens.{k}/Gather")  # (B, 1, S, d)
        x = e if x is None else g.node("Add", [x, e], f"{_P}/Add_embed_{k}")
    x = g.node("Squeeze", [x, g.const("axis1", [1], np.int64)], f"{_P}/Squeeze")  # (B, S, d)
    if dec.embed_scale != 1.0:
        x = g.node("Mul", [x, g.const("embed_scale", dec.embed_scale, np.float32)], f"{_P}/Mul_embed_scale")

    # sinusoidal positions past .. past + S - 1, computed as MusicgenSinusoidalPositionalEmbedding does
    pe = f"{_P}/embed_positions"
    half = d.hidden // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1))).numpy()
    total = g.node("Cast", ["total_sequence_length"], f"{pe}/Cast", to=T.INT64)
    s = g.node("Squeeze", [seq], f"{pe}/Squeeze")
    past = g.node("Sub", [total, s], f"{pe}/Sub")
    pos = g.node("Range", [past, total, g.const("one", 1, np.int64)], f"{pe}/Range")
    pos = g.node("Cast", [pos], f"{pe}/Cast_1", to=T.FLOAT)
    pos = g.node("Unsqueeze", [pos, g.const("axes_last", [-1], np.int64)], f"{pe}/Unsqueeze")
    ang = g.node("Mul", [pos, g.init("embed_positions.inv_freq", freq.astype(np.float32))], f"{pe}/Mul")
    emb = g.node("Concat", [g.node("Cos", [ang], f"{pe}/Cos"), g.node("Sin", [ang], f"{pe}/Sin")], f"{pe}/Concat", axis=1)
    x = g.node("Add", [x, emb], f"{_P}/Add")

    mask = g.node("Cast", ["encoder_attention_mask"], f"{_P}/Cast", to=T.INT32)
    scale = float(d.head_dim**-0.5)
    act = ["batch_size", "sequence_length", d.hidden]
    for i in range(d.layers):
        layer = dec.layers[i]
        base = f"decoder.model.decoder.layers.{i}"
        path = _scope_path(base)
        # self-attention with the cache written in place
        h = _ln(g, x, layer.self_attn_layer_norm, f"{base}.self_attn_layer_norm")
        q, k, v = (_linear(g, h, getattr(layer.self_attn, p), f"{base}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj"))
        o = g.node("GroupQueryAttention", [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"],
                   f"{path}/self_attn/GroupQueryAttention", domain="com.microsoft",
                   outputs=[f"{path}/self_attn/GroupQueryAttention_output_0", f"present_key.{i}", f"present_value.{i}"],
                   num_heads=d.heads, kv_num_heads=d.heads, scale=scale)[0]
        g.float_info(o, act)
        x = g.node("Add", [x, _linear(g, o, layer.self_attn.out_proj, f"{base}.self_attn.out_proj")], f"{path}/Add")
        # cross-attention over the precomputed keys and values
        h = _ln(g, x, layer.encoder_attn_layer_norm, f"{base}.encoder_attn_layer_norm")
        q = _linear(g, h, layer.encoder_attn.q_proj, f"{base}.encoder_attn.q_proj")
        o = g.node("MultiHeadAttention", [q, f"cross_key.{i}", f"cross_value.{i}", "", mask],
                   f"{path}/encoder_attn/MultiHeadAttention", domain="com.microsoft", num_heads=d.heads, scale=scale)
        g.float_info(o, act)
        x = g.node("Add", [x, _linear(g, o, layer.encoder_attn.out_proj, f"{base}.encoder_attn.out_proj")], f"{path}/Add_1")
        # feed-forward
        h = _ln(g, x, layer.final_layer_norm, f"{base}.final_layer_norm")
        h = g.node("Gelu", [_linear(g, h, layer.fc1, f"{base}.fc1")], f"{path}/activation_fn/Gelu")
        x = g.node("Add", [x, _linear(g, h, layer.fc2, f"{base}.fc2")], f"{path}/Add_2")
    for name in cache_names(d.layers, "present"):
        g.outputs.append(_io(name, T.FLOAT, ["batch_size", d.heads, "max_sequence_length", d.head_dim]))
    x = _ln(g, x, dec.layer_norm, "decoder.model.decoder.layer_norm")

    # one head per codebook, stacked to (B, K, S, V), then (B*K, S, V) as transformers returns it
    heads = []
    for k in range(d.codebooks):
        y = _linear(g, x, model.decoder.lm_heads[k], f"decoder.lm_heads.{k}")
        heads.append(g.node("Unsqueeze", [y, g.const("axis1", [1], np.int64)], f"/decoder/Unsqueeze_{k}"))
    y = g.node("Concat", heads, "/decoder/Concat", axis=1)
    out_shape = g.node("Concat", [g.const("minus1", [-1], np.int64), seq, g.const("vocab", [d.vocab], np.int64)],
                       "/decoder/Concat_1", axis=0)
    g.node("Reshape", [y, out_shape], "/decoder/Reshape", outputs=["logits"])
    g.outputs.insert(0, _io("logits", T.FLOAT, ["batch_size_x_codebooks", "sequence_length", d.vocab]))
    return g.model()


def check_inplace_plan(model, plan: Any) -> None:
    """Refuse a plan the in-place graphs cannot carry: fp16 (or bf16) anywhere in the decoder.

    ``GroupQueryAttention`` and ``MultiHeadAttention`` take one float type for all their inputs, and
    ONNX Runtime's fp16 converter wraps contrib ops in casts it cannot type; fp16 matrix products are
    also 3x slower than fp32 on x86 CPUs (docs/device.md). int8 and int4 weights are supported.
    """
    if plan == "fp32" or plan is None:
        return
    names = [n for n, _ in model.named_modules() if n == "enc_to_dec_proj" or n.startswith("decoder.") or n == "decoder"]
    resolved = dict(plan.resolve(names)) if names else {}
    resolved["(default)"] = getattr(plan, "default", "fp32")
    bad = sorted({m for m, dt in resolved.items() if dt in ("fp16", "bf16") and (m != "(default)" or not names)})
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise bad_value(InplaceDecoderError, "plan", f"{bad[0]} -> {resolved[bad[0]]}{more}",
                        "int8, int4 or fp32 for every decoder module when decoder='inplace' (its attention ops run "
                        "fp32 here; fp16 is not supported)", "give the decoder int8/int4/fp32, or use decoder='merged'")


# ------------------------------------------------------------------------------ PyTorch references


class CrossKVReference(nn.Module):
    """transformers' cross-attention keys and values: the present encoder cache of the first step."""

    def __init__(self, model):
        super().__init__()
        self.step = DecoderStep(model, with_past=False)
        self.codebooks = model.decoder.config.num_codebooks
        self.bos = model.decoder.config.bos_token_id

    def forward(self, encoder_hidden_states, encoder_attention_mask):
        ids = torch.full((encoder_hidden_states.shape[0] * self.codebooks, 1), self.bos, dtype=torch.long)
        out = self.step(ids, encoder_hidden_states, encoder_attention_mask)
        cache = out[1:]
        return tuple(t for i in range(len(cache) // 4) for t in (cache[4 * i + 2], cache[4 * i + 3]))


class StepReference(nn.Module):
    """transformers' decoder on the ``decoder_step`` graph's inputs (the plain reference of the graph).

    Takes the graph's inputs in order; slices the valid ``past`` positions out of the buffers, runs
    ``DecoderStep`` (with the cross keys and values as the encoder cache and a zeros tensor of the
    right shape as encoder states, which the cached step ignores but must receive; an empty past is a
    self-attention cache of length 0, so the same call makes the first step), and returns the
    logits and the buffers with the new positions written, as the graph does.
    """

    def __init__(self, model):
        super().__init__()
        self.with_past = DecoderStep(model, with_past=True)
        self.layers = model.decoder.config.num_hidden_layers
        self.text_hidden = model.text_encoder.config.hidden_size

    def forward(self, input_ids, encoder_attention_mask, *rest):
        n = self.layers
        cross, past = rest[: 2 * n], rest[2 * n : 4 * n]
        total = int(rest[4 * n + 1])
        s = input_ids.shape[1]
        p = total - s
        b, length = encoder_attention_mask.shape
        states = torch.zeros(b, length, self.text_hidden)
        cache = []
        for i in range(n):
            cache += [past[2 * i][:, :, :p], past[2 * i + 1][:, :, :p], cross[2 * i], cross[2 * i + 1]]
        out = self.with_past(input_ids, states, encoder_attention_mask, *cache)
        return self._pack(out, past, total)

    def _pack(self, out, past, total):
        logits, cache = out[0], out[1:]
        presents = []
        for i in range(self.layers):
            for j in (0, 1):
                buf = past[2 * i + j].clone()
                buf[:, :, :total] = cache[4 * i + j]
                presents.append(buf)
        return (logits, *presents)


def step_feed(model, cross: list[torch.Tensor], *, batch: int, text_len: int, past_len: int, seq: int, max_len: int,
              seed: int = 0) -> OrderedDict:
    """Inputs of ``decoder_step`` in graph order: random codes, a guidance mask (the second half of the
    ``2 * batch`` rows fully masked, one padded position in the first row), ``cross`` keys and values
    (from ``CrossKVReference`` on the same mask), random past keys/values at ``[0, past_len)`` of
    buffers ``max_len`` long (zeros beyond)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.decoder.config
    rows, heads, hd = 2 * batch, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    feed: OrderedDict = OrderedDict()
    feed["input_ids"] = torch.randint(0, cfg.vocab_size, (rows * cfg.num_codebooks, seq), generator=gen)
    feed["encoder_attention_mask"] = guidance_mask(batch, text_len)
    for name, t in zip(cross_kv_names(cfg.num_hidden_layers), cross):
        feed[name] = t
    for name in cache_names(cfg.num_hidden_layers, "past"):
        buf = torch.zeros(rows, heads, max_len, hd)
        buf[:, :, :past_len] = torch.randn(rows, heads, past_len, hd, generator=gen)
        feed[name] = buf
    total = past_len + seq
    feed["seqlens_k"] = torch.full((rows,), total - 1, dtype=torch.int32)
    feed["total_sequence_length"] = torch.tensor(total, dtype=torch.int32)
    return feed


def guidance_mask(batch: int, text_len: int) -> torch.Tensor:
    """Encoder mask of a guidance batch: ``batch`` prompts (the first with its last position padded
    when ``text_len > 1``), then ``batch`` unconditional rows that are fully masked."""
    mask = torch.ones(2 * batch, text_len, dtype=torch.long)
    mask[batch:] = 0
    if text_len > 1:
        mask[0, -1] = 0
    return mask


def cross_feed(model, *, batch: int, text_len: int, seed: int = 0) -> OrderedDict:
    """Inputs of ``cross_kv``: random encoder states of a guidance batch (unconditional rows zero, as
    the runtime builds them) and ``guidance_mask``."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(2 * batch, text_len, model.text_encoder.config.hidden_size, generator=gen)
    states[batch:] = 0
    return OrderedDict(encoder_hidden_states=states, encoder_attention_mask=guidance_mask(batch, text_len))


def validation_sets(model, *, seed: int = 20) -> list[OrderedDict]:
    """Feeds of ``decoder_step`` (reference: ``StepReference``): first steps (S = 1 and S = 3, empty past) and cached
    steps with pasts of 1, 5 and 8 positions, guidance batches of 1 and 2 prompts."""
    sets = []
    for j, (batch, text_len, past_len, seq, max_len) in enumerate(
            [(1, 5, 0, 1, 6), (2, 4, 0, 3, 7), (1, 5, 1, 1, 4), (2, 6, 5, 1, 9), (1, 3, 8, 1, 9)]):
        cf = cross_feed(model, batch=batch, text_len=text_len, seed=seed + j)
        with torch.no_grad():
            cross = list(CrossKVReference(model).eval()(*cf.values()))
        feed = step_feed(model, cross, batch=batch, text_len=text_len, past_len=past_len, seq=seq, max_len=max_len,
                         seed=seed + 10 + j)
        sets.append(feed)
    return sets


def cross_validation_sets(model, *, seed: int = 40) -> list[OrderedDict]:
    """Feeds of ``cross_kv`` (reference: ``CrossKVReference``): guidance batches of 1 and 2 prompts."""
    return [cross_feed(model, batch=b, text_len=n, seed=seed + j) for j, (b, n) in enumerate([(1, 5), (2, 7)])]


def reference(model, graph: str) -> nn.Module:
    """The PyTorch reference of ``cross_kv`` or ``decoder_step`` (in eval mode)."""
    return (CrossKVReference(model) if graph == "cross_kv" else StepReference(model)).eval()


def graph_outputs(model, graph: str) -> list[str]:
    """Output names of ``cross_kv`` or ``decoder_step``."""
    n = model.decoder.config.num_hidden_layers
    return cross_kv_names(n) if graph == "cross_kv" else ["logits", *cache_names(n, "present")]


BUILDERS = {"cross_kv": build_cross_kv, "decoder_step": build_decoder_step}
__all__ = ["INPLACE_GRAPHS", "BUILDERS", "InplaceDecoderError", "DecoderDims", "build_cross_kv", "build_decoder_step",
           "check_inplace_plan", "validation_sets", "cross_validation_sets", "graph_outputs", "reference", "export_inplace"]


# ------------------------------------------------------------------------------ export


def export_inplace(model, onnx_dir, plan: Any = "fp32", *, atol: float = 1e-4, int4_block_size: int = 32) -> dict[str, dict]:
    """Build, convert per ``plan``, save and validate ``cross_kv`` and ``decoder_step`` in ``onnx_dir``.

    Each graph is written as ``<name><suffix>.onnx`` (the suffix of the dtype holding most of its weight
    bytes, as ``bundle.parts.part_file`` names the other parts), then checked against PyTorch on
    ``cross_validation_sets``/``validation_sets`` (other batch sizes, text lengths, pasts of 0 to 8
    positions, one new position or three on an empty past): strict (``atol``) when all its weights
    are fp32, else measured (max difference and SNR, ``kdq.export.onnx_export.compare_onnx``).

    Returns, per graph, the report entry: ``file`` (relative to the bundle), ``dtype``, ``bytes``,
    ``nodes``, ``parity``, ``parity_kind`` and, with a plan, ``planned_weight_bytes_fp32`` and
    ``conformance``.
    """
    from pathlib import Path

    import onnx

    from kdq.dtypes import TABLE
    from kdq.export.atomic import save_onnx_atomic
    from kdq.export.onnx_export import compare_onnx, validate_onnx
    from kdq.export.precision import apply_plan_onnx, planned_weight_bytes
    from musicgen.bundle.parts import SUFFIX

    check_inplace_plan(model, plan)
    onnx_dir = Path(onnx_dir)
    module_names = [n for n, _ in model.named_modules()]
    out: dict[str, dict] = {}
    for name in INPLACE_GRAPHS:
        graph = BUILDERS[name](model)
        entry: dict[str, Any] = {}
        variant = "fp32"
        if plan != "fp32":
            planned = planned_weight_bytes(graph, plan, module_names)
            variant = max(planned, key=lambda dt: (planned[dt], -TABLE[dt].bits)) if planned else "fp32"
            graph, rep = apply_plan_onnx(graph, plan, module_names, int4_block_size=int4_block_size)
            entry.update(planned_weight_bytes_fp32=planned, mixed=len(planned) > 1, conformance=rep.to_json())
        path = onnx_dir / f"{name}{SUFFIX[variant]}.onnx"
        save_onnx_atomic(graph, path)
        nodes = len(graph.graph.node)
        del graph
        sets = cross_validation_sets(model) if name == "cross_kv" else validation_sets(model)
        outputs = graph_outputs(model, name)
        strict = set(entry.get("planned_weight_bytes_fp32", {"fp32": 0})) <= {"fp32"}
        ref = reference(model, name)
        if strict:
            parity = validate_onnx(path, ref, sets, output_names=outputs, atol=atol).to_json()
        else:
            parity = {"snr_db_and_max_abs_diff": compare_onnx(path, ref, sets, output_names=outputs)}
        entry = {"file": f"{onnx_dir.name}/{path.name}", "dtype": variant, "bytes": path.stat().st_size, "nodes": nodes,
                 "parity": parity, "parity_kind": f"strict atol={atol:g}" if strict else
                 "measured against PyTorch fp32", **entry}
        out[name] = entry
    return out
