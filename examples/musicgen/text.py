"""Caption tokenizer and a small frozen T5 encoder for the mini world.

The tokenizer is a word-level model trained offline with ``tokenizers`` on the training captions
(T5's special ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2; ``</s>`` appended), saved as
``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained`` and
transformers.js load it.

The text encoder is a ``T5EncoderModel``. Real MusicGen freezes a T5 pretrained on web text; no such
checkpoint can be downloaded here, so the encoder is pretrained on the captions themselves for
``pretrain_steps`` steps of masked-word prediction (15% of words replaced by ``<unk>``, a linear head
predicts them; the head is thrown away) and then frozen. With ``pretrain_steps=0`` it stays a random,
frozen feature map (still deterministic and caption-dependent). Either way it is frozen while the
decoders train, as in MusicGen.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SPECIALS = ("<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class TextConfig:
    """T5 encoder size and its caption pretraining (plain data; keys the stage cache)."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    max_length: int = 32
    pretrain_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    mask_prob: float = 0.15
    seed: int = 0

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


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


def t5_config(cfg: TextConfig, vocab_size: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_text_encoder(cfg: TextConfig, captions: list[str], out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train the tokenizer, pretrain then freeze a T5 encoder; save both to ``out_dir``; return figures."""
    from tqdm import tqdm
    from transformers import T5EncoderModel

    t0 = time.time()
    out_dir = Path(out_dir)
    tok = train_tokenizer(captions, max_length=cfg.max_length)
    torch.manual_seed(cfg.seed)
    model = T5EncoderModel(t5_config(cfg, len(tok)))
    batch = tok(sorted(set(captions)), padding=True, truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    head = torch.nn.Linear(cfg.d_model, len(tok))
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    curve = []
    model.train()
    for step in tqdm(range(cfg.pretrain_steps), desc="text", disable=not progress):
        pick = torch.randint(len(ids), (cfg.batch_size,), generator=g)
        x, m = ids[pick], mask[pick]
        hide = (torch.rand(x.shape, generator=g) < cfg.mask_prob) & (x > 2)
        hide[hide.sum(1) == 0, 0] = x[hide.sum(1) == 0, 0] > 2  # at least one target where possible
        inp = x.masked_fill(hide, 2)
        h = model(input_ids=inp, attention_mask=m).last_hidden_state
        loss = F.cross_entropy(head(h[hide]), x[hide]) if hide.any() else h.sum() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            curve.append({"step": step + 1, "masked_word_ce": round(float(loss), 4)})
    model.eval().requires_grad_(False)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {
        "vocab_size": len(tok),
        "distinct_captions": int(len(ids)),
        "max_tokens": int(mask.sum(1).max()),
        "params": sum(p.numel() for p in model.parameters()),
        "pretrain_curve": curve,
        "seconds": round(time.time() - t0, 1),
    }


def load_text(out_dir: str | Path):
    """(tokenizer, frozen ``T5EncoderModel`` in eval mode) from a folder written by ``build_text_encoder``."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    model = T5EncoderModel.from_pretrained(str(out_dir)).eval().requires_grad_(False)
    return tok, model
