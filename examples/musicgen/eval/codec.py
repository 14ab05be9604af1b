"""Held-out figures of a trained codec: log-mel distance, pitch (chroma, agreement with the score), codebooks.

``evaluate_codec`` encodes and decodes held-out clips and compares each reconstruction with its
original: log-mel L1 distance (and the all-silence reference), chroma correlation with semitone
resolution (``eval.music``; and the same with a different clip: chance), the share of frames whose
strongest pitch class sounds in the score (for the original render and for the reconstruction,
when the clips carry their notes), and per-codebook perplexity and usage. ``spectrogram_figure`` draws originals beside reconstructions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdq._io import atomic_path
from musicgen.data.tokens import encode_clips
from musicgen.models.codec import codebook_stats, decode


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


def evaluate_codec(model, audio: torch.Tensor, *, sample_rate: int, codebook_size: int,
                   notes: list | None = None) -> dict:
    """Held-out figures of a codec on clips ``audio`` [clips, samples] (see the module docstring).

    ``notes``: per clip, the score's ``[pitch, onset, offset]`` notes (the renderer's metadata), for
    the MIDI agreement of the original renders and of their reconstructions.
    """
    from musicgen.eval.music import chroma, chroma_correlation, midi_agreement, pitch_class_masks

    model.eval()
    codes = encode_clips(model, list(audio.numpy()), sample_rate=sample_rate, clip_seconds=audio.shape[1] / sample_rate)
    recon = decode(model, codes)[:, : audio.shape[1]]
    x, y = audio.numpy(), recon.numpy()
    lm = [float(np.abs(log_mel(x[i], sample_rate) - log_mel(y[i], sample_rate)).mean()) for i in range(len(x))]
    cc = [chroma_correlation(x[i], y[i], sample_rate) for i in range(len(x))]
    cc_shuf = [chroma_correlation(x[i], y[(i + 1) % len(x)], sample_rate) for i in range(len(x))]
    stats = codebook_stats(codes.transpose(0, 1), codebook_size)
    out = {
        "clips": len(x),
        "log_mel_l1": round(float(np.mean(lm)), 4),
        "log_mel_l1_silence": round(float(np.mean([np.abs(log_mel(v, sample_rate) + 5).mean() for v in x])), 4),
        "chroma_corr": round(float(np.mean(cc)), 4),
        "chroma_corr_shuffled": round(float(np.mean(cc_shuf)), 4),
        "perplexity": stats["perplexity"],
        "usage": stats["usage"],
    }
    if notes is not None and all(n for n in notes):
        agree = {"original": [], "reconstruction": []}
        for i in range(len(x)):
            for name, sig in (("original", x[i]), ("reconstruction", y[i])):
                c = chroma(sig, sample_rate)
                agree[name].append(midi_agreement(c, pitch_class_masks(notes[i], n_frames=c.shape[1], sample_rate=sample_rate)))
        out["midi_agreement"] = {k: round(float(np.mean(v)), 4) for k, v in agree.items()}
    return out


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


