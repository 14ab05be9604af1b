"""Audio (and text) embedders for FAD and CLAP score, behind one small interface.

Every embedder takes a batch of clips at any sample rate and resamples them itself::

    emb = embedder.embed(audio_batch, sample_rate)          # [N, D], one row per clip
    rows = embedder.fad_embeddings(audio_batch, sample_rate)  # [M, D], the rows FAD is computed on
    txt = embedder.embed_text(prompts)                       # [N, D], joint text-audio models only

``audio_batch`` is a list of 1-D arrays (lengths may differ), a 2-D array [N, T], or MusicGen's
output [N, channels, T] (channels are averaged). What is available:

- ``ClapEmbedder``: LAION CLAP through transformers' ``ClapModel``/``ClapProcessor`` (a local folder
  or a hub id such as ``laion/clap-htsat-unfused`` or ``laion/larger_clap_music`` where a hub is
  reachable). Audio and text. One row per clip: clips longer than the processor's window (10 s)
  are cut into consecutive windows whose embeddings are averaged.
- ``VGGishEmbedder``: the embedding of the original FAD (Kilgour et al. 2019): VGGish's network and
  log-mel frontend written here from the published settings, with weights from a local safetensors
  file (torchvggish's state dict, converted once where a hub is reachable; ``VGGISH_HOWTO``);
  ``EmbedderUnavailable`` otherwise.
- ``EncodecEmbedder``: the continuous encoder output of a model's own EnCodec (before quantization),
  as fadtk's ``encodec`` embedding. Always available offline. FAD uses every frame as a sample
  (the FAD convention for frame-level embedders); ``embed`` averages frames to one row per clip.
- ``ClapMiniEmbedder``: ``clap-mini``, an offline *proxy* for CLAP: a small contrastive text-audio
  model trained here (``train_clap_mini``) on an audiofolder dataset's train split, cached as
  safetensors + JSON, with held-out retrieval recall stored next to it. Its result keys carry
  ``-proxy`` (``fad_clap-mini-proxy``) so it is never mistaken for LAION CLAP.

Numbers from different embedders are not comparable with each other (docs/metrics.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdq._io import atomic_path, atomic_write_text
from kdq.errors import KdqError, bad_value
from kdq.metrics import retrieval_recall
from musicgen.data.audiofolder import load_audio, read_split, resample
from musicgen.train.loop import Objective

__all__ = [
    "AudioEmbedder",
    "ClapEmbedder",
    "ClapMiniConfig",
    "ClapMiniEmbedder",
    "EmbedderError",
    "EmbedderUnavailable",
    "EncodecEmbedder",
    "VGGishEmbedder",
    "train_clap_mini",
]


class EmbedderError(KdqError):
    """Bad input to an embedder (audio batch, sample rate, texts)."""


class EmbedderUnavailable(EmbedderError):
    """An embedder whose weights or package are not on this machine; the message says how to get them."""


AudioBatch = Sequence[np.ndarray] | np.ndarray | torch.Tensor


def _as_clips(audio_batch: AudioBatch) -> list[np.ndarray]:
    if isinstance(audio_batch, torch.Tensor):
        audio_batch = audio_batch.detach().float().cpu().numpy()
    if isinstance(audio_batch, np.ndarray):
        if audio_batch.ndim == 3:  # [N, channels, T]
            audio_batch = audio_batch.mean(axis=1)
        if audio_batch.ndim != 2:
            raise bad_value(
                EmbedderError, "audio_batch.shape", audio_batch.shape, "[N, T] or [N, channels, T]",
                "wrap a single clip as [clip] or clip[None]",
            )
        clips = list(audio_batch)
    else:
        clips = [np.asarray(c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else c) for c in audio_batch]
    if not clips:
        raise bad_value(EmbedderError, "audio_batch", "[]", "at least one clip")
    out = []
    for i, c in enumerate(clips):
        c = np.asarray(c, dtype=np.float32)
        if c.ndim == 2:  # [channels, T]
            c = c.mean(axis=0)
        if c.ndim != 1 or c.shape[0] == 0:
            raise bad_value(EmbedderError, f"audio_batch[{i}].shape", c.shape, "a non-empty 1-D mono clip or [channels, T]")
        if not np.isfinite(c).all():
            raise EmbedderError(f"audio_batch[{i}] has NaN or infinite samples; not allowed: check the generator's output")
        out.append(c)
    return out


class AudioEmbedder:
    """Base class: validation and resampling here, the model in ``_embed_clips``.

    Attributes:
        name: the embedder's name in result keys (``fad_<key>``).
        sample_rate: the rate the model wants; inputs are resampled to it.
        proxy: True for a stand-in trained here (its key then ends in ``-proxy``).
    """

    name: str = "embedder"
    sample_rate: int = 16000
    proxy: bool = False

    @property
    def key(self) -> str:
        """Name used in result keys: ``clap``, ``encodec``, ``vggish``, ``clap-mini-proxy``."""
        return f"{self.name}-proxy" if self.proxy else self.name

    def _prepare(self, audio_batch: AudioBatch, sample_rate: int) -> list[np.ndarray]:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise bad_value(EmbedderError, "sample_rate", sample_rate, "a positive int (Hz)", "e.g. 32000 for MusicGen")
        return [resample(c, int(sample_rate), self.sample_rate) for c in _as_clips(audio_batch)]

    def _embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def embed(self, audio_batch: AudioBatch, sample_rate: int) -> np.ndarray:
        """One embedding per clip, float32 [N, D]."""
        return np.asarray(self._embed_clips(self._prepare(audio_batch, sample_rate)), dtype=np.float32)

    def units(self, audio_batch: AudioBatch, sample_rate: int) -> list[np.ndarray]:
        """Per clip, the rows FAD and KAD are computed on, each [rows_i, D]: one row per clip here; a
        frame-level embedder returns every frame (its ``embed_frames``). Bootstraps resample clips."""
        return [row[None] for row in self.embed(audio_batch, sample_rate)]

    def fad_embeddings(self, audio_batch: AudioBatch, sample_rate: int) -> np.ndarray:
        """The rows FAD's Gaussian is fitted on, [M, D]: every clip's ``units`` stacked."""
        return np.concatenate(self.units(audio_batch, sample_rate))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings [N, D] in the audio embedding space (joint text-audio models only)."""
        raise EmbedderError(f"embedder {self.key!r} has no text side; use a CLAP-style embedder for CLAP score")

    @property
    def has_text(self) -> bool:
        """Whether ``embed_text`` is available (needed for CLAP score)."""
        return type(self).embed_text is not AudioEmbedder.embed_text


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not len(texts):
        raise bad_value(EmbedderError, "texts", texts, "a non-empty list of strings", "wrap one prompt as [prompt]")
    return list(texts)


