"""Train a small EnCodec (transformers ``EncodecModel``) with 4 residual codebooks at 50 Hz.

transformers' EnCodec only runs inference: its residual vector quantizer has no gradient path and no
codebook learning. This module adds the training side around the unchanged model, so that what is
saved is a plain ``EncodecModel`` folder that ``from_pretrained`` loads and MusicGen uses:

* Weight-norm re-initialisation (``reinit_weight_norm``): transformers' init does not reach the
  parametrized convolutions; left at PyTorch defaults the autoencoder collapses to an average
  spectrum. Each conv's direction gets a Kaiming-normal draw, its magnitude is that draw's norm, the
  bias is zero and the last decoder conv is scaled down by 10.
* Unquantized warm-up: ``warmup_ae_steps`` steps train encoder and decoder with no quantizer.
* Residual k-means initialisation (``kmeans_init``): codebook ``i`` is fitted by k-means (scipy) on the
  residual left by codebooks ``< i`` over latents of ``kmeans_clips`` training clips.
* Quantized training (``rvq_train_forward``): for codebook ``i`` with residual ``r_i`` and nearest
  code ``q_i``, ``r_{i+1} = r_i - q_i``; the decoder sees ``z + sg(sum_i q_i - z)`` (straight-through);
  codebooks are updated by EMA (decay ``ema_decay``, Laplace-smoothed counts) and codes whose EMA usage
  falls below ``dead_ratio * frames / K`` are restarted from random frames of the batch.
  Commitment loss ``sum_i mean((r_i - sg(q_i))^2) / mean(sg(z)^2)``: dividing by the latent energy stops
  the encoder from shrinking its latents to cheat the loss, which made residual codebooks collapse.
* Reconstruction loss: multi-resolution mel loss (FFT ``mel_ffts``, L1 on mel and log-mel, mean over
  resolutions) + ``wave_weight`` x waveform L1.

Checks: per-codebook usage and perplexity ``exp(H(code histogram))`` (collapse shows as perplexity
near 1 on codebooks 2-4), log-mel distance, chroma correlation against the original (and against a
shuffled pairing as the chance level), and a spectrogram figure of original against reconstruction.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdq.errors import KdqError


class CodecError(KdqError):
    """A codec configuration that cannot give MusicGen's 50 Hz, 4-codebook layout."""


@dataclass(frozen=True)
class CodecConfig:
    """Codec architecture and training recipe (plain data; its JSON keys the stage cache).

    ``upsampling_ratios`` must multiply to ``sample_rate / 50`` (50 frames per second as in MusicGen).
    """

    sample_rate: int = 8000
    upsampling_ratios: tuple = (5, 4, 4, 2)
    num_filters: int = 16
    hidden_size: int = 64
    codebook_size: int = 1024
    num_codebooks: int = 4
    num_lstm_layers: int = 1
    steps: int = 400
    warmup_ae_steps: int = 100
    batch_size: int = 16
    crop_seconds: float = 1.0
    lr: float = 2e-3
    lr_warmup: int = 50
    ema_decay: float = 0.95
    commit_weight: float = 0.25
    dead_ratio: float = 0.1
    kmeans_clips: int = 48
    wave_weight: float = 0.1
    mel_ffts: tuple = (256, 512, 1024, 2048)
    gain_range: tuple = (0.3, 1.0)
    seed: int = 0
    threads: int = 1  # see TrainConfig.threads
    checkpoint_every: int = 100
    log_every: int = 25

    def validate(self) -> None:
        hop = int(np.prod(self.upsampling_ratios))
        if hop * 50 != self.sample_rate:
            raise CodecError(
                f"upsampling_ratios={list(self.upsampling_ratios)} give a hop of {hop} samples, "
                f"{self.sample_rate / hop:.2f} frames/s at sample_rate={self.sample_rate}; MusicGen needs 50: "
                "use (5, 4, 4, 2) at 8000 Hz, (8, 5, 4, 2) at 16000 Hz or (8, 5, 4, 4) at 32000 Hz"
            )
        if self.codebook_size & (self.codebook_size - 1):
            raise CodecError(f"codebook_size={self.codebook_size} must be a power of two (EnCodec requires it)")
        if not 0 <= self.warmup_ae_steps < self.steps:
            raise CodecError(f"warmup_ae_steps={self.warmup_ae_steps} must be in [0, steps={self.steps})")

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsampling_ratios))

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def encodec_config(cfg: CodecConfig):
    """The transformers ``EncodecConfig`` for ``cfg`` (MusicGen-style: non-causal, no normalisation)."""
    from transformers import EncodecConfig

    cfg.validate()
    # bandwidth per codebook = log2(K) * 50 bits/s; choose the target so exactly num_codebooks are used.
    bw_per_q = math.log2(cfg.codebook_size) * 50 / 1000
    return EncodecConfig(
        sampling_rate=cfg.sample_rate,
        audio_channels=1,
        num_filters=cfg.num_filters,
        hidden_size=cfg.hidden_size,
        codebook_dim=cfg.hidden_size,
        upsampling_ratios=list(cfg.upsampling_ratios),
        codebook_size=cfg.codebook_size,
        target_bandwidths=[round(bw_per_q * (cfg.num_codebooks + 0.4), 3)],
        num_lstm_layers=cfg.num_lstm_layers,
        use_causal_conv=False,
        normalize=False,
        pad_mode="reflect",
        norm_type="weight_norm",
    )


