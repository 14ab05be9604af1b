"""A small EnCodec (transformers ``EncodecModel``, 50 Hz, residual codebooks) and its quantizer's training side.

transformers' EnCodec only runs inference: its residual vector quantizer has no gradient path and no
codebook learning. This module adds what training needs around the unchanged model, so that what is
saved is a plain ``EncodecModel`` folder that ``from_pretrained`` loads and MusicGen uses (the loss
and the schedule are ``musicgen.train.objectives.CodecObjective``):

* Weight-norm re-initialisation (``reinit_weight_norm``): transformers' init does not reach the
  parametrized convolutions; left at PyTorch defaults the autoencoder collapses to an average
  spectrum. Each conv's direction gets a Kaiming-normal draw, its magnitude is that draw's norm, the
  bias is zero and the last decoder conv is scaled down by 10.
* Residual k-means initialisation (``kmeans_init``): codebook ``i`` is fitted by k-means (scipy, seeded
  from random frames) on the residual left by codebooks ``< i`` over latents of training clips.
* Quantized training (``rvq_train_forward``): for codebook ``i`` with residual ``r_i`` and nearest
  code ``q_i``, ``r_{i+1} = r_i - q_i``; the decoder sees ``z + sg(sum_i q_i - z)`` (straight-through);
  codebooks are updated by EMA (Laplace-smoothed counts) and codes whose EMA usage falls below
  ``dead_ratio * frames / K`` are restarted from random frames of the batch. Commitment loss
  ``sum_i mean((r_i - sg(q_i))^2) / mean(sg(z)^2)``: dividing by the latent energy stops the encoder
  from shrinking its latents to cheat the loss, which made residual codebooks collapse. With quantizer
  dropout only the first ``n`` codebooks are used for a step (EnCodec, SoundStream).

Checks (``codebook_stats``): per-codebook usage and perplexity ``exp(H(code histogram))``; collapse
shows as perplexity near 1 on the residual codebooks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from musicgen.config import CodecConfig


def encodec_config(cfg: CodecConfig):
    """The transformers ``EncodecConfig`` for ``cfg`` (MusicGen-style: non-causal, no normalisation)."""
    from transformers import EncodecConfig

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


def build_codec(cfg: CodecConfig, *, seed: int = 0):
    """A freshly initialised ``EncodecModel`` for ``cfg`` with the weight-norm fix applied."""
    from transformers import EncodecModel

    torch.manual_seed(seed)
    model = EncodecModel(encodec_config(cfg))
    reinit_weight_norm(model, seed=seed)
    return model


# ---------------------------------------------------------------------------------------------- RVQ
def _codebooks(model) -> list:
    return [layer.codebook for layer in model.quantizer.layers]


def _nearest(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``embed`` (K, D) for each row of ``x`` (N, D)."""
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None]
    return d.argmin(1)


@torch.no_grad()
def kmeans_init(model, latents: torch.Tensor, *, seed: int = 0, iters: int = 10, minit: str = "points") -> list[float]:
    """Fit each codebook by k-means on the residual of the previous ones (in place).

    ``latents``: (frames, dim). Returns the relative residual energy after each codebook. Centroids
    start from random frames (``minit="points"``): scipy's k-means++ costs O(K^2 N D) and took
    4.5 minutes for K=1024 on 9,600 frames, against about 1 s.
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
        centroids, _ = kmeans2(data, k, iter=iters, minit=minit, seed=seed + i, missing="warn")
        emb = torch.tensor(centroids, dtype=torch.float32)
        cb.embed.copy_(emb)
        cb.embed_avg.copy_(emb)
        cb.cluster_size.fill_(1.0)
        idx = _nearest(torch.tensor(residual, dtype=torch.float32), emb)
        residual = residual - emb[idx].double().numpy()
        left.append(float((residual**2).mean()) / max(energy0, 1e-12))
    return left


def rvq_train_forward(
    model, z: torch.Tensor, *, train: bool, decay: float = 0.95, dead_ratio: float = 0.1, generator=None,
    active: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Residual quantization with straight-through gradients, EMA codebook updates and restarts.

    Args:
        model: the ``EncodecModel`` whose codebook buffers are used (and updated when ``train``).
        z: encoder latents (batch, dim, frames).
        train: update codebooks by EMA and restart dead codes.
        generator: draws the frames that restart dead codes.
        active: use only the first ``active`` codebooks (quantizer dropout); None: all.

    Returns:
        (quantized latents with straight-through gradient (batch, dim, frames), commitment loss,
        codes (active codebooks, batch, frames), number of restarted codes).
    """
    b, d, t = z.shape
    flat = z.permute(0, 2, 1).reshape(-1, d)
    residual = flat.detach()
    quantized = torch.zeros_like(residual)
    commit = z.new_zeros(())
    energy = flat.detach().pow(2).mean().clamp_min(1e-8)
    codes = []
    restarted = 0
    for cb in _codebooks(model)[:active]:
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


@torch.no_grad()
def decode(model, codes: torch.Tensor) -> torch.Tensor:
    """Audio (clips, samples) from codes (clips, codebooks, frames) through the HF ``decode`` API."""
    return model.decode(codes[None], [None]).audio_values[:, 0]