def _features(out: Any) -> torch.Tensor:
    # transformers 4.x returns a tensor, 5.x a ModelOutput whose pooler_output is the projection.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --------------------------------------------------------------------------------------------- CLAP


class ClapEmbedder(AudioEmbedder):
    """LAION CLAP (transformers ``ClapModel`` + ``ClapProcessor``): audio and text embeddings."""

    name = "clap"

    def __init__(self, model: Any, processor: Any, *, batch_size: int = 8, name: str = "clap") -> None:
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.name = name
        fe = processor.feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.window = int(round(fe.max_length_s * self.sample_rate))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, batch_size: int = 8, **kwargs: Any) -> ClapEmbedder:
        """Load from a local folder or a hub id (``laion/clap-htsat-unfused``, ``laion/larger_clap_music``)."""
        try:
            from transformers import ClapModel, ClapProcessor
        except ImportError as e:  # pragma: no cover - transformers is in the musicgen extra
            raise EmbedderUnavailable("CLAP needs transformers: pip install 'kdq[transformers]'") from e
        try:
            model = ClapModel.from_pretrained(str(path_or_id), use_safetensors=True, **kwargs)
            processor = ClapProcessor.from_pretrained(str(path_or_id), **kwargs)
        except (OSError, ValueError) as e:
            raise EmbedderUnavailable(
                f"path_or_id={str(path_or_id)!r}: could not load a CLAP model and processor ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); pass a local folder written by save_pretrained (e.g. a "
                "snapshot of laion/larger_clap_music copied to this machine)"
            ) from e
        return cls(model, processor, batch_size=batch_size)

    def _windows(self, clip: np.ndarray) -> list[np.ndarray]:
        if len(clip) <= self.window:
            return [clip]
        return [clip[s : s + self.window] for s in range(0, len(clip), self.window) if len(clip) - s >= self.sample_rate // 10]

    @torch.no_grad()
    def _embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        pieces, owner = [], []
        for i, c in enumerate(clips):
            w = self._windows(c)
            pieces += w
            owner += [i] * len(w)
        rows = []
        for s in range(0, len(pieces), self.batch_size):
            inputs = self.processor(audio=pieces[s : s + self.batch_size], sampling_rate=self.sample_rate, return_tensors="pt")
            rows.append(_features(self.model.get_audio_features(**inputs)).float().cpu().numpy())
        per_window = np.concatenate(rows)
        owner_arr = np.array(owner)
        return np.stack([per_window[owner_arr == i].mean(axis=0) for i in range(len(clips))])

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """CLAP text embeddings [N, D]."""
        texts = _check_texts(texts)
        rows = []
        for s in range(0, len(texts), self.batch_size):
            inputs = self.processor(text=texts[s : s + self.batch_size], padding=True, return_tensors="pt")
            rows.append(_features(self.model.get_text_features(**inputs)).float().cpu().numpy())
        return np.concatenate(rows).astype(np.float32)


# ------------------------------------------------------------------------------------------- VGGish

VGGISH_HOWTO = (
    "VGGish weights are not bundled (they come from a model hub). Convert them once on a machine that "
    "can download them: `sd = torch.hub.load_state_dict_from_url('https://github.com/harritaylor/"
    "torchvggish/releases/download/v0.1/vggish-10086976.pth', weights_only=True); "
    "safetensors.torch.save_file(sd, 'vggish.safetensors')`, copy the file here and pass it to "
    "VGGishEmbedder.from_local. Without it, FAD is reported with the other embedders only "
    "(docs/metrics.md)"
)

# VGGish's published input settings (Hershey et al. 2017, the AudioSet release).
VGGISH_RATE = 16000
VGGISH_WINDOW = 400  # 25 ms
VGGISH_HOP = 160  # 10 ms
VGGISH_FFT = 512
VGGISH_MELS = 64
VGGISH_FMIN, VGGISH_FMAX = 125.0, 7500.0
VGGISH_LOG_OFFSET = 0.01
VGGISH_PATCH = 96  # frames per example: 0.96 s, no overlap


def vggish_log_mel(audio: np.ndarray) -> np.ndarray:
    """VGGish's input: log mel magnitudes [frames, 64] of 16 kHz audio.

    Periodic Hann window of 25 ms, hop 10 ms, 512-point FFT magnitude (no centre padding, only whole
    frames), 64 HTK mel bands from 125 to 7500 Hz with triangles linear in mel and the DC bin
    excluded, then ``log(mel + 0.01)``.
    """
    from transformers.audio_utils import mel_filter_bank

    audio = np.asarray(audio, dtype=np.float64)
    if len(audio) < VGGISH_WINDOW:
        return np.zeros((0, VGGISH_MELS))
    n = 1 + (len(audio) - VGGISH_WINDOW) // VGGISH_HOP
    frames = np.lib.stride_tricks.sliding_window_view(audio, VGGISH_WINDOW)[::VGGISH_HOP][:n]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(VGGISH_WINDOW) / VGGISH_WINDOW)
    mag = np.abs(np.fft.rfft(frames * window, VGGISH_FFT))
    fb = mel_filter_bank(
        num_frequency_bins=VGGISH_FFT // 2 + 1, num_mel_filters=VGGISH_MELS, min_frequency=VGGISH_FMIN,
        max_frequency=VGGISH_FMAX, sampling_rate=VGGISH_RATE, mel_scale="htk", triangularize_in_mel_space=True,
    )
    fb[0, :] = 0.0
    return np.log(mag @ fb + VGGISH_LOG_OFFSET)