@torch.no_grad()
def reinit_weight_norm(model, *, last_scale: float = 0.1, seed: int = 0) -> int:
    """Re-initialise every weight-normed conv of ``model`` (see module docstring); returns how many."""
    g = torch.Generator().manual_seed(seed)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    n = 0
    for m in convs:
        par = getattr(m, "parametrizations", None)
        if par is None or "weight" not in par:
            continue
        direction = par.weight.original1
        fan_in = direction[0].numel() if isinstance(m, torch.nn.Conv1d) else direction.shape[0] * direction.shape[2]
        w = torch.randn(direction.shape, generator=g) * math.sqrt(2.0 / fan_in)
        if m is convs[-1]:
            w *= last_scale
        direction.copy_(w)
        # weight_norm keeps one magnitude per slice of dim 0 (output channels of a conv, input of a transpose).
        par.weight.original0.copy_(w.norm(dim=(1, 2), keepdim=True))
        if m.bias is not None:
            m.bias.zero_()
        n += 1
    return n


def build_codec(cfg: CodecConfig):
    """A freshly initialised ``EncodecModel`` for ``cfg`` with the weight-norm fix applied."""
    from transformers import EncodecModel

    torch.manual_seed(cfg.seed)
    model = EncodecModel(encodec_config(cfg))
    reinit_weight_norm(model, seed=cfg.seed)
    return model


