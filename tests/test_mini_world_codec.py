"""Mini-world codec training: quantizer mechanics, anti-collapse, metrics, save/load and exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musicgen.config import CodecConfig, ConfigError, TrainConfig
from musicgen.data.tokens import encode_clips
from musicgen.models.codec import build_codec, codebook_stats, kmeans_init, rvq_train_forward
from musicgen.train.loop import train
from musicgen.train.objectives import CodecObjective, SpectralLoss

TOY = CodecConfig(num_filters=4, hidden_size=8, codebook_size=16, warmup_ae_steps=4, crop_seconds=0.2, kmeans_clips=6,
                  mel_ffts=(128, 256), train=TrainConfig(steps=16, micro_batch=4, lr=2e-3, warmup_steps=2, betas=(0.9, 0.99),
                                                         weight_decay=0.0, max_grad_norm=10.0, checkpoint_every=8))


def encode(model, audio: torch.Tensor) -> torch.Tensor:
    return encode_clips(model, list(audio.numpy()), sample_rate=8000, clip_seconds=audio.shape[1] / 8000)


def toy_audio(n: int = 8, seconds: float = 0.5, sr: int = 8000, seed: int = 0) -> torch.Tensor:
    """Chords of random notes with decaying envelopes: music-like and cheap."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    out = []
    for _ in range(n):
        x = np.zeros_like(t)
        for _ in range(3):
            f = 220 * 2 ** (rng.integers(0, 24) / 12)
            onset = rng.uniform(0, seconds / 2)
            env = np.where(t >= onset, np.exp(-(t - onset) * 4), 0.0)
            x += env * np.sin(2 * np.pi * f * t)
        out.append(0.2 * x / np.abs(x).max())
    return torch.tensor(np.stack(out), dtype=torch.float32)


def test_config_checks_frame_rate_and_codebook():
    with pytest.raises(ConfigError, match="50"):
        CodecConfig(upsampling_ratios=(8, 5, 4, 4))
    with pytest.raises(ConfigError, match="power of two"):
        CodecConfig(codebook_size=1000)
    with pytest.raises(ConfigError, match="warmup_ae_steps"):
        CodecConfig(warmup_ae_steps=16, train=TOY.train)
    model = build_codec(TOY)
    assert model.config.frame_rate == 50 and model.quantizer.get_num_quantizers_for_bandwidth(model.config.target_bandwidths[-1]) == 4


def test_weight_norm_reinit_gives_kaiming_scale():
    model = build_codec(TOY)
    first = model.encoder.layers[0].conv
    w = first.weight  # effective weight through the parametrization
    fan_in = w[0].numel()
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.35)
    last = model.decoder.layers[-1].conv.weight
    assert last.std().item() < 0.2 * math.sqrt(2 / last[0].numel())


def test_nearest_code_agrees_with_transformers_quantizer():
    model = build_codec(TOY)
    z = torch.randn(3, TOY.hidden_size, 7)
    kmeans_init(model, torch.randn(200, TOY.hidden_size))
    _, _, codes, _ = rvq_train_forward(model, z, train=False)
    ref = model.quantizer.encode(z)  # (codebooks, batch, frames)
    assert torch.equal(codes, ref)


def test_straight_through_and_commitment_gradients():
    model = build_codec(TOY)
    kmeans_init(model, torch.randn(200, TOY.hidden_size))
    z = torch.randn(2, TOY.hidden_size, 5, requires_grad=True)
    zq, commit, codes, _ = rvq_train_forward(model, z, train=False)
    q = model.quantizer.decode(codes)
    assert torch.allclose(zq, q, atol=1e-5)  # forward value is the quantized latent
    (zq * 3.0).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))  # identity gradient (straight-through)
    z.grad = None
    zq, commit, _, _ = rvq_train_forward(model, z, train=False)
    commit.backward()
    # Commitment pulls each latent towards its (first-codebook) code: a small step lowers the loss.
    with torch.no_grad():
        z2 = z - 0.1 * z.grad
        _, commit2, _, _ = rvq_train_forward(model, z2, train=False)
    assert commit2 < commit


def test_ema_and_dead_code_restart():
    model = build_codec(TOY)
    cb = model.quantizer.layers[0].codebook
    # All codes far away except code 0: every frame picks code 0, the others are dead.
    cb.embed.fill_(100.0)
    cb.embed[0] = 0.0
    cb.embed_avg.copy_(cb.embed)
    cb.cluster_size.fill_(0.0)
    z = torch.randn(4, TOY.hidden_size, 10)
    _, _, codes, restarted = rvq_train_forward(model, z, train=True, decay=0.5, generator=torch.Generator().manual_seed(0))
    assert (codes[0] == 0).all() and restarted >= TOY.codebook_size - 1
    frames = z.permute(0, 2, 1).reshape(-1, TOY.hidden_size)
    # Restarted codes are batch frames; the live code moved towards the batch mean by EMA.
    d = (cb.embed[1:, None] - frames[None]).abs().amax(-1).min(1).values
    assert torch.all(d < 1e-6)
    _, _, codes2, _ = rvq_train_forward(model, z, train=False)
    assert codebook_stats(codes2, TOY.codebook_size)["perplexity"][0] > 4


def test_kmeans_init_reduces_residual_per_codebook():
    model = build_codec(TOY)
    left = kmeans_init(model, torch.randn(300, TOY.hidden_size))
    assert all(b < a for a, b in zip(left, left[1:])) and left[0] < 1.0


