"""The three MusicGen graphs as exportable modules, and their ONNX I/O contract.

Layout and I/O names follow the established MusicGen ONNX layout (optimum, transformers.js):

- ``text_encoder``: ``input_ids``, ``attention_mask`` (batch, text_len) -> ``last_hidden_state``.
- ``decoder_model`` / ``decoder_with_past_model`` (merged into ``decoder_model_merged``):
  ``input_ids`` (2B*K, seq) with CFG, ``encoder_hidden_states`` (2B, text_len, text_hidden),
  ``encoder_attention_mask`` (2B, text_len), ``past_key_values.{i}.{decoder,encoder}.{key,value}``
  (2B, heads, len, head_dim) -> ``logits`` (2B*K, seq, vocab), ``present.*``.
  The decoder graph includes ``enc_to_dec_proj`` (when MusicGen uses it) and the multiplication of the
  encoder states by the attention mask, exactly as ``MusicgenForConditionalGeneration.forward``.
- ``encodec_decode``: ``audio_codes`` (1, B, K, frames) -> ``audio_values`` (B, channels, samples).

Wrapper attribute names equal the model's (``text_encoder``, ``decoder``, ``enc_to_dec_proj``,
``audio_encoder``), so ONNX node scopes name the same modules as ``model.named_modules()`` and a plan
written against the PyTorch model applies to the graphs unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def cache_kwarg(decoder: nn.Module) -> str:
    """Name of the KV-cache keyword: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def make_cache(layers: list[tuple[torch.Tensor, ...]] | None):
    """An ``EncoderDecoderCache`` from per-layer (self_k, self_v, cross_k, cross_v), or an empty one."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if not layers:
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    if hasattr(EncoderDecoderCache, "from_legacy_cache"):  # transformers 4.5x
        return EncoderDecoderCache.from_legacy_cache(tuple(layers))
    return EncoderDecoderCache(tuple(layers))  # 5.x: the per-layer tuple form


def cache_tensors(cache) -> list[torch.Tensor]:
    """Flatten a cache to [self_k, self_v, cross_k, cross_v] per layer."""
    if isinstance(cache, tuple):
        return [t for layer in cache for t in layer[:4]]
    out = []
    self_c, cross_c = cache.self_attention_cache, cache.cross_attention_cache
    if hasattr(self_c, "layers"):
        for s, c in zip(self_c.layers, cross_c.layers):
            out += [s.keys, s.values, c.keys, c.values]
    else:  # pragma: no cover - transformers 4.5x
        for s, c in zip(self_c.to_legacy_cache(), cross_c.to_legacy_cache()):
            out += [s[0], s[1], c[0], c[1]]
    return out


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.decoder.key`` ... in (self key, self value, cross key, cross value) order."""
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(num_layers) for part in ("decoder", "encoder") for kv in ("key", "value")]