# ---------------------------------------------------------------------------------------------- losses
class MultiResolutionMelLoss(torch.nn.Module):
    """Mean over FFT sizes of ``L1(mel(x), mel(y)) + L1(log(mel(x)+eps), log(mel(y)+eps))``.

    Shapes: ``x, y`` are (batch, samples). Hop is FFT/4, Hann window, HTK mel filters from
    transformers' ``mel_filter_bank`` with ``min(64, fft/8)`` bands.
    """

    def __init__(self, sample_rate: int, ffts=(256, 512, 1024, 2048), eps: float = 1e-5):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.ffts = tuple(int(n) for n in ffts)
        self.eps = eps
        for n in self.ffts:
            fb = mel_filter_bank(
                num_frequency_bins=n // 2 + 1, num_mel_filters=min(64, n // 8), min_frequency=0.0,
                max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney",
            )
            self.register_buffer(f"fb{n}", torch.tensor(fb, dtype=torch.float32), persistent=False)
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def mel(self, x: torch.Tensor, n: int) -> torch.Tensor:
        spec = torch.stft(x, n, hop_length=n // 4, window=getattr(self, f"win{n}"), return_complex=True).abs()
        return torch.einsum("bft,fm->bmt", spec, getattr(self, f"fb{n}"))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for n in self.ffts:
            mx, my = self.mel(x, n), self.mel(y, n)
            total = total + F.l1_loss(mx, my) + F.l1_loss(torch.log(mx + self.eps), torch.log(my + self.eps))
        return total / len(self.ffts)


# ---------------------------------------------------------------------------------------------- RVQ
def _codebooks(model) -> list:
    return [layer.codebook for layer in model.quantizer.layers]


def _nearest(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``embed`` (K, D) for each row of ``x`` (N, D)."""
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None]
    return d.argmin(1)


@torch.no_grad()
def kmeans_init(model, latents: torch.Tensor, *, seed: int = 0, iters: int = 10) -> list[float]:
    """Fit each codebook by k-means on the residual of the previous ones (in place).

    ``latents``: (frames, dim). Returns the relative residual energy after each codebook.
    """
    from scipy.cluster.vq import kmeans2

    residual = latents.double().numpy()
    energy0 = float((residual**2).mean())
    left = []
    for i, cb in enumerate(_codebooks(model)):
        k = cb.embed.shape[0]
        data = residual
        if len(data) < k:  # too few frames: repeat with jitter so k-means has k distinct points
            reps = int(math.ceil(k / len(data)))
            rng = np.random.default_rng(seed + i)
            data = np.concatenate([data] * reps) + 1e-3 * np.std(data) * rng.standard_normal((len(data) * reps, data.shape[1]))
        centroids, labels = kmeans2(data, k, iter=iters, minit="++", seed=seed + i)
        emb = torch.tensor(centroids, dtype=torch.float32)
        cb.embed.copy_(emb)
        cb.embed_avg.copy_(emb)
        cb.cluster_size.fill_(1.0)
        idx = _nearest(torch.tensor(residual, dtype=torch.float32), emb)
        residual = residual - emb[idx].double().numpy()
        left.append(float((residual**2).mean()) / max(energy0, 1e-12))
    return left


def rvq_train_forward(
    model, z: torch.Tensor, *, train: bool, decay: float = 0.95, dead_ratio: float = 0.1, generator=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Residual quantization with straight-through gradients, EMA codebook updates and restarts.

    Args:
        model: the ``EncodecModel`` whose codebook buffers are used (and updated when ``train``).
        z: encoder latents (batch, dim, frames).
        train: update codebooks by EMA and restart dead codes.

    Returns:
        (quantized latents with straight-through gradient (batch, dim, frames), commitment loss,
        codes (codebooks, batch, frames), number of restarted codes).
    """
    b, d, t = z.shape
    flat = z.permute(0, 2, 1).reshape(-1, d)
    residual = flat.detach()
    quantized = torch.zeros_like(residual)
    commit = z.new_zeros(())
    energy = flat.detach().pow(2).mean().clamp_min(1e-8)
    codes = []
    restarted = 0
    for cb in _codebooks(model):
        idx = _nearest(residual, cb.embed)
        q = cb.embed[idx]
        codes.append(idx.view(b, t))
        if train:
            with torch.no_grad():
                k = cb.embed.shape[0]
                counts = torch.bincount(idx, minlength=k).float()
                sums = torch.zeros_like(cb.embed).index_add_(0, idx, residual)
                cb.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
                cb.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
                n = cb.cluster_size.sum()
                smoothed = (cb.cluster_size + 1e-5) / (n + k * 1e-5) * n
                cb.embed.copy_(cb.embed_avg / smoothed[:, None])
                expected = len(residual) / k
                dead = torch.nonzero(cb.cluster_size < dead_ratio * expected).flatten()
                if len(dead):
                    pick = torch.randint(len(residual), (len(dead),), generator=generator)
                    new = residual[pick]
                    cb.embed[dead] = new
                    cb.embed_avg[dead] = new * expected
                    cb.cluster_size[dead] = expected
                    restarted += len(dead)
        # Commitment of the (differentiable) latent's residual to the chosen code.
        commit = commit + (flat - quantized.detach() - q.detach()).pow(2).mean() / energy
        quantized = quantized + q.detach()
        residual = residual - q.detach()
    zq = flat + (quantized - flat).detach()
    zq = zq.view(b, t, d).permute(0, 2, 1)
    return zq, commit, torch.stack(codes), restarted


# ---------------------------------------------------------------------------------------------- metrics
def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Per-codebook usage (fraction of codes seen) and perplexity. ``codes``: (codebooks, ...)."""
    out = {"perplexity": [], "usage": []}
    for c in codes.reshape(codes.shape[0], -1):
        counts = torch.bincount(c, minlength=codebook_size).double()
        p = counts / counts.sum()
        h = -(p[p > 0] * p[p > 0].log()).sum()
        out["perplexity"].append(round(float(h.exp()), 1))
        out["usage"].append(round(float((counts > 0).double().mean()), 3))
    return out


def log_mel(x: np.ndarray, sample_rate: int, *, n_fft: int = 512, n_mels: int = 64) -> np.ndarray:
    """log10 mel power spectrogram (mels, frames) of a mono signal, floor 1e-5."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=sample_rate / 2,
        sampling_rate=sample_rate, norm="slaney", mel_scale="slaney",
    )
    spec = torch.stft(torch.tensor(x, dtype=torch.float32), n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft), return_complex=True)
    power = spec.abs().pow(2).numpy()
    return np.log10(np.maximum(fb.T @ power, 1e-5))