def vggish_examples(audio: np.ndarray) -> np.ndarray:
    """Non-overlapping 0.96 s patches of ``vggish_log_mel``: [examples, 96, 64] (a partial last patch is dropped)."""
    mel = vggish_log_mel(audio)
    k = len(mel) // VGGISH_PATCH
    return mel[: k * VGGISH_PATCH].reshape(k, VGGISH_PATCH, VGGISH_MELS)


class VGGishNet(nn.Module):
    """The VGGish network (VGG-style: 4 conv blocks, 3 fully connected layers, 128-D output).

    Parameter names follow the torchvggish port (``features.N``, ``embeddings.N``), so its converted
    state dict loads as is. The last layer keeps torchvggish's ReLU (as fadtk's VGGish FAD uses it).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096), nn.ReLU(True),
            nn.Linear(4096, 128), nn.ReLU(True),
        )

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """[B, 1, 96, 64] log-mel patches -> [B, 128]."""
        h = self.features(examples)  # [B, 512, 6, 4]
        # Flatten channels-last, as the TensorFlow original does.
        return self.embeddings(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))


class VGGishEmbedder(AudioEmbedder):
    """VGGish (Hershey et al. 2017), the original FAD embedding: 128-D per 0.96 s patch at 16 kHz.

    Uses the raw 128-D embedding layer (no AudioSet PCA/8-bit postprocessing). FAD uses every patch
    as a sample; ``embed`` averages a clip's patches. Clips shorter than 0.96 s are zero-padded to
    one patch.
    """

    name = "vggish"
    sample_rate = VGGISH_RATE

    def __init__(self, model: VGGishNet, *, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.batch_size = batch_size

    @classmethod
    def from_local(cls, weights: str | Path) -> VGGishEmbedder:
        """Load VGGish from a local safetensors file (torchvggish's state dict; see ``VGGISH_HOWTO``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(weights)
        if not path.is_file():
            raise EmbedderUnavailable(f"weights={str(path)!r} does not exist. {VGGISH_HOWTO}")
        model = VGGishNet()
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise EmbedderUnavailable(f"weights={str(path)!r} is not a readable safetensors file ({e}). {VGGISH_HOWTO}") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise bad_value(
                EmbedderError, "weights", str(path),
                f"a VGGish state dict with torchvggish's names; missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}", "convert the torchvggish checkpoint as VGGISH_HOWTO says",
            )
        return cls(model)

    @torch.no_grad()
    def embed_frames(self, audio_batch: AudioBatch, sample_rate: int) -> list[np.ndarray]:
        """Per-clip patch embeddings, each [patches, 128]."""
        out = []
        for c in self._prepare(audio_batch, sample_rate):
            if len(c) < VGGISH_PATCH * VGGISH_HOP + VGGISH_WINDOW - VGGISH_HOP:
                c = np.pad(c, (0, VGGISH_PATCH * VGGISH_HOP + VGGISH_WINDOW - VGGISH_HOP - len(c)))
            ex = torch.from_numpy(vggish_examples(c)).float()[:, None]
            out.append(torch.cat([self.model(ex[s : s + self.batch_size]) for s in range(0, len(ex), self.batch_size)]).numpy())
        return out

    def _embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        return np.stack([f.mean(axis=0) for f in self.embed_frames(clips, self.sample_rate)])

    def units(self, audio_batch: AudioBatch, sample_rate: int) -> list[np.ndarray]:
        """Every patch of every clip (FAD's convention for VGGish)."""
        return self.embed_frames(audio_batch, sample_rate)


# ------------------------------------------------------------------------------------- codec latents


class EncodecEmbedder(AudioEmbedder):
    """Continuous EnCodec encoder output (before the residual quantizer), one row per frame.

    ``fad_embeddings`` returns every frame of every clip (fadtk's convention for its ``encodec``
    model: many samples per clip, so the covariance is well estimated even from few clips);
    ``embed`` returns the time average per clip.
    """

    name = "encodec"

    def __init__(self, encodec: nn.Module, *, name: str = "encodec") -> None:
        self.model = encodec.eval()
        self.sample_rate = int(encodec.config.sampling_rate)
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EncodecEmbedder:
        """Load an ``EncodecModel`` folder, or take the ``audio_encoder`` of a MusicGen folder."""
        from transformers import AutoConfig, EncodecModel, MusicgenForConditionalGeneration

        try:
            kind = AutoConfig.from_pretrained(str(path)).model_type
        except OSError as e:
            raise EmbedderUnavailable(f"path={str(path)!r}: no config.json of an EnCodec or MusicGen model ({e})") from e
        if kind == "encodec":
            return cls(EncodecModel.from_pretrained(str(path), use_safetensors=True))
        if kind == "musicgen":
            return cls(MusicgenForConditionalGeneration.from_pretrained(str(path), use_safetensors=True).audio_encoder)
        raise bad_value(EmbedderError, "path", str(path), f"an encodec or musicgen folder (got model_type {kind!r})")

    @torch.no_grad()
    def embed_frames(self, audio_batch: AudioBatch, sample_rate: int) -> list[np.ndarray]:
        """Per-clip latent frames, each [frames, hidden]."""
        out = []
        for c in self._prepare(audio_batch, sample_rate):
            x = torch.from_numpy(c)[None, None]
            out.append(self.model.encoder(x)[0].T.float().cpu().numpy())
        return out

    def _embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        return np.stack([f.mean(axis=0) for f in self.embed_frames(clips, self.sample_rate)])

    def units(self, audio_batch: AudioBatch, sample_rate: int) -> list[np.ndarray]:
        """Every latent frame of every clip (fadtk's convention for its encodec model)."""
        return self.embed_frames(audio_batch, sample_rate)


# ------------------------------------------------------------------------- clap-mini (offline proxy)


@dataclass(frozen=True)
class ClapMiniConfig:
    """Plain-data config of ``clap-mini``; round-trips through JSON."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 320  # 50 frames per second
    n_mels: int = 64
    f_min: float = 30.0
    f_max: float = 8000.0
    channels: int = 96
    embed_dim: int = 64
    text_dim: int = 64
    vocab: tuple[str, ...] = ()  # caption words; ids are 1.., 0 is padding/unknown
    crop_s: float = 4.0  # training crop length


class ClapMiniModel(nn.Module):
    """Log-mel conv audio tower and bag-of-words text tower mapped into one L2-normalised space."""

    def __init__(self, cfg: ClapMiniConfig) -> None:
        super().__init__()
        self.cfg = cfg
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(
            num_frequency_bins=cfg.n_fft // 2 + 1, num_mel_filters=cfg.n_mels, min_frequency=cfg.f_min,
            max_frequency=cfg.f_max, sampling_rate=cfg.sample_rate, norm="slaney", mel_scale="slaney",
        )
        self.register_buffer("mel_fb", torch.tensor(fb, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        c = cfg.channels
        self.audio = nn.Sequential(
            nn.Conv1d(cfg.n_mels, c, 5, padding=2), nn.GELU(),
            nn.Conv1d(c, c, 5, padding=4, dilation=2), nn.GELU(),
            nn.Conv1d(c, c, 3, padding=4, dilation=4), nn.GELU(),
        )
        self.audio_proj = nn.Linear(2 * c, cfg.embed_dim)
        self.words = nn.EmbeddingBag(len(cfg.vocab) + 1, cfg.text_dim, mode="mean", padding_idx=0)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(), nn.Linear(cfg.text_dim, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T] waveform -> [B, n_mels, frames], normalised per clip (gain does not matter)."""
        spec = torch.stft(audio, self.cfg.n_fft, self.cfg.hop_length, window=self.window, return_complex=True).abs() ** 2
        mel = torch.log(torch.einsum("bft,fm->bmt", spec, self.mel_fb) + 1e-6)
        return (mel - mel.mean(dim=(1, 2), keepdim=True)) / (mel.std(dim=(1, 2), keepdim=True) + 1e-5)

    def embed_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, frames] -> [B, embed_dim], unit norm."""
        h = self.audio(mel)
        h = torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=-1)
        return nn.functional.normalize(self.audio_proj(h), dim=-1)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] word ids (0 = padding) -> [B, embed_dim], unit norm."""
        return nn.functional.normalize(self.text_proj(self.words(ids)), dim=-1)


