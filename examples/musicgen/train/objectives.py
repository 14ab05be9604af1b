"""What each model of the example is trained on, as objectives for the one loop (``musicgen.train.loop``).

- ``CodecObjective``: the EnCodec autoencoder on random crops of the training audio (spectral and
  waveform reconstruction losses, then residual quantization with EMA codebooks).
- ``MaskedWordObjective``: the caption T5 encoder, by masked-word prediction on the captions.
- ``LMObjective``: a MusicGen decoder on codec codes with cross-entropy (teacher, ``student_base``
  pretraining, and the ``student_ce`` control: the *same* loss, ``codebook_ce``).
- ``DistillObjective``: ``student_base`` against the teacher with ``kdq.losses.StageMixedKL`` (plus
  ``ce_weight`` x the same cross-entropy).

Each returns a micro-batch's *mean* loss and tells the loop how many items that mean is over
(``count``), so that the loop can weight micro-batches and processes exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from musicgen.config import CodecConfig, DistillConfig, TextConfig
from musicgen.data.tokens import TokenDataset, delay_pattern
from musicgen.train.loop import Objective, generator

# ------------------------------------------------------------------------------------------- codec


class SpectralLoss(torch.nn.Module):
    """Reconstruction loss on spectra, mean over resolutions. Shapes: ``x, y`` are (batch, samples).

    - mel (each FFT in ``mel_ffts``, hop FFT/4, Hann window, ``min(mel_bands, FFT/8)`` Slaney bands):
      ``L1(mel(x), mel(y)) + log_weight x L1(log(mel(x) + eps), log(mel(y) + eps))``;
    - with ``stft_ffts``: ``stft_weight`` x the same two terms on the linear-frequency magnitude
      (semitone resolution at low pitches, which mel bands at 8 kHz lack).

    ``log_weight=0`` leaves only linear magnitudes. Measured here (docs/mini_world.md): beside a
    strong waveform term, the log terms pull a small decoder towards near-silent, pitchless output
    (quiet bins cost as much as loud ones), while linear magnitudes plus the waveform term learn pitch.
    """

    def __init__(self, sample_rate: int, *, mel_ffts=(256, 512, 1024, 2048), mel_bands: int = 64,
                 stft_ffts=(), stft_weight: float = 0.0, log_weight: float = 1.0, eps: float = 1e-5):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.mel_ffts, self.stft_ffts = tuple(int(n) for n in mel_ffts), tuple(int(n) for n in stft_ffts)
        self.stft_weight, self.log_weight, self.eps = stft_weight, log_weight, eps
        for n in sorted({*self.mel_ffts, *self.stft_ffts}):
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)
        for n in self.mel_ffts:
            fb = mel_filter_bank(num_frequency_bins=n // 2 + 1, num_mel_filters=min(mel_bands, n // 8), min_frequency=0.0,
                                 max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
            self.register_buffer(f"fb{n}", torch.tensor(fb, dtype=torch.float32), persistent=False)

    def magnitude(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return torch.stft(x, n, hop_length=n // 4, window=getattr(self, f"win{n}"), return_complex=True).abs()

    def _pair(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(a, b)
        if self.log_weight:
            loss = loss + self.log_weight * F.l1_loss(torch.log(a + self.eps), torch.log(b + self.eps))
        return loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for n in self.mel_ffts:
            fb = getattr(self, f"fb{n}")
            total = total + self._pair(torch.einsum("bft,fm->bmt", self.magnitude(x, n), fb),
                                       torch.einsum("bft,fm->bmt", self.magnitude(y, n), fb)) / len(self.mel_ffts)
        for n in self.stft_ffts:
            total = total + self.stft_weight * self._pair(self.magnitude(x, n), self.magnitude(y, n)) / len(self.stft_ffts)
        return total


class CodecObjective(Objective):
    """The codec on random ``crop_seconds`` crops of the training clips, with random gain.

    Loss: ``SpectralLoss`` + ``wave_l1`` x L1 + ``wave_mse`` x MSE of the waveform (a strong
    waveform term is what taught the decoder pitch here: spectral losses leave phase free, and the
    decoder settles on envelope-shaped noise) + ``commit_weight`` x commitment. Before
    ``warmup_ae_steps`` the latents reach the decoder unquantized; at that step the codebooks are
    fitted by residual k-means on ``kmeans_clips`` clips, then quantized training follows (with
    quantizer dropout: each micro-batch uses the first ``n`` codebooks, ``n`` uniform in ``1..K``,
    with probability ``quantizer_dropout``). With ``decoder_only_after_warmup`` the encoder and the
    k-means codebooks stay frozen after the warm-up and only the decoder trains, on the codes: EMA
    updates of a moving encoder collapsed the codebooks here (perplexity 1-17 within 500 steps).
    """

    name = "codec"

    def __init__(self, cfg: CodecConfig, audio: torch.Tensor, *, seed: int = 0):
        self.cfg, self.audio, self.seed = cfg, audio, seed
        self.crop = int(cfg.crop_seconds * cfg.sample_rate) // cfg.hop * cfg.hop
        if audio.shape[1] < self.crop:
            raise ValueError(f"clips of {audio.shape[1]} samples are shorter than crop_seconds={cfg.crop_seconds}")
        self.spectral = SpectralLoss(cfg.sample_rate, mel_ffts=cfg.mel_ffts, mel_bands=cfg.mel_bands,
                                     stft_ffts=cfg.stft_ffts, stft_weight=cfg.stft_weight)
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.audio)

    def extra_state(self, model) -> dict[str, torch.Tensor]:
        return {n: b for n, b in model.named_buffers() if n.startswith("quantizer.")}

    def settings(self) -> dict:
        return {"codec": self.cfg.to_dict(), "clips": len(self.audio), "seed": self.seed}

    def before_step(self, model, step: int) -> None:
        from musicgen.models.codec import kmeans_init

        if step != self.cfg.warmup_ae_steps:
            return
        g = torch.Generator().manual_seed(self.seed + 17)
        pick = torch.randperm(len(self.audio), generator=g)[: self.cfg.kmeans_clips]
        with torch.no_grad():
            z = model.encoder(self.audio[pick][:, None, :])
        self.kmeans_residual = kmeans_init(model, z.permute(0, 2, 1).reshape(-1, z.shape[1]), seed=self.seed)

    def loss(self, model, indices: list[int], *, step: int, rngs: list[torch.Generator], log: bool) -> tuple[torch.Tensor, dict]:
        from musicgen.models.codec import rvq_train_forward

        cfg = self.cfg
        crops = []
        for i, g in zip(indices, rngs):
            o = int(torch.randint(self.audio.shape[1] - self.crop + 1, (1,), generator=g))
            crops.append(self.audio[i, o : o + self.crop] * torch.empty(1).uniform_(*cfg.gain_range, generator=g))
        x = torch.stack(crops)
        commit = x.new_zeros(())
        scalars: dict[str, Any] = {}
        if step >= cfg.warmup_ae_steps and cfg.decoder_only_after_warmup:
            with torch.no_grad():  # encoder and k-means codebooks frozen: the decoder learns to read the codes
                z = rvq_train_forward(model, model.encoder(x[:, None, :]), train=False)[0]
        else:
            z = model.encoder(x[:, None, :])
        if step >= cfg.warmup_ae_steps and not cfg.decoder_only_after_warmup:
            k, g = cfg.num_codebooks, generator(self.seed, step, -1)  # the step's own choices
            active = int(torch.randint(1, k + 1, (1,), generator=g)) if float(torch.rand(1, generator=g)) < cfg.quantizer_dropout else k
            z, commit, _, restarted = rvq_train_forward(model, z, train=True, decay=cfg.ema_decay,
                                                        dead_ratio=cfg.dead_ratio, generator=g, active=active)
            self.restarts += restarted
            scalars = {"restarts": restarted, "codebooks": active}
        y = model.decoder(z)[:, 0, : x.shape[1]]
        self.spectral.log_weight = cfg.mel_log_weight[int(step >= cfg.warmup_ae_steps)]
        loss = self.spectral(y, x) + cfg.wave_l1 * F.l1_loss(y, x) + cfg.wave_mse * F.mse_loss(y, x) + cfg.commit_weight * commit
        return loss, {**scalars, "commit": float(commit.detach())}


# -------------------------------------------------------------------------------------------- text


class MaskedTextModel(torch.nn.Module):
    """A T5 encoder with a linear head over the vocabulary, for masked-word pretraining (head discarded)."""

    def __init__(self, encoder, vocab_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


class MaskedWordObjective(Objective):
    """Each caption word is replaced by ``<unk>`` with probability ``mask_prob`` (at least one where
    possible); the loss is the cross-entropy of predicting the hidden words."""

    name = "text"

    def __init__(self, cfg: TextConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, unk_id: int = 2):
        self.cfg, self.ids, self.mask, self.unk = cfg, input_ids, attention_mask, unk_id

    def __len__(self) -> int:
        return len(self.ids)

    def settings(self) -> dict:
        return {"text": self.cfg.to_dict(), "captions": len(self.ids)}

    def loss(self, model, indices: list[int], *, step: int, rngs: list[torch.Generator], log: bool) -> tuple[torch.Tensor, dict]:
        x, m = self.ids[indices], self.mask[indices]
        hide = torch.stack([torch.rand(x.shape[1], generator=g) for g in rngs]) < self.cfg.mask_prob
        hide &= x > 2
        none = hide.sum(1) == 0
        hide[none, 0] = x[none, 0] > 2  # at least one target where possible
        logits = model(x.masked_fill(hide, self.unk), m)
        return (F.cross_entropy(logits[hide], x[hide]) if hide.any() else logits.sum() * 0), {}


# -------------------------------------------------------------------------------------- MusicGen LM


def codebook_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over codebooks of each codebook's masked mean cross-entropy (fp32), as transformers' and
    audiocraft's MusicGen losses. Shapes: ``[B, K, S, V]``, ``[B, K, S]``, ``[B, K, S]``."""
    target = labels.masked_fill(~mask, 0)  # pattern padding may be out of the vocabulary; it is masked out
    ce = F.cross_entropy(logits.flatten(0, 2).float(), target.flatten(), reduction="none").view(labels.shape)
    m = mask.to(ce.dtype)
    return ((ce * m).sum((0, 2)) / m.sum((0, 2)).clamp_min(1)).mean()


