"""MusicGen teacher and student on the mini world: data, delay pattern, loss, training loop, evaluation.

The generic pieces are meant for reuse by the distillation stage:

* ``TokenDataset``: (caption token ids, attention mask, codec codes) tensors, saved as safetensors.
* ``delay_pattern`` / ``delayed_batch``: MusicGen's delay pattern. For codes ``c`` of shape (K, T) the
  delayed sequence ``s`` has length ``T + K``; ``s[k, k + 1 + t] = c[k, t]`` and every other position
  holds the pad id (which is also MusicGen's BOS). The decoder reads ``s[:, :-1]`` and is trained to
  predict ``s[:, 1:]`` where a real code sits (the mask); the pads are forced during generation, so
  they carry no loss. Tested against transformers' ``build_delay_pattern_mask``.
* ``decoder_logits``: teacher-forced logits (B, K, S, V) with classifier-free-guidance condition
  dropout (a dropped example gets zero text states and a zero attention mask, exactly what
  ``generate`` feeds the unconditional half).
* ``codebook_ce``: per-codebook mean cross-entropy over the mask, averaged over codebooks (MusicGen).
* ``train_loop``: AdamW, linear warm-up then cosine decay, gradient clipping, atomic resumable
  checkpoints (``musicgen.checkpoint``), a training curve, any loss function of (model, batch).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kdq.errors import KdqError


class LMError(KdqError):
    """A language-model configuration or dataset that cannot be used."""


@dataclass(frozen=True)
class DecoderConfig:
    """Size of a MusicGen decoder (plain data)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe shared by teacher, student and (later) distillation runs."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    clip_norm: float = 1.0
    cfg_dropout: float = 0.1
    crop_frames: int | None = None
    seed: int = 0
    threads: int = 1  # measured: 2 intra-op threads were 5x slower than 1 on the shared, oversubscribed 2 cores
    checkpoint_every: int = 100
    log_every: int = 25

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ---------------------------------------------------------------------------------------------- data
@dataclass
class TokenDataset:
    """Caption tokens and codec codes of one split.

    Attributes:
        input_ids: (N, L) caption token ids (padded with 0).
        attention_mask: (N, L) 1 for real tokens.
        codes: (N, K, T) codec codes.
        captions: N caption strings.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    codes: torch.Tensor
    captions: list

    def __len__(self) -> int:
        return len(self.codes)

    def batch(self, idx: torch.Tensor, *, crop_frames: int | None = None, generator=None) -> dict:
        codes = self.codes[idx].long()
        if crop_frames is not None and crop_frames < codes.shape[-1]:
            start = torch.randint(codes.shape[-1] - crop_frames + 1, (1,), generator=generator).item()
            codes = codes[..., start : start + crop_frames]
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx], "codes": codes}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {"input_ids": self.input_ids.contiguous(), "attention_mask": self.attention_mask.contiguous(),
             "codes": self.codes.to(torch.int16).contiguous()},
            str(tmp), metadata={"captions": json.dumps(self.captions)},
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenDataset:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            captions = json.loads(f.metadata()["captions"])
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return cls(t["input_ids"], t["attention_mask"], t["codes"].long(), captions)


def make_token_dataset(codec, tokenizer, audio: torch.Tensor, captions: list[str], *, max_length: int = 32) -> TokenDataset:
    """Encode clips (N, samples) with the codec and captions with the tokenizer."""
    from musicgen.codec import encode

    if len(audio) != len(captions):
        raise LMError(f"audio has {len(audio)} clips but captions has {len(captions)}; they must pair up")
    codes = encode(codec, audio)
    tok = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TokenDataset(tok["input_ids"], tok["attention_mask"], codes, list(captions))


# ---------------------------------------------------------------------------------------------- delay pattern
def delay_pattern(codes: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """Delayed sequences (B, K, T + K) from codes (B, K, T); see the module docstring."""
    b, k, t = codes.shape
    seq = torch.full((b, k, t + k), pad_id, dtype=torch.long, device=codes.device)
    for i in range(k):
        seq[:, i, i + 1 : i + 1 + t] = codes[:, i]
    return seq


def delayed_batch(codes: torch.Tensor, *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoder_input_ids (B*K, S), labels (B, K, S), mask (B, K, S)) with S = T + K - 1.

    ``labels`` is -100 where ``mask`` is False (delay padding), the usual ignore index.
    """
    b, k, t = codes.shape
    seq = delay_pattern(codes, pad_id=pad_id)
    pos = torch.arange(t + k, device=codes.device)
    valid = (pos[None, :] >= torch.arange(k, device=codes.device)[:, None] + 1) & (
        pos[None, :] <= torch.arange(k, device=codes.device)[:, None] + t
    )
    dec_in = seq[..., :-1].reshape(b * k, t + k - 1)
    mask = valid[None, :, 1:].expand(b, k, t + k - 1)
    return dec_in, seq[..., 1:].masked_fill(~mask, -100), mask