def _tokenize(vocab: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
    index = {w: i + 1 for i, w in enumerate(vocab)}
    rows = [[index.get(w, 0) for w in _words(t)] or [0] for t in texts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


class ClapMiniEmbedder(AudioEmbedder):
    """``clap-mini``: the offline CLAP proxy (audio and text). Its result keys end in ``-proxy``."""

    name = "clap-mini"
    proxy = True

    def __init__(self, model: ClapMiniModel, info: dict | None = None) -> None:
        self.model = model.eval()
        self.sample_rate = model.cfg.sample_rate
        self.info = info or {}

    @torch.no_grad()
    def _embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        min_len = self.model.cfg.n_fft
        rows = []
        for c in clips:
            if len(c) < min_len:
                c = np.pad(c, (0, min_len - len(c)))
            rows.append(self.model.embed_mel(self.model.log_mel(torch.from_numpy(c)[None]))[0].numpy())
        return np.stack(rows)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """clap-mini text embeddings [N, embed_dim] (unknown words are ignored)."""
        return self.model.embed_tokens(_tokenize(self.model.cfg.vocab, _check_texts(texts))).numpy()

    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (config, training info, retrieval) atomically."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        doc = {"model": "clap-mini (offline CLAP proxy)", "config": asdict(self.model.cfg), "info": self.info}
        atomic_write_text(out / "config.json", json.dumps(doc, indent=2))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> ClapMiniEmbedder:
        """Load a cache folder written by ``save`` (safetensors + JSON only)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise EmbedderUnavailable(
                f"folder={str(folder)!r} has no clap-mini cache (config.json + model.safetensors); "
                "train one with train_clap_mini(dataset_root, out_dir=folder)"
            )
        doc = json.loads((folder / "config.json").read_text())
        cfg_d = dict(doc["config"])
        cfg_d["vocab"] = tuple(cfg_d["vocab"])
        model = ClapMiniModel(ClapMiniConfig(**cfg_d))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(model, doc.get("info", {}))


def _fingerprint(clips: list, extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for c in clips:
        h.update(f"{c.path.name}|{c.text}|{c.path.stat().st_size}".encode())
    return h.hexdigest()[:16]


def clap_mini_retrieval(
    embedder: AudioEmbedder,
    audio: list[np.ndarray],
    texts: list[str],
    sample_rate: int,
    *,
    attributes: dict[str, list] | None = None,
) -> dict:
    """Held-out retrieval recall of a joint text-audio embedder.

    ``text_to_audio_R@k``: each distinct caption retrieves clips, a hit being a clip with that caption;
    ``audio_to_text_R@k``: each clip ranks the distinct captions. ``chance@k`` is reported alongside
    because captions repeat. With ``attributes`` (e.g. ``{"instrument": [...]}``, one value per clip),
    ``text_to_audio_<name>_R@1`` counts a hit when the top clip shares the caption's attribute value,
    which shows what the model has learned (instrument, tempo, style) separately.
    """
    a = embedder.embed(audio, sample_rate)
    unique = sorted(set(texts))
    t = embedder.embed_text(unique)
    t2a = retrieval_recall(t, a, query_labels=unique, key_labels=texts)
    a2t = retrieval_recall(a, t, query_labels=texts, key_labels=unique)
    out = {
        "n_clips": len(texts),
        "n_captions": len(unique),
        **{f"text_to_audio_{k}": v for k, v in t2a.items()},
        **{f"audio_to_text_{k}": v for k, v in a2t.items()},
    }
    for name, values in (attributes or {}).items():
        of_caption = dict(zip(texts, values))
        r = retrieval_recall(t, a, query_labels=[of_caption[u] for u in unique], key_labels=list(values), ks=(1,))
        out[f"text_to_audio_{name}_R@1"], out[f"text_to_audio_{name}_chance@1"] = r["R@1"], r["chance@1"]
    return out


def train_clap_mini(
    root: str | Path,
    *,
    out_dir: str | Path | None = None,
    train_split: str = "train",
    eval_split: str | None = "test",
    steps: int = 800,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    spec_augment: bool = False,
    seed: int = 0,
    max_seconds: float | None = None,
    config: ClapMiniConfig | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> ClapMiniEmbedder:
    """Train ``clap-mini`` on ``root/train_split`` (held-in) and report retrieval on ``root/eval_split``.

    The example's training loop (``musicgen.train.loop``) with ``ClapObjective``; AdamW, cosine decay
    of the learning rate. If ``out_dir`` holds a cache trained on the same data and settings it is
    loaded instead (its training run is kept in ``out_dir/run``).

    Args:
        root: audiofolder dataset root (``musicgen.data.audiofolder`` layout).
        out_dir: cache folder (``model.safetensors`` + ``config.json``); None keeps it in memory.
        train_split: split to train on.
        eval_split: held-out split for retrieval recall (None to skip).
        steps: optimiser steps (training stops earlier at ``max_seconds``).
        batch_size: clips per step.
        lr: AdamW learning rate (cosine decay).
        weight_decay: AdamW weight decay.
        spec_augment: mask a random band of up to 8 mel bins and a random span of up to 10% of the
            frames in each training crop.
        seed: seeds the model's initialisation, the data order and the crops.
        max_seconds: wall-clock cap on training.
        config: model sizes; its vocabulary is replaced by the training captions' words.
        progress: show a tqdm bar.
        num_threads: torch intra-op threads while training (restored after); 1 is much faster than 2
            for these small convolutions on a busy machine.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                    "spec_augment": spec_augment, "seed": seed, "split": train_split}
        return _train_clap_mini(root, out_dir, eval_split, settings, max_seconds, config, progress)
    finally:
        torch.set_num_threads(previous)


class ClapObjective(Objective):
    """clap-mini's loss for the training loop: symmetric InfoNCE (CLIP) over random ``crop_s`` crops of
    the precomputed log-mels; clips sharing a caption are positives of each other (soft targets), so
    repeated captions do not fight. A contrastive loss is over the whole batch: one micro-batch per step."""

    name = "clap-mini"

    def __init__(self, mels: list[torch.Tensor], ids: torch.Tensor, labels: torch.Tensor, *, crop: int,
                 spec_augment: bool):
        self.mels, self.ids, self.labels, self.crop, self.spec_augment = mels, ids, labels, crop, spec_augment

    def __len__(self) -> int:
        return len(self.mels)

    def settings(self) -> dict:
        return {"clips": len(self.mels), "crop": self.crop, "spec_augment": self.spec_augment}

    def loss(self, model, indices: list[int], *, step: int, rngs: list, log: bool) -> tuple[torch.Tensor, dict]:
        batch = torch.stack([_crop(self.mels[i], self.crop, g) for i, g in zip(indices, rngs)])
        if self.spec_augment:
            batch = torch.stack([_spec_augment(m, g) for m, g in zip(batch, rngs)])
        a, t = model.embed_mel(batch), model.embed_tokens(self.ids[indices])
        same = (self.labels[indices][:, None] == self.labels[indices][None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        logits = model.logit_scale.exp().clamp(max=100) * a @ t.T
        loss = 0.5 * (-(target * logits.log_softmax(dim=1)).sum(1).mean() - (target * logits.T.log_softmax(dim=1)).sum(1).mean())
        return loss, {}


def _train_clap_mini(root, out_dir, eval_split, settings, max_seconds, config, progress) -> ClapMiniEmbedder:
    import tempfile

    from musicgen.config import TrainConfig
    from musicgen.train.loop import train

    train_split, steps, batch_size, seed = settings["split"], settings["steps"], settings["batch_size"], settings["seed"]
    clips = read_split(root, train_split)
    base = config or ClapMiniConfig()
    settings = {**settings, "config": {k: v for k, v in asdict(base).items() if k != "vocab"}}
    fp = _fingerprint(clips, settings)
    if out_dir is not None and (Path(out_dir) / "config.json").is_file():
        cached = ClapMiniEmbedder.load(out_dir)
        if cached.info.get("fingerprint") == fp:
            return cached
    vocab = tuple(sorted({w for c in clips for w in _words(c.text)}))
    cfg = ClapMiniConfig(**{**asdict(base), "vocab": vocab})
    torch.manual_seed(seed)
    model = ClapMiniModel(cfg)
    with torch.no_grad():
        mels = [model.log_mel(torch.from_numpy(_padded(load_audio(c.path, cfg.sample_rate), cfg.n_fft))[None])[0] for c in clips]
    captions = [c.text for c in clips]
    caption_id = {t: i for i, t in enumerate(sorted(set(captions)))}
    objective = ClapObjective(mels, _tokenize(vocab, captions), torch.tensor([caption_id[t] for t in captions]),
                              crop=max(8, int(cfg.crop_s * cfg.sample_rate / cfg.hop_length)),
                              spec_augment=settings["spec_augment"])
    train_cfg = TrainConfig(steps=steps, micro_batch=min(batch_size, len(clips)), lr=settings["lr"], warmup_steps=0,
                            weight_decay=settings["weight_decay"], betas=(0.9, 0.999), max_grad_norm=0.0, seed=seed,
                            checkpoint_every=max(steps, 1))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clap-mini-") as tmp:
        run = train(model, objective, train_cfg, Path(out_dir) / "run" if out_dir is not None else Path(tmp),
                    progress=progress, max_seconds=max_seconds)
    model.eval()
    info: dict[str, Any] = {
        "fingerprint": fp, "dataset": str(root), "train_split": train_split, "n_train_clips": len(clips),
        "steps_done": run["steps_done"], "train_seconds": round(time.perf_counter() - start, 2),
        "final_loss": run["final_loss"], **{k: v for k, v in settings.items() if k != "config"},
    }
    embedder = ClapMiniEmbedder(model, info)
    if eval_split is not None:
        held = read_split(root, eval_split)
        audio = [load_audio(c.path, cfg.sample_rate) for c in held]
        attrs = {k: [c.meta[k] for c in held] for k in ("instrument", "tempo", "source") if all(k in c.meta for c in held)}
        info["retrieval"] = {"split": eval_split,
                             **clap_mini_retrieval(embedder, audio, [c.text for c in held], cfg.sample_rate, attributes=attrs)}
    if out_dir is not None:
        embedder.save(out_dir)
    return embedder


def _padded(x: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x, (0, n - len(x))) if len(x) < n else x


def _spec_augment(mel: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mask a random band of up to 8 mel bins and a random span of up to 10% of the frames."""
    mel = mel.clone()
    n_mels, frames = mel.shape

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=g))

    f = draw(9)
    f0 = draw(n_mels - f + 1)
    mel[f0 : f0 + f] = 0.0
    t = draw(frames // 10 + 1)
    t0 = draw(frames - t + 1)
    mel[:, t0 : t0 + t] = 0.0
    return mel


def _crop(mel: torch.Tensor, frames: int, g: torch.Generator) -> torch.Tensor:
    if mel.shape[-1] < frames:
        mel = mel.repeat(1, -(-frames // mel.shape[-1]))
    start = int(torch.randint(mel.shape[-1] - frames + 1, (1,), generator=g))
    return mel[:, start : start + frames]