def test_codebook_stats_extremes():
    k = 16
    uniform = torch.arange(k).repeat(4, 10)
    assert codebook_stats(uniform, k)["perplexity"] == [16.0] * 4
    single = torch.zeros(4, 50, dtype=torch.long)
    stats = codebook_stats(single, k)
    assert stats["perplexity"] == [1.0] * 4 and stats["usage"] == [round(1 / k, 3)] * 4


def test_evaluate_codec_reports_pitch_against_the_score():
    from musicgen.eval.codec import evaluate_codec

    sr, t = 8000, np.arange(8000) / 8000
    clips = torch.tensor(np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in (440.0, 261.63)]), dtype=torch.float32)
    notes = [[[69, 0.0, 1.0]], [[60, 0.0, 1.0]]]  # A4 and C4, sounding throughout
    figures = evaluate_codec(build_codec(TOY), clips, sample_rate=sr, codebook_size=TOY.codebook_size, notes=notes)
    assert figures["midi_agreement"]["original"] > 0.95  # the renders agree with their scores
    assert 0 <= figures["midi_agreement"]["reconstruction"] <= 1
    assert figures["clips"] == 2 and len(figures["perplexity"]) == 4


@pytest.mark.parametrize("stft", [(), (256,)])
def test_spectral_loss_zero_on_equal_and_differentiable(stft):
    loss = SpectralLoss(8000, mel_ffts=(128, 256), stft_ffts=stft, stft_weight=1.0)
    x = toy_audio(2, 0.25)
    assert float(loss(x, x)) == 0.0
    y = (0.5 * x).requires_grad_(True)
    val = loss(y, x)
    val.backward()
    assert float(val.detach()) > 0 and y.grad.abs().sum() > 0


def test_toy_training_uses_all_codebooks_saves_and_resumes(tmp_path):
    from transformers import EncodecModel

    from musicgen.train.loop import read_curve

    audio = toy_audio(8)
    model = build_codec(TOY)
    train(model, CodecObjective(TOY, audio), TOY.train, tmp_path / "a", progress=False)
    curve = read_curve(tmp_path / "a" / "curve.jsonl")
    assert np.mean([e["loss"] for e in curve[-4:]]) < np.mean([e["loss"] for e in curve[:4]])
    codes = encode(model, toy_audio(4, seed=1))
    stats = codebook_stats(codes.transpose(0, 1), TOY.codebook_size)
    assert all(p > 2.0 for p in stats["perplexity"]), stats  # no residual codebook collapsed to one code
    model.save_pretrained(tmp_path / "a" / "model")
    loaded = EncodecModel.from_pretrained(tmp_path / "a" / "model")
    assert torch.equal(encode(loaded, audio[:2]), encode(model, audio[:2]))
    # Stopped after its first step, then resumed in a fresh process: same weights and codebooks (k-means at
    # the end of the warm-up, EMA updates, restarts) as the uninterrupted run.
    stopped = train(build_codec(TOY), CodecObjective(TOY, audio), TOY.train, tmp_path / "b", progress=False, max_seconds=0.0)
    b = build_codec(TOY)
    summary = train(b, CodecObjective(TOY, audio), TOY.train, tmp_path / "b", progress=False)
    assert stopped["steps_done"] == 1 and summary["resumed_from"] == 1
    for (name, p), q in zip(model.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_log_weight_zero_leaves_linear_magnitudes_only():
    x, y = toy_audio(2, 0.25), toy_audio(2, 0.25, seed=3)
    lin = SpectralLoss(8000, mel_ffts=(128, 256), log_weight=0.0)
    both = SpectralLoss(8000, mel_ffts=(128, 256), log_weight=1.0)
    plain = sum(torch.nn.functional.l1_loss(torch.einsum("bft,fm->bmt", lin.magnitude(a, n), getattr(lin, f"fb{n}")),
                                            torch.einsum("bft,fm->bmt", lin.magnitude(b, n), getattr(lin, f"fb{n}")))
                for n in (128, 256) for a, b in [(x, y)]) / 2
    assert float(lin(x, y)) == pytest.approx(float(plain), rel=1e-6)
    assert float(both(x, y)) > float(lin(x, y))
    with pytest.raises(ConfigError, match="mel_log_weight"):
        CodecConfig(mel_log_weight=(0.0,))
    with pytest.raises(ConfigError, match="mel_log_weight"):
        CodecConfig(mel_log_weight=(0.0, -1.0))


def test_decoder_only_phase_freezes_encoder_and_codebooks():
    """After the warm-up only the decoder moves: the codes a frozen encoder and k-means codebooks give
    cannot collapse (EMA updates under a moving encoder collapsed them on the mini world)."""
    from musicgen.train.loop import generator

    cfg = TOY
    assert cfg.decoder_only_after_warmup  # the recipe's default
    model = build_codec(cfg)
    objective = CodecObjective(cfg, toy_audio(8))
    objective.before_step(model, cfg.warmup_ae_steps)  # k-means on the warm-up's encoder
    after_kmeans = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(cfg.warmup_ae_steps, cfg.warmup_ae_steps + 3):
        loss, _ = objective.loss(model, [0, 1, 2, 3], step=step, rngs=[generator(0, step, i) for i in range(4)], log=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    for name, before in after_kmeans.items():
        same = torch.equal(state[name], before)
        assert same == (name.startswith("encoder.") or name.startswith("quantizer.")), name
