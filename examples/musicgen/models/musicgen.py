"""MusicGen models: load a checkpoint (hub id or folder), or build one around a trained codec and text encoder.

``load_musicgen`` is the only loader the example uses: safetensors only (``use_safetensors=True``),
eval mode, and small models cached in memory (handed out as fresh copies, so a caller may convert
or train its copy). ``load_tokenizer`` loads the caption tokenizer saved next to it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from musicgen.config import DecoderConfig

_CACHE: dict[str, Any] = {}
_CACHE_MAX_PARAMS = 50_000_000


def _stamp(path: str | Path) -> str:
    weights = Path(path) / "model.safetensors"
    return f"{path}:{weights.stat().st_mtime_ns if weights.exists() else ''}"


def load_musicgen(path: str | Path):
    """``MusicgenForConditionalGeneration.from_pretrained`` (safetensors only) in eval mode."""
    from transformers import MusicgenForConditionalGeneration

    key = _stamp(path)
    if key in _CACHE:
        return copy.deepcopy(_CACHE[key])
    model = MusicgenForConditionalGeneration.from_pretrained(str(path), use_safetensors=True).eval()
    if sum(p.numel() for p in model.parameters()) <= _CACHE_MAX_PARAMS:
        _CACHE[key] = copy.deepcopy(model)
    return model


def load_tokenizer(path: str | Path):
    """The caption tokenizer saved with a model (``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def build_musicgen(text_dir: str | Path, codec_dir: str | Path, dec: DecoderConfig, *, seed: int = 0,
                   max_positions: int = 512):
    """A ``MusicgenForConditionalGeneration`` with the saved T5 encoder and codec and a fresh decoder.

    Text encoder and codec are frozen (as in MusicGen training); ``generation_config`` follows the
    hub checkpoints' (guidance 3, top-k 250 as in audiocraft, sampling).
    """
    from transformers import (EncodecModel, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5EncoderModel)

    t5 = T5EncoderModel.from_pretrained(str(text_dir), use_safetensors=True)
    codec = EncodecModel.from_pretrained(str(codec_dir), use_safetensors=True)
    k = codec.config.codebook_size
    n_q = codec.quantizer.get_num_quantizers_for_bandwidth(codec.config.target_bandwidths[-1])
    decoder = MusicgenDecoderConfig(
        vocab_size=k, hidden_size=dec.hidden, num_hidden_layers=dec.layers, num_attention_heads=dec.heads,
        ffn_dim=dec.ffn, num_codebooks=n_q, max_position_embeddings=max_positions, pad_token_id=k,
        bos_token_id=k, dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
    )
    config = MusicgenConfig(text_encoder=t5.config.to_dict(), audio_encoder=codec.config.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config)
    model.text_encoder.load_state_dict(t5.state_dict())
    model.audio_encoder.load_state_dict(codec.state_dict())
    model.freeze_text_encoder()
    model.freeze_audio_encoder()
    set_generation_defaults(model)
    return model


def set_generation_defaults(model) -> None:
    """MusicGen's generation settings on ``model.generation_config`` (sampling, top-k 250, guidance 3)."""
    gc = model.generation_config
    gc.decoder_start_token_id = model.config.decoder.bos_token_id
    gc.pad_token_id = model.config.decoder.pad_token_id
    gc.guidance_scale = 3.0
    gc.do_sample = True
    gc.top_k = 250
    gc.max_length = 256


def decoder_params(model) -> int:
    """Parameters of the decoder (what differs between teacher and student)."""
    return sum(p.numel() for p in model.decoder.parameters())


def trainable_decoder(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the decoder and the text-to-decoder projection; return what trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, p in model.named_parameters():
        if name.startswith(("decoder.", "enc_to_dec_proj.")):
            p.requires_grad_(True)
            names.append((name, p))
    return names