# ---------------------------------------------------------------------------------------------- model
def build_musicgen(text_dir: str | Path, codec_dir: str | Path, dec: DecoderConfig, *, seed: int = 0, max_positions: int = 512):
    """A ``MusicgenForConditionalGeneration`` with the saved T5 encoder and codec, a fresh decoder.

    Text encoder and codec are frozen (as in MusicGen training); ``generation_config`` follows the hub's.
    """
    from transformers import EncodecModel, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(str(text_dir))
    codec = EncodecModel.from_pretrained(str(codec_dir))
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
    gc = model.generation_config
    gc.decoder_start_token_id = k
    gc.pad_token_id = k
    gc.guidance_scale = 3.0
    gc.do_sample = True
    gc.top_k = 250
    gc.max_length = 256
    return model


def decoder_logits(model, batch: dict, *, cfg_dropout: float = 0.0, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits (B, K, S, V), labels (B, K, S) and mask (B, K, S) for a batch.

    With ``cfg_dropout > 0`` each example's condition is dropped with that probability (zero text
    states and attention mask, as in the unconditional half of classifier-free guidance).
    """
    codes = batch["codes"]
    b, k, _ = codes.shape
    pad = model.config.decoder.pad_token_id
    dec_in, labels, mask = delayed_batch(codes, pad_id=pad)
    with torch.no_grad():
        hidden = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    attn = batch["attention_mask"]
    if cfg_dropout > 0:
        keep = (torch.rand(b, generator=generator) >= cfg_dropout).to(hidden.dtype)
        hidden = hidden * keep[:, None, None]
        attn = attn * keep[:, None].to(attn.dtype)
    out = model(encoder_outputs=(hidden,), attention_mask=attn, decoder_input_ids=dec_in)
    logits = out.logits.reshape(b, k, dec_in.shape[-1], -1)
    return logits, labels, mask


def codebook_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over codebooks of the masked mean cross-entropy. Shapes: (B,K,S,V), (B,K,S), (B,K,S)."""
    ce = F.cross_entropy(logits.flatten(0, 2).float(), labels.clamp_min(0).flatten(), reduction="none").view(labels.shape)
    m = mask.to(ce.dtype)
    return ((ce * m).sum((0, 2)) / m.sum((0, 2)).clamp_min(1)).mean()


def ce_loss(model, batch: dict, *, cfg_dropout: float, generator=None) -> tuple[torch.Tensor, dict]:
    """The teacher/student pretraining loss: ``codebook_ce`` with condition dropout."""
    logits, labels, mask = decoder_logits(model, batch, cfg_dropout=cfg_dropout, generator=generator)
    loss = codebook_ce(logits, labels, mask)
    return loss, {"ce": float(loss.detach())}


