"""Sampling clips from a MusicGen for a list of prompts, the same way for every variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musicgen.files import write_wav


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, seconds: float, seed: int = 0, guidance_scale: float = 3.0,
             top_k: int = 250, batch: int = 16, progress: bool = False, desc: str = "generate",
             temperature: float = 1.0) -> list[np.ndarray]:
    """One mono clip of ``seconds`` per prompt (top-k sampling at ``temperature`` with classifier-free guidance).

    Prompts are generated ``batch`` at a time; batch ``j`` draws from torch's RNG seeded with
    ``seed * 1000 + j``, so two models given the same arguments see the same seeds.
    """
    from tqdm.auto import tqdm

    k = model.config.decoder.num_codebooks
    frames = max(int(round(seconds * (model.config.audio_encoder.frame_rate or 50))), 8)
    out: list[np.ndarray] = []
    for j, i in enumerate(tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress, leave=False)):
        torch.manual_seed(seed * 1000 + j)
        inputs = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True)
        audio = model.generate(**inputs, do_sample=True, top_k=top_k, temperature=temperature,
                               guidance_scale=guidance_scale, max_new_tokens=frames + k - 1)
        out += [a for a in audio[:, 0].float().numpy()]
    return out


def save_clips(folder: str | Path, audio: list[np.ndarray], sample_rate: int) -> list[Path]:
    """``folder/0.wav, 1.wav, ...`` (16-bit PCM, scaled down only where a clip's peak exceeds 1)."""
    folder = Path(folder)
    return [write_wav(folder / f"{i}.wav", a, sample_rate, normalise=True) for i, a in enumerate(audio)]
