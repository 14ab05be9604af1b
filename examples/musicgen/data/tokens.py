"""Codec codes of a split with their captions, and MusicGen's delay pattern.

``TokenDataset``: codes ``[N, K, T]`` of equal-length clips and one caption each, stored as one
safetensors file (tensor ``codes``, int16; the captions as JSON in the file's metadata). Captions are
tokenized when batches are built, by the model's own tokenizer.

``delay_pattern``: MusicGen's layout for teacher-forced training. For codes ``c`` of shape (K, T)
the delayed sequence ``s`` has length ``T + K``: ``s[k, k + 1 + t] = c[k, t]`` and every other
position holds the pad id (MusicGen's BOS has the same id). The decoder reads ``s[:, :-1]`` and is
trained to predict ``s[:, 1:]`` where a real code sits (the mask); the pattern's padding is forced
during generation, so it carries no loss. Tested against transformers' ``build_delay_pattern_mask``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdq._io import atomic_path
from kdq.errors import KdqError, bad_value


class TokenError(KdqError):
    """A token file or batch that does not fit the model."""


@dataclass
class TokenDataset:
    """Codec codes ``[N, K, T]`` and one caption per clip."""

    codes: torch.Tensor
    captions: list[str]

    def __post_init__(self) -> None:
        if self.codes.ndim != 3:
            raise bad_value(TokenError, "codes.shape", tuple(self.codes.shape), "[N, K, T]")
        if len(self.captions) != self.codes.shape[0]:
            raise bad_value(TokenError, "len(captions)", len(self.captions), f"one caption per clip ({self.codes.shape[0]})")
        self.codes = self.codes.long()
        self.captions = [str(c) for c in self.captions]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def subset(self, idx: list[int] | torch.Tensor) -> TokenDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TokenDataset(self.codes[idx], [self.captions[i] for i in idx.tolist()])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        if self.codes.numel() and int(self.codes.max()) > torch.iinfo(torch.int16).max:
            raise bad_value(TokenError, "codes.max()", int(self.codes.max()), "< 32768 (stored as int16)")
        with atomic_path(path) as tmp:
            save_file({"codes": self.codes.to(torch.int16).contiguous()}, str(tmp),
                      metadata={"captions": json.dumps(self.captions)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TokenDataset:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise bad_value(TokenError, "path", str(path), "an existing token file (.safetensors)",
                            "make one with TokenDataset(codes, captions).save(path)")
        with safe_open(str(path), "pt") as f:
            captions = json.loads((f.metadata() or {}).get("captions", "null"))
            if captions is None:
                raise bad_value(TokenError, "path", str(path), "a token file with captions in its metadata")
            codes = f.get_tensor("codes")
        return cls(codes.long(), captions)


def delay_pattern(codes: torch.Tensor, *, bos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced inputs, labels and mask, each ``[B, K, T + K - 1]``, from codes ``[B, K, T]``.

    ``labels[:, k, k + t] = codes[:, k, t]`` and ``pad`` elsewhere; ``inputs`` is the delayed sequence
    shifted right by one with ``bos`` in front; ``mask`` is True where the label is a real code.
    """
    b, k, t = codes.shape
    s = t + k - 1
    labels = torch.full((b, k, s), pad, dtype=torch.long, device=codes.device)
    mask = torch.zeros((b, k, s), dtype=torch.bool, device=codes.device)
    for i in range(k):
        labels[:, i, i : i + t] = codes[:, i]
        mask[:, i, i : i + t] = True
    inputs = torch.cat([torch.full((b, k, 1), bos, dtype=torch.long, device=codes.device), labels[..., :-1]], -1)
    return inputs, labels, mask


def fit(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` cut or zero-padded to ``n`` samples."""
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


@torch.no_grad()
def encode_clips(codec, audio: list[np.ndarray], *, sample_rate: int, clip_seconds: float, batch: int = 16,
                 progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """Codes ``[N, K, T]`` of mono clips (each cut or zero-padded to ``clip_seconds``) with an EnCodec."""
    from tqdm.auto import tqdm

    n = int(round(clip_seconds * sample_rate))
    out = []
    for i in tqdm(range(0, len(audio), batch), desc=desc, disable=not progress, leave=False):
        x = torch.from_numpy(np.stack([fit(a, n) for a in audio[i : i + batch]]).astype(np.float32))
        out.append(codec.encode(x[:, None], bandwidth=None).audio_codes[0])
    return torch.cat(out)