@torch.no_grad()
def encode_text(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, drop: torch.Tensor):
    """Frozen text-encoder states, with dropped conditions made null the way ``generate`` does it
    for the unconditional half of classifier-free guidance (zero states, zero attention mask)."""
    inner = getattr(model, "module", model)  # a DDP wrapper's model
    hidden = inner.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = (~drop).to(hidden.dtype)
    return hidden * keep[:, None, None], attention_mask * (~drop).to(attention_mask.dtype)[:, None]


def decoder_logits(model, inputs: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``[B, K, S, V]`` of a ``MusicgenForConditionalGeneration`` (or its DDP wrapper)."""
    b, k, s = inputs.shape
    out = model(attention_mask=attention_mask, encoder_outputs=(hidden,), decoder_input_ids=inputs.reshape(b * k, s),
                use_cache=False)
    return out.logits.reshape(b, k, s, -1)


def conditioned_logits(model, tokenizer, codes: torch.Tensor, captions: list[str], drop: torch.Tensor):
    """(logits, labels, mask) of ``model`` on codes ``[B, K, T]`` with their captions, conditions
    dropped where ``drop`` is True."""
    inner = getattr(model, "module", model)
    dec = inner.config.decoder
    inputs, labels, mask = delay_pattern(codes, bos=dec.bos_token_id, pad=dec.pad_token_id)
    tok = tokenizer(list(captions), return_tensors="pt", padding=True)
    hidden, attn = encode_text(model, tok["input_ids"].to(codes.device), tok["attention_mask"].to(codes.device), drop=drop)
    return decoder_logits(model, inputs, hidden, attn), labels, mask


class LMObjective(Objective):
    """A MusicGen decoder on codes with ``codebook_ce``; the condition is dropped for ``cfg_dropout``
    of the clips (classifier-free guidance training). Only the decoder (and the text-to-decoder
    projection) trains; text encoder and codec stay frozen, as in MusicGen."""

    name = "lm"

    def __init__(self, data: TokenDataset, tokenizer, *, cfg_dropout: float, name: str | None = None):
        self.data, self.tokenizer, self.cfg_dropout = data, tokenizer, cfg_dropout
        self.name = name or self.name

    def __len__(self) -> int:
        return len(self.data)

    def parameters(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        from musicgen.models.musicgen import trainable_decoder

        return trainable_decoder(model)

    def settings(self) -> dict:
        return {"kind": type(self).__name__, "clips": len(self.data), "cfg_dropout": self.cfg_dropout}

    def count(self, indices: list[int]) -> float:
        k, t = self.data.codes.shape[1:]
        return float(len(indices) * k * t)  # every clip has T real positions in each codebook

    def train_mode(self, model) -> None:
        model.train()
        model.text_encoder.eval()  # frozen parts keep inference behaviour (no dropout)
        model.audio_encoder.eval()

    def batch(self, model, indices: list[int], rngs: list[torch.Generator]):
        """Codes, captions and which conditions are dropped (each example's own draw)."""
        device = next(getattr(model, "module", model).parameters()).device
        codes = self.data.codes[indices].to(device)
        drop = torch.tensor([float(torch.rand(1, generator=g)) < self.cfg_dropout for g in rngs], device=device)
        return codes, [self.data.captions[i] for i in indices], drop

    def loss(self, model, indices: list[int], *, step: int, rngs: list[torch.Generator], log: bool) -> tuple[torch.Tensor, dict]:
        codes, captions, drop = self.batch(model, indices, rngs)
        logits, labels, mask = conditioned_logits(model, self.tokenizer, codes, captions, drop)
        return codebook_ce(logits, labels, mask), {}


class DistillObjective(LMObjective):
    """``StageMixedKL(student, teacher, step=s, mask=m)`` + ``ce_weight`` x ``codebook_ce``; the
    teacher sees the same codes and the same dropped conditions. Logs the loss's temperature, the
    stage it leans on, and (every ``log_every`` steps) each component's weight and value."""

    name = "distill"

    def __init__(self, data: TokenDataset, tokenizer, teacher, cfg: DistillConfig):
        from kdq.losses import StageMixedKL

        super().__init__(data, tokenizer, cfg_dropout=cfg.cfg_dropout)
        self.teacher, self.cfg = teacher.eval().requires_grad_(False), cfg
        self.kd = StageMixedKL(**{"total_steps": cfg.train.steps, **cfg.kd})

    def settings(self) -> dict:
        return {**super().settings(), "kd": self.cfg.kd, "ce_weight": self.cfg.ce_weight}

    def loss(self, model, indices: list[int], *, step: int, rngs: list[torch.Generator], log: bool) -> tuple[torch.Tensor, dict]:
        codes, captions, drop = self.batch(model, indices, rngs)
        s, labels, mask = conditioned_logits(model, self.tokenizer, codes, captions, drop)
        with torch.no_grad():
            t, _, _ = conditioned_logits(self.teacher, self.tokenizer, codes, captions, drop)
        target = labels.masked_fill(~mask, -100)
        loss = self.kd(s, t, step=step, mask=mask, labels=target)
        if self.cfg.ce_weight > 0:
            loss = loss + self.cfg.ce_weight * codebook_ce(s, labels, mask)
        weights = self.kd.weights_at(step)
        scalars: dict[str, Any] = {"temperature": float(self.kd.temperature_at(step)), "stage": max(weights, key=weights.get)}
        if log:
            with torch.no_grad():
                parts = self.kd.components(s.detach(), t, step=step, mask=mask, labels=target)
            scalars["components"] = {n: {"weight": float(w), "value": float(v)} for n, (w, v) in parts.items()}
        return loss, scalars