def chroma(x: np.ndarray, sample_rate: int, *, n_fft: int = 2048) -> np.ndarray:
    """Pitch-class energy (12, frames) from an STFT, bins 60 Hz - 2 kHz folded onto 12 classes, frames L1-normalised."""
    spec = torch.stft(torch.tensor(x, dtype=torch.float32), n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft), return_complex=True).abs().numpy()
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    keep = (freqs >= 60) & (freqs <= min(2000, sample_rate / 2))
    pc = np.round(12 * np.log2(freqs[keep] / 440.0)).astype(int) % 12
    out = np.zeros((12, spec.shape[1]))
    np.add.at(out, pc, spec[keep])
    return out / (out.sum(0, keepdims=True) + 1e-9)


def chroma_correlation(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """Pearson correlation of the flattened chroma of two equal-length signals."""
    ca, cb = chroma(a, sample_rate), chroma(b, sample_rate)
    n = min(ca.shape[1], cb.shape[1])
    return float(np.corrcoef(ca[:, :n].ravel(), cb[:, :n].ravel())[0, 1])


@torch.no_grad()
def encode(model, audio: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
    """Codes (clips, codebooks, frames) of mono audio (clips, samples) through the HF ``encode`` API."""
    out = []
    for i in range(0, len(audio), batch_size):
        enc = model.encode(audio[i : i + batch_size, None, :])
        out.append(enc.audio_codes[0])
    return torch.cat(out)


@torch.no_grad()
def decode(model, codes: torch.Tensor) -> torch.Tensor:
    """Audio (clips, samples) from codes (clips, codebooks, frames) through the HF ``decode`` API."""
    return model.decode(codes[None], [None]).audio_values[:, 0]


def evaluate_codec(model, audio: torch.Tensor, *, sample_rate: int, codebook_size: int) -> dict:
    """Held-out figures: log-mel L1 distance, chroma correlation (and its shuffled chance level), codebooks."""
    model.eval()
    codes = encode(model, audio)
    recon = decode(model, codes)[:, : audio.shape[1]]
    lm, cc, cc_shuf = [], [], []
    x, y = audio.numpy(), recon.numpy()
    for i in range(len(x)):
        lm.append(float(np.abs(log_mel(x[i], sample_rate) - log_mel(y[i], sample_rate)).mean()))
        cc.append(chroma_correlation(x[i], y[i], sample_rate))
        cc_shuf.append(chroma_correlation(x[i], y[(i + 1) % len(x)], sample_rate))
    stats = codebook_stats(codes.transpose(0, 1), codebook_size)
    return {
        "clips": len(x),
        "log_mel_l1": round(float(np.mean(lm)), 4),
        "log_mel_l1_silence": round(float(np.mean([np.abs(log_mel(v, sample_rate) + 5).mean() for v in x])), 4),
        "chroma_corr": round(float(np.mean(cc)), 4),
        "chroma_corr_shuffled": round(float(np.mean(cc_shuf)), 4),
        "perplexity": stats["perplexity"],
        "usage": stats["usage"],
    }


def spectrogram_figure(path: str | Path, originals: np.ndarray, recons: np.ndarray, *, sample_rate: int, titles=None) -> Path:
    """PNG with one row per clip: log-mel of the original (left) and the reconstruction (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(originals)
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.2 * n), squeeze=False)
    for i in range(n):
        for j, (sig, name) in enumerate(((originals[i], "original"), (recons[i], "reconstruction"))):
            ax = axes[i, j]
            ax.imshow(log_mel(sig, sample_rate), origin="lower", aspect="auto", vmin=-5, vmax=2, cmap="magma")
            label = name if titles is None else f"{name}: {titles[i][:60]}"
            ax.set_title(label, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- training
def _lr_at(step: int, *, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def train_codec(
    cfg: CodecConfig,
    train_audio: torch.Tensor,
    out_dir: str | Path,
    *,
    progress: bool = True,
    max_seconds: float | None = None,
) -> tuple[object, dict]:
    """Train a codec on ``train_audio`` (clips, samples) and save it to ``out_dir/model``.

    Resumes from ``out_dir/checkpoint`` when present (the checkpoint is rewritten every
    ``cfg.checkpoint_every`` steps and at the end). ``max_seconds`` stops early (for tests of resume).

    Returns:
        (the trained model in eval mode, a log dict with losses, restarts and codebook stats).
    """
    from tqdm import tqdm

    from musicgen.checkpoint import load_checkpoint, save_checkpoint

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_codec(cfg)
    loss_fn = MultiResolutionMelLoss(cfg.sample_rate, cfg.mel_ffts)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = out_dir / "checkpoint"
    log: dict = {"curve": [], "restarts": 0, "kmeans_residual": None}
    start = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt, model=model, optimizer=opt, generator=gen)
        start, log = state["step"], state["log"]
    crop = int(cfg.crop_seconds * cfg.sample_rate) // cfg.hop * cfg.hop
    if train_audio.shape[1] < crop:
        raise CodecError(f"clips of {train_audio.shape[1]} samples are shorter than crop_seconds={cfg.crop_seconds}")
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="codec", disable=not progress, initial=start, total=cfg.steps)
    run = {"loss": 0.0, "commit": 0.0, "n": 0}
    for step in bar:
        if step == cfg.warmup_ae_steps:
            with torch.no_grad():
                pick = torch.randperm(len(train_audio), generator=gen)[: cfg.kmeans_clips]
                z = model.encoder(train_audio[pick][:, None, :])
                log["kmeans_residual"] = kmeans_init(model, z.permute(0, 2, 1).reshape(-1, z.shape[1]), seed=cfg.seed)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total=cfg.steps, warmup=cfg.lr_warmup, lr=cfg.lr)
        idx = torch.randint(len(train_audio), (cfg.batch_size,), generator=gen)
        offs = torch.randint(train_audio.shape[1] - crop + 1, (cfg.batch_size,), generator=gen)
        gain = torch.empty(cfg.batch_size, 1).uniform_(*cfg.gain_range, generator=gen)
        x = torch.stack([train_audio[i, o : o + crop] for i, o in zip(idx.tolist(), offs.tolist())]) * gain
        z = model.encoder(x[:, None, :])
        commit = z.new_zeros(())
        if step >= cfg.warmup_ae_steps:
            z, commit, _, restarted = rvq_train_forward(
                model, z, train=True, decay=cfg.ema_decay, dead_ratio=cfg.dead_ratio, generator=gen
            )
            log["restarts"] += restarted
        y = model.decoder(z)[:, 0, : x.shape[1]]
        loss = loss_fn(y, x) + cfg.wave_weight * F.l1_loss(y, x) + cfg.commit_weight * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        run["loss"] += float(loss.detach())
        run["commit"] += float(commit.detach())
        run["n"] += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log["curve"].append({"step": step + 1, "loss": round(run["loss"] / run["n"], 4), "commit": round(run["commit"] / run["n"], 4)})
            bar.set_postfix(loss=f"{run['loss'] / run['n']:.3f}", restarts=log["restarts"])
            run = {"loss": 0.0, "commit": 0.0, "n": 0}
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt, model=model, optimizer=opt, generator=gen, state={"step": done, "log": log})
        if max_seconds is not None and time.time() - t0 > max_seconds and done < cfg.steps:
            save_checkpoint(ckpt, model=model, optimizer=opt, generator=gen, state={"step": done, "log": log})
            log["stopped_at"] = done
            break
    bar.close()
    model.eval()
    if log.get("stopped_at") is None:
        model.save_pretrained(out_dir / "model")
    return model, log