# ---------------------------------------------------------------------------------------------- training
def lr_at(step: int, *, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / max(1, warmup)
    frac = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def train_loop(
    model,
    data: TokenDataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    loss_fn: Callable | None = None,
    desc: str = "train",
    progress: bool = True,
    max_seconds: float | None = None,
) -> dict:
    """Train ``model``'s trainable parameters on ``data``; resumes from ``out_dir/checkpoint``.

    ``loss_fn(model, batch, generator=...) -> (loss, scalars)``; default: ``ce_loss`` with
    ``cfg.cfg_dropout``. Batches are drawn with a generator saved in the checkpoint, so a resumed run
    sees the same batches as an uninterrupted one. ``max_seconds`` stops early after a checkpoint.

    Returns:
        A log: ``curve`` (step, loss, lr), ``steps_done``, ``seconds``, ``stopped_early``.
    """
    from tqdm import tqdm

    from musicgen.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if loss_fn is None:
        def loss_fn(m, b, generator=None):
            return ce_loss(m, b, cfg_dropout=cfg.cfg_dropout, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = out_dir / "checkpoint"
    log = {"curve": [], "seconds": 0.0}
    start = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt, model=model, optimizer=opt, generator=gen)
        start, log = state["step"], state["log"]
    model.train()
    t0 = time.time()
    run, n = 0.0, 0
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress, initial=start, total=cfg.steps)
    stopped = False
    for step in bar:
        lr = lr_at(step, total=cfg.steps, warmup=cfg.warmup, lr=cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        batch = data.batch(idx, crop_frames=cfg.crop_frames, generator=gen)
        loss, _ = loss_fn(model, batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        run += float(loss.detach())
        n += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            log["curve"].append({"step": done, "loss": round(run / n, 4), "lr": round(lr, 6)})
            bar.set_postfix(loss=f"{run / n:.3f}")
            run, n = 0.0, 0
        early = max_seconds is not None and time.time() - t0 > max_seconds and done < cfg.steps
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or early:
            log["seconds"] = round(log["seconds"] + time.time() - t0, 1)
            t0 = time.time()
            save_checkpoint(ckpt, model=model, optimizer=opt, generator=gen, state={"step": done, "log": log})
        if early:
            stopped = True
            break
    bar.close()
    model.eval()
    return {**log, "steps_done": done if cfg.steps > start else start, "stopped_early": stopped}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_nll(model, data: TokenDataset, *, batch_size: int = 16) -> dict:
    """Held-out token NLL in nats/token, conditioned on the captions (no dropout).

    Returns ``nll`` (all codebooks, token-weighted), ``nll_per_codebook`` and ``nll_first``.
    """
    model.eval()
    sums, counts = None, None
    for i in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(i, min(i + batch_size, len(data))))
        logits, labels, mask = decoder_logits(model, batch)
        ce = F.cross_entropy(logits.flatten(0, 2).float(), labels.clamp_min(0).flatten(), reduction="none").view(labels.shape)
        m = mask.double()
        s, c = (ce.double() * m).sum((0, 2)), m.sum((0, 2))
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    per = (sums / counts).tolist()
    return {
        "nll": round(float(sums.sum() / counts.sum()), 4),
        "nll_per_codebook": [round(v, 4) for v in per],
        "nll_first": round(per[0], 4),
    }


def unigram_nll(train: TokenDataset, test: TokenDataset, *, vocab: int, alpha: float = 1.0) -> dict:
    """NLL of ``test`` codes under per-codebook unigram frequencies of ``train`` (add-``alpha`` smoothing)."""
    per = []
    for k in range(train.codes.shape[1]):
        counts = torch.bincount(train.codes[:, k].flatten(), minlength=vocab).double() + alpha
        logp = (counts / counts.sum()).log()
        per.append(float(-logp[test.codes[:, k].flatten()].mean()))
    return {"nll": round(float(np.mean(per)), 4), "nll_per_codebook": [round(v, 4) for v in per], "nll_first": round(per[0], 4)}


def param_count(model) -> int:
    """Parameters of the decoder (what differs between teacher and student)."""
    return sum(p.numel() for p in model.decoder.parameters())


@torch.no_grad()
def generate_clips(model, tokenizer, captions: list[str], out_dir: str | Path, *, seconds: float = 4.0, seed: int = 0,
                   guidance_scale: float = 3.0) -> list[dict]:
    """Generate one clip per caption; save ``clip_i.wav`` and a ``spectrograms.png``; return their rows."""
    import soundfile as sf

    from musicgen.codec import log_mel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sr = model.config.audio_encoder.sampling_rate
    k = model.config.decoder.num_codebooks
    torch.manual_seed(seed)
    inputs = tokenizer(captions, padding=True, return_tensors="pt")
    audio = model.generate(**inputs, max_new_tokens=int(seconds * 50) + k - 1, do_sample=True, top_k=250,
                           guidance_scale=guidance_scale)
    audio = audio[:, 0].float().numpy()
    rows = []
    for i, (cap, wav) in enumerate(zip(captions, audio)):
        name = f"clip_{i}.wav"
        sf.write(str(out_dir / name), wav / max(1e-6, float(np.abs(wav).max())) * 0.9, sr, subtype="PCM_16")
        rows.append({"file_name": name, "text": cap, "seconds": round(len(wav) / sr, 2)})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(audio), 1, figsize=(8, 2 * len(audio)), squeeze=False)
    for ax, wav, cap in zip(axes[:, 0], audio, captions):
        ax.imshow(log_mel(wav, sr), origin="lower", aspect="auto", vmin=-5, vmax=2, cmap="magma")
        ax.set_title(cap[:90], fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out_dir / "spectrograms.png", dpi=80)
    plt.close(fig)
    return rows