class TextEncoder(nn.Module):
    """T5 encoder: ``(input_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self, model):
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, input_ids, attention_mask):
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderStep(nn.Module):
    """One decoder call with a KV cache: the first step (``with_past=False``) or a cached step."""

    def __init__(self, model, *, with_past: bool):
        super().__init__()
        self.decoder = model.decoder
        self.with_past = with_past
        self.project = (
            model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
            and model.decoder.config.cross_attention_hidden_size is None
        )
        self.enc_to_dec_proj = model.enc_to_dec_proj if self.project else None
        self.num_layers = model.decoder.config.num_hidden_layers
        self.cache_kw = cache_kwarg(model.decoder)

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        hidden = self.enc_to_dec_proj(encoder_hidden_states) if self.project else encoder_hidden_states
        hidden = hidden * encoder_attention_mask[..., None].to(hidden.dtype)
        layers = [tuple(past[4 * i : 4 * i + 4]) for i in range(self.num_layers)] if self.with_past else None
        out = self.decoder(
            input_ids=input_ids,
            encoder_hidden_states=hidden,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=True,
            return_dict=True,
            **{self.cache_kw: make_cache(layers)},
        )
        cache = getattr(out, "cache", None)
        if cache is None:  # transformers 4.5x
            cache = out.past_key_values
        return (out.logits, *cache_tensors(cache))


class EncodecDecode(nn.Module):
    """EnCodec decoder: ``audio_codes (1, B, K, frames) -> audio_values (B, channels, samples)``."""

    def __init__(self, model):
        super().__init__()
        self.audio_encoder = model.audio_encoder

    def forward(self, audio_codes):
        return self.audio_encoder.decode(audio_codes, [None]).audio_values


# --------------------------------------------------------------------------------- the bundle layout

#: The bundle's three parts, in generation order.
PARTS = ("text_encoder", "decoder_model_merged", "encodec_decode")
#: File-name suffix of each dtype variant, as transformers.js names them (``NAME_quantized.onnx``: int8).
SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_quantized", "int4": "_q4"}
#: transformers.js's name of each dtype (``config.json["transformers.js_config"]["dtype"]``).
TJS_DTYPE = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}
_FROM_TJS = {v: k for k, v in TJS_DTYPE.items()}
#: ``config.json`` key listing the in-place decoder's graphs (``musicgen.bundle.fast_decoder``): name ->
#: ``{"file": "onnx/decoder_step_q4.onnx", "dtype": "int4"}``.
INPLACE_KEY = "kdq_inplace_decoder"


def plan_dtype(name: str) -> str:
    """A plan dtype name from either a plan name (``int8``) or a transformers.js name (``q8``)."""
    return _FROM_TJS.get(name, name)


def part_file(part: str, dtype: str, ext: str = ".onnx") -> str:
    """``onnx/<part><suffix><ext>`` for a part stored in ``dtype`` (plan or transformers.js name)."""
    return f"onnx/{part}{SUFFIX[plan_dtype(dtype)]}{ext}"


def _decoder_example(model, *, batch: int, text_len: int, past_len: int, seq: int, with_past: bool, seed: int = 0,
                     empty_past: bool = False) -> dict[str, torch.Tensor]:
    """Decoder feeds with a CFG batch ``2*batch`` (the second half unconditional, one padded text
    position); a KV cache of ``past_len`` (``empty_past``: length 0) when ``with_past``."""
    g = torch.Generator().manual_seed(seed)
    dec = model.decoder.config
    b2, heads = 2 * batch, dec.num_attention_heads
    feed: dict[str, torch.Tensor] = {
        "input_ids": torch.randint(0, dec.vocab_size, (b2 * dec.num_codebooks, seq), generator=g),
        "encoder_hidden_states": torch.randn(b2, text_len, model.text_encoder.config.hidden_size, generator=g),
        "encoder_attention_mask": torch.ones(b2, text_len, dtype=torch.long),
    }
    feed["encoder_attention_mask"][batch:] = 0
    feed["encoder_attention_mask"][0, -1] = 0
    if with_past:
        for name in kv_names(dec.num_hidden_layers, "past_key_values"):
            length = 0 if empty_past else (past_len if ".decoder." in name else text_len)
            feed[name] = torch.randn(b2, heads, length, dec.hidden_size // heads, generator=g)
    return feed


def _text_example(model, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.text_encoder.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, length - 2 :] = 0 if batch > 2 else 1  # a padded prompt in the larger check
    return {"input_ids": ids, "attention_mask": mask}


def _codes_example(model, batch: int, frames: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size, k = model.audio_encoder.config.codebook_size, model.decoder.config.num_codebooks
    return {"audio_codes": torch.randint(0, size, (1, batch, k, frames), generator=g)}


def _decoder_axes(model, *, with_past: bool) -> dict[str, dict[int, str]]:
    n = model.decoder.config.num_hidden_layers
    axes = {"input_ids": {0: "batch_size_x_codebooks", 1: "decoder_sequence_length"},
            "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
            "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
            "logits": {0: "batch_size_x_codebooks", 1: "decoder_sequence_length"}}
    for name in kv_names(n, "present"):
        axes[name] = {0: "batch_size", 2: "present_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length_out"}
    if with_past:  # self- and cross-attention cache lengths need different axis names
        for name in kv_names(n, "past_key_values"):
            axes[name] = {0: "batch_size", 2: "past_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length_out"}
    return axes


@dataclass(frozen=True)
class Graph:
    """One exported graph: how to wrap the model, name its I/O and make example inputs.

    ``example`` is the export input; ``checks`` are validation inputs of *other* shapes (a baked-in
    axis shows up there); ``scope`` is the module the graph's node scopes are relative to, and
    ``roots`` the modules its nodes may belong to (anything else is an export bug).
    """

    name: str
    part: str
    wrap: Callable[[Any], nn.Module]
    outputs: Callable[[Any], list[str]]
    axes: Callable[[Any], dict[str, dict[int, str]]]
    example: Callable[[Any], dict[str, torch.Tensor]]
    checks: Callable[[Any], list[dict[str, torch.Tensor]]]
    scope: str = ""
    roots: tuple[str, ...] = ("",)


def _dec_outputs(model) -> list[str]:
    return ["logits", *kv_names(model.decoder.config.num_hidden_layers, "present")]


GRAPHS: tuple[Graph, ...] = (
    Graph("text_encoder", "text_encoder", TextEncoder, lambda m: ["last_hidden_state"],
          lambda m: {n: {0: "batch_size", 1: "encoder_sequence_length"} for n in ("input_ids", "attention_mask", "last_hidden_state")},
          lambda m: _text_example(m, 2, 5, 0), lambda m: [_text_example(m, 3, 7, 1)], roots=("text_encoder", "")),
    Graph("decoder_model", "decoder_model_merged", lambda m: DecoderStep(m, with_past=False), _dec_outputs,
          lambda m: _decoder_axes(m, with_past=False),
          lambda m: _decoder_example(m, batch=1, text_len=5, past_len=0, seq=2, with_past=False),
          lambda m: [_decoder_example(m, batch=2, text_len=6, past_len=0, seq=3, with_past=False, seed=1),
                     _decoder_example(m, batch=1, text_len=4, past_len=0, seq=1, with_past=False, seed=2)],
          roots=("decoder", "enc_to_dec_proj", "")),
    Graph("decoder_with_past_model", "decoder_model_merged", lambda m: DecoderStep(m, with_past=True), _dec_outputs,
          lambda m: _decoder_axes(m, with_past=True),
          lambda m: _decoder_example(m, batch=1, text_len=5, past_len=3, seq=1, with_past=True),
          lambda m: [_decoder_example(m, batch=2, text_len=6, past_len=7, seq=1, with_past=True, seed=3),
                     _decoder_example(m, batch=1, text_len=4, past_len=1, seq=1, with_past=True, seed=4)],
          roots=("decoder", "enc_to_dec_proj", "")),
    Graph("encodec_decode", "encodec_decode", EncodecDecode, lambda m: ["audio_values"],
          lambda m: {"audio_codes": {1: "batch_size", 3: "chunk_length"}, "audio_values": {0: "batch_size", 2: "num_samples"}},
          lambda m: _codes_example(m, 1, 12, 0), lambda m: [_codes_example(m, 2, 9, 1)],
          scope="audio_encoder", roots=("audio_encoder", "")),
)


def merged_checks(model, *, seed: int = 10) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Validation feeds of the merged decoder: first steps (empty cache) and cached steps."""
    out = []
    for j, (batch, text_len, seq) in enumerate([(2, 6, 3), (1, 3, 1)]):
        feed = _decoder_example(model, batch=batch, text_len=text_len, past_len=0, seq=seq, with_past=True,
                                seed=seed + j, empty_past=True)
        out.append(("first_step", {**feed, "use_cache_branch": torch.tensor([False])}))
    for j, (batch, text_len, past_len) in enumerate([(2, 6, 5), (1, 3, 1)]):
        feed = _decoder_example(model, batch=batch, text_len=text_len, past_len=past_len, seq=1, with_past=True,
                                seed=seed + 5 + j)
        out.append(("cached_step", {**feed, "use_cache_branch": torch.tensor([True])}))
    return out
