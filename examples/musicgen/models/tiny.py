"""Tiny random MusicGens with MusicGen's exact structure, for plumbing tests and examples.

A plain random MusicGen is a poor test subject: EnCodec's codebooks initialise to zeros (so every code
decodes to the same audio) and token embeddings are so small that the decoder's output barely depends
on its input. ``build_tiny_musicgen(informative=True)`` fixes both, so that audio really depends on
codes and codes on the prompt, and a parity check between two implementations proves something.

Real checkpoints load through the ordinary ``MusicgenForConditionalGeneration.from_pretrained``;
nothing here is needed for them.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Caption words for the tiny tokenizer; real bundles ship the model's own tokenizer.
TINY_WORDS = (
    "a an the and with of in slow fast calm lively gentle bright dark piano organ strings violin "
    "flute guitar choir trumpet harp bass chorale folk tune dance song melody chords major minor "
    "key bach renaissance baroque classical four part solo duet quiet loud happy sad music"
).split()


def tiny_musicgen_config(
    *,
    text_hidden: int = 32,
    text_layers: int = 2,
    text_vocab: int | None = None,
    decoder_hidden: int = 32,
    decoder_layers: int = 2,
    decoder_heads: int = 4,
    codec_filters: int = 4,
    codec_hidden: int = 16,
    codebook_size: int = 2048,
    max_positions: int = 1024,
):
    """A ``MusicgenConfig`` with MusicGen's structure at toy sizes.

    T5 encoder, a 4-codebook decoder with the delay pattern, EnCodec at 32 kHz with upsampling
    ratios [8, 5, 4, 4] (50 frames per second) and 4 residual codebooks (target bandwidth 2.2 kbps).
    """
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    vocab = text_vocab if text_vocab is not None else len(TINY_WORDS) + 3
    t5 = T5Config(
        vocab_size=vocab,
        d_model=text_hidden,
        d_kv=max(8, text_hidden // 4),
        d_ff=2 * text_hidden,
        num_layers=text_layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
    )
    codec = EncodecConfig(
        sampling_rate=32000,
        num_filters=codec_filters,
        hidden_size=codec_hidden,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        codebook_size=codebook_size,
        num_lstm_layers=1,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=codebook_size,
        hidden_size=decoder_hidden,
        num_hidden_layers=decoder_layers,
        num_attention_heads=decoder_heads,
        ffn_dim=2 * decoder_hidden,
        num_codebooks=4,
        max_position_embeddings=max_positions,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
        dropout=0.0,
    )
    # Passing dicts works on transformers 4.5x and 5.x (4.57 rejects config objects here).
    return MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())


@torch.no_grad()
def make_informative(model, *, seed: int = 0, codebook_scale: float = 30.0, embedding_scale: float = 20.0) -> None:
    """Give a random MusicGen codes that matter (in place).

    Sets EnCodec's codebooks to large random vectors (they initialise to zeros, and at unit scale the
    random decoder's biases drown them) and scales the decoder's token embeddings so its logits
    depend on the previous codes, not only on positions.
    """
    g = torch.Generator().manual_seed(seed)
    for layer in model.audio_encoder.quantizer.layers:
        embed = layer.codebook.embed
        embed.copy_(codebook_scale * torch.randn(embed.shape, generator=g))
        layer.codebook.embed_avg.copy_(embed)
        layer.codebook.cluster_size.fill_(1.0)
    for emb in model.decoder.model.decoder.embed_tokens:
        emb.weight.mul_(embedding_scale)


def build_tiny_musicgen(seed: int = 0, *, informative: bool = True, **sizes):
    """A tiny random ``MusicgenForConditionalGeneration`` in eval mode (see ``tiny_musicgen_config``)."""
    from transformers import MusicgenForConditionalGeneration

    from musicgen.models.musicgen import set_generation_defaults

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(tiny_musicgen_config(**sizes)).eval()
    if informative:
        make_informative(model, seed=seed)
    set_generation_defaults(model)
    return model


def build_word_tokenizer(words=TINY_WORDS):
    """A T5-style word-level tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2), appends ``</s>``.

    Trained-free and offline; saves the standard ``tokenizer.json``/``tokenizer_config.json`` files
    that ``AutoTokenizer.from_pretrained`` and transformers.js load.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(words)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )


def save_tiny_musicgen(out_dir: str | Path, seed: int = 0, **sizes) -> Path:
    """Build a tiny informative MusicGen and save it with its tokenizer as a ``from_pretrained`` folder."""
    out = Path(out_dir)
    model = build_tiny_musicgen(seed, **sizes)
    model.save_pretrained(out)
    build_word_tokenizer().save_pretrained(out)
    return out
