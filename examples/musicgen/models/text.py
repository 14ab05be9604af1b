"""Caption tokenizer and a small T5 encoder for the mini world.

The tokenizer is a word-level model trained offline with ``tokenizers`` on the training captions
(T5's special ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2; ``</s>`` appended), saved as
``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained`` and
transformers.js load it.

The text encoder is a ``T5EncoderModel``. Real MusicGen freezes a T5 pretrained on web text; no such
checkpoint can be downloaded here, so the encoder is pretrained on the captions themselves by
masked-word prediction (``musicgen.train.objectives.MaskedWordObjective``) and then frozen, as in
MusicGen, while the decoders train.
"""

from __future__ import annotations

from pathlib import Path

import torch

from musicgen.config import TextConfig

SPECIALS = ("<pad>", "</s>", "<unk>")


def train_tokenizer(captions: list[str], *, max_length: int = 32):
    """A word-level ``PreTrainedTokenizerFast`` trained on ``captions`` (lower-cased, punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_text_encoder(cfg: TextConfig, vocab_size: int, *, seed: int = 0):
    """A freshly initialised ``T5EncoderModel`` of ``cfg``'s size."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def load_text(folder: str | Path):
    """(tokenizer, frozen ``T5EncoderModel`` in eval mode) from a saved text-encoder folder."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = T5EncoderModel.from_pretrained(str(folder), use_safetensors=True).eval().requires_grad_(False)
    return tok, model
