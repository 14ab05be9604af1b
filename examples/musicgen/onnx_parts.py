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
