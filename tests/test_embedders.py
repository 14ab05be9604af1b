"""musicgen.eval.embedders and musicgen.eval.metrics on tiny random models and synthetic audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kdq.metrics import frechet_distance
from musicgen.data.audiofolder import resample, write_metadata
from musicgen.eval.embedders import (
    ClapEmbedder,
    ClapMiniEmbedder,
    EmbedderError,
    EmbedderUnavailable,
    EncodecEmbedder,
    VGGishEmbedder,
    VGGishNet,
    train_clap_mini,
    vggish_examples,
    vggish_log_mel,
)
from musicgen.eval.metrics import evaluate, offline_embedders
from musicgen.evaluate import main
from musicgen.models.tiny import build_tiny_musicgen, build_word_tokenizer, save_tiny_musicgen

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: one intra-op thread is far faster than two on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sine(freq: float, seconds: float = 1.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float = 1.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).normal(size=int(seconds * sr))).astype(np.float32)


def assert_sine_test(embedder, sr: int = SR) -> None:
    """A 440 Hz sine is nearer to a 445 Hz sine than to noise (Euclidean, per-clip embeddings)."""
    e = embedder.embed([sine(440, sr=sr), sine(445, sr=sr), noise(sr=sr)], sr)
    assert np.linalg.norm(e[0] - e[1]) < np.linalg.norm(e[0] - e[2])


# ------------------------------------------------------------------------------------------ CLAP


@pytest.fixture(scope="module")
def tiny_clap_dir(tmp_path_factory) -> Path:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tok = build_word_tokenizer()
    cfg = ClapConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=72, pad_token_id=0, projection_dim=16),
        audio_config=dict(patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2], hidden_size=32,
                          projection_dim=16, num_classes=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_clap")
    ClapModel(cfg).save_pretrained(out)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"), tokenizer=tok).save_pretrained(out)
    return out


def test_clap_loads_from_folder_and_matches_direct_model_calls(tiny_clap_dir):
    emb = ClapEmbedder.from_pretrained(tiny_clap_dir)
    assert (emb.sample_rate, emb.key, emb.has_text) == (48000, "clap", True)
    clip = sine(330, seconds=1.5, sr=32000)
    got = emb.embed([clip], 32000)
    # Reference: resample by hand and call the processor and model directly.
    x = resample(clip, 32000, 48000)
    inputs = emb.processor(audio=[x], sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        out = emb.model.get_audio_features(**inputs)
    ref = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    texts = ["a slow piano chorale", "bright organ", "a slow piano chorale"]
    t = emb.embed_text(texts)
    assert t.shape == (3, 16) and np.allclose(t[0], t[2]) and not np.allclose(t[0], t[1])


def test_clap_long_clip_is_the_mean_of_its_windows(tiny_clap_dir):
    emb = ClapEmbedder.from_pretrained(tiny_clap_dir)
    first, second = sine(220, 10.0, 48000), noise(4.0, 48000)
    whole = emb.embed([np.concatenate([first, second])], 48000)[0]
    parts = emb.embed([first, second], 48000)
    np.testing.assert_allclose(whole, parts.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_clap_sine_test(tiny_clap_dir):
    assert_sine_test(ClapEmbedder.from_pretrained(tiny_clap_dir))


def test_clap_missing_folder_is_unavailable(tmp_path):
    with pytest.raises(EmbedderUnavailable, match="save_pretrained"):
        ClapEmbedder.from_pretrained(tmp_path / "nope")


# ----------------------------------------------------------------------------------------- codec


@pytest.fixture(scope="module")
def tiny_codec():
    return EncodecEmbedder(build_tiny_musicgen(0).audio_encoder)


def test_codec_latents_frames_and_means(tiny_codec):
    assert tiny_codec.sample_rate == 32000
    clips = [sine(440, 1.0, 32000), noise(0.5, 32000)]
    frames = tiny_codec.embed_frames(clips, 32000)
    with torch.no_grad():
        direct = tiny_codec.model.encoder(torch.from_numpy(clips[0])[None, None])[0].T.numpy()
    np.testing.assert_allclose(frames[0], direct, rtol=1e-6)
    assert [f.shape for f in frames] == [(50, 16), (25, 16)]  # 50 frames per second, hidden 16
    np.testing.assert_allclose(tiny_codec.embed(clips, 32000), np.stack([f.mean(0) for f in frames]), rtol=1e-6)
    assert tiny_codec.fad_embeddings(clips, 32000).shape == (75, 16)


def test_codec_resamples_its_input(tiny_codec):
    clip = sine(440, 1.0, 16000)
    np.testing.assert_allclose(tiny_codec.embed([clip], 16000), tiny_codec.embed([resample(clip, 16000, 32000)], 32000))


def test_codec_sine_test(tiny_codec):
    assert_sine_test(tiny_codec)


def test_codec_from_musicgen_folder(tmp_path, tiny_codec):
    save_tiny_musicgen(tmp_path / "mg", seed=0)
    loaded = EncodecEmbedder.from_pretrained(tmp_path / "mg")
    clip = [sine(300, 0.4, 32000)]
    np.testing.assert_allclose(loaded.embed(clip, 32000), tiny_codec.embed(clip, 32000), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "rate", "match"),
    [
        ([np.zeros(100)], 0, "sample_rate=0"),
        ([], SR, "at least one clip"),
        ([np.array([0.0, np.nan, 0.1] * 100)], SR, "NaN"),
        (np.zeros((2, 3, 4, 5)), SR, "audio_batch.shape"),
    ],
)
def test_bad_audio_batches(tiny_codec, batch, rate, match):
    with pytest.raises(EmbedderError, match=match):
        tiny_codec.embed(batch, rate)


def test_musicgen_shaped_batch_averages_channels(tiny_codec):
    stereo = np.stack([sine(440, 0.5, 32000), sine(440, 0.5, 32000) * 0.0])[None]  # [1, 2, T]
    np.testing.assert_allclose(tiny_codec.embed(stereo, 32000), tiny_codec.embed([sine(440, 0.5, 32000) / 2], 32000))


def test_codec_has_no_text_side(tiny_codec):
    assert not tiny_codec.has_text
    with pytest.raises(EmbedderError, match="no text side"):
        tiny_codec.embed_text(["x"])


# ---------------------------------------------------------------------------------------- VGGish


def test_vggish_unavailable_says_how(tmp_path):
    with pytest.raises(EmbedderUnavailable, match="does not exist.*safetensors"):
        VGGishEmbedder.from_local(tmp_path / "vggish.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbedderUnavailable, match="not a readable safetensors"):
        VGGishEmbedder.from_local(tmp_path / "junk.safetensors")


def test_vggish_frontend_frames_and_known_tone():
    x = sine(1000.0, 2.0)
    mel = vggish_log_mel(x)
    assert mel.shape == (1 + (len(x) - 400) // 160, 64)
    # A 1 kHz tone peaks in the HTK mel band whose centre is nearest 1 kHz.
    mel_hz = 1127.0 * np.log1p(np.array([125.0, 7500.0]) / 700.0)
    centres = 700.0 * np.expm1(np.linspace(*mel_hz, 66)[1:-1] / 1127.0)
    assert int(np.argmax(mel.mean(axis=0))) == int(np.argmin(np.abs(centres - 1000.0)))
    assert vggish_examples(x).shape == (2, 96, 64)  # 198 frames -> 2 whole 0.96 s patches


@pytest.fixture(scope="module")
def vggish_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vggish") / "vggish.safetensors"
    save_file({k: v.contiguous() for k, v in VGGishNet().state_dict().items()}, str(path))
    return path


def test_vggish_loads_torchvggish_layout_and_embeds_patches(vggish_file):
    emb = VGGishEmbedder.from_local(vggish_file)
    clips = [sine(440, 2.0, 32000), noise(0.5, 32000)]  # resampled to 16 kHz; short clip padded
    frames = emb.embed_frames(clips, 32000)
    assert [f.shape for f in frames] == [(2, 128), (1, 128)]
    assert emb.fad_embeddings(clips, 32000).shape == (3, 128)
    np.testing.assert_allclose(emb.embed(clips, 32000)[0], frames[0].mean(axis=0), rtol=1e-6)
    assert_sine_test(emb)


def test_vggish_wrong_state_dict_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EmbedderError, match="torchvggish's names"):
        VGGishEmbedder.from_local(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------------- clap-mini

PITCH = {"low": (150.0, 300.0), "high": (800.0, 1600.0)}
PULSE = {"slow": 2.0, "fast": 8.0}


def write_tones(root: Path, split: str, per_class: int, seed: int, seconds: float = 2.0) -> None:
    """Captioned synthetic tones: pitch range x pulse rate, random frequency, phase and gain."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    rows = []
    (root / split).mkdir(parents=True, exist_ok=True)
    for pitch, (lo, hi) in PITCH.items():
        for pulse, rate in PULSE.items():
            for i in range(per_class):
                env = 0.1 + 0.9 * (np.sin(2 * np.pi * (rate * t + rng.uniform())) > 0)
                x = rng.uniform(0.2, 0.6) * env * np.sin(2 * np.pi * rng.uniform(lo, hi) * t)
                x += 0.02 * rng.normal(size=t.shape)
                name = f"{pitch}_{pulse}_{i}.wav"
                sf.write(root / split / name, x.astype(np.float32), SR)
                rows.append({"file_name": name, "text": f"a {pitch} pitched tone with {pulse} pulses", "tempo": pulse})
    write_metadata(root, split, rows)


@pytest.fixture(scope="module")
def tones_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tones")
    write_tones(root, "train", 12, seed=0)
    write_tones(root, "test", 5, seed=1)
    return root


@pytest.fixture(scope="module")
def clap_mini(tones_root) -> ClapMiniEmbedder:
    return train_clap_mini(tones_root, out_dir=tones_root / "cache", steps=150, batch_size=16, progress=False, num_threads=1)


def test_clap_mini_beats_chance_on_held_out_clips(clap_mini):
    r = clap_mini.info["retrieval"]
    assert (r["split"], r["n_clips"], r["n_captions"]) == ("test", 20, 4)
    assert r["text_to_audio_chance@1"] == pytest.approx(0.25) and r["audio_to_text_chance@1"] == pytest.approx(0.25)
    assert r["text_to_audio_R@1"] >= 0.5  # 2x chance; 0.75-1.0 over seeds 0-3
    assert r["audio_to_text_R@1"] >= 0.6  # 2.4x chance; 0.85-0.9 over seeds 0-3
    # Per-attribute recall (metadata "tempo" = pulse rate): 2 values, chance 10/20 clips.
    assert r["text_to_audio_tempo_chance@1"] == pytest.approx(0.5)
    assert r["text_to_audio_tempo_R@1"] >= r["text_to_audio_R@1"]  # a caption hit is also a tempo hit


def test_clap_mini_is_named_a_proxy_and_caches(clap_mini, tones_root):
    assert clap_mini.key == "clap-mini-proxy" and clap_mini.proxy
    loaded = ClapMiniEmbedder.load(tones_root / "cache")
    audio = [sine(200), noise()]
    np.testing.assert_allclose(loaded.embed(audio, SR), clap_mini.embed(audio, SR), rtol=1e-6)
    np.testing.assert_allclose(loaded.embed_text(["a low tone"]), clap_mini.embed_text(["a low tone"]), rtol=1e-6)
    assert loaded.info["retrieval"] == clap_mini.info["retrieval"]
    # Same data and settings: the cache is reused, not retrained.
    again = train_clap_mini(tones_root, out_dir=tones_root / "cache", steps=150, batch_size=16, progress=False)
    assert again.info["train_seconds"] == clap_mini.info["train_seconds"]
    with pytest.raises(EmbedderUnavailable, match="train_clap_mini"):
        ClapMiniEmbedder.load(tones_root / "missing")


def test_clap_mini_sine_test(clap_mini):
    assert_sine_test(clap_mini)


# -------------------------------------------------------------------------------------- evaluate


def test_evaluate_names_embedders_and_orders_sets(clap_mini, tiny_codec, tmp_path):
    rng = np.random.default_rng(7)
    prompts = [f"a {p} pitched tone with {q} pulses" for p in PITCH for q in PULSE] * 3
    t = np.arange(2 * SR) / SR

    def render(prompt, wrong=False):
        p, q = prompt.split()[1], prompt.split()[-2]
        if wrong:  # the other pitch range and pulse rate
            p, q = ("high" if p == "low" else "low"), ("fast" if q == "slow" else "slow")
        env = 0.1 + 0.9 * (np.sin(2 * np.pi * (PULSE[q] * t + rng.uniform())) > 0)
        return (0.4 * env * np.sin(2 * np.pi * rng.uniform(*PITCH[p]) * t)).astype(np.float32)

    reference = [render(p) for p in prompts]
    good, bad = [render(p) for p in prompts], [render(p, wrong=True) for p in prompts]
    embedders, missing = offline_embedders(codec=tiny_codec, clap_mini=clap_mini, vggish=tmp_path / "none")
    assert "vggish" in missing and missing["clap"] == "not requested"
    base = evaluate(good, prompts, reference, sample_rate=SR, embedders=embedders)
    worse = evaluate(bad, prompts, reference, sample_rate=SR, embedders=embedders, baseline=base)
    assert base["embedders"] == {"encodec": "encodec", "clap-mini-proxy": "clap-mini (proxy)"}
    assert base["rows_fad_encodec"] == [12 * 100, 12 * 100]  # frame-level: 100 frames per 2 s clip
    assert base["rows_fad_clap-mini-proxy"] == [12, 12]
    assert "clap_score_encodec" not in base
    assert worse["clap_score_clap-mini-proxy"] < base["clap_score_clap-mini-proxy"]
    assert worse["fad_clap-mini-proxy"] > base["fad_clap-mini-proxy"]
    r = worse["retention_clap_score_clap-mini-proxy"]  # None when the wrong set's score is negative
    assert r is None if worse["clap_score_clap-mini-proxy"] <= 0 else r == pytest.approx(
        worse["clap_score_clap-mini-proxy"] / base["clap_score_clap-mini-proxy"])
    assert worse["retention_fad_encodec"] == pytest.approx(base["fad_encodec"] / worse["fad_encodec"])


def test_evaluate_cli_writes_json(clap_mini, tones_root, tmp_path):
    import json

    save_tiny_musicgen(tmp_path / "mg", seed=0)
    out = tmp_path / "result.json"
    result = main(["--generated", str(tones_root), "--reference", str(tones_root), "--reference-split", "train",
                   "--codec", str(tmp_path / "mg"), "--clap-mini", str(tones_root / "cache"),
                   "--vggish", str(tmp_path / "none.safetensors"), "--bootstrap", "10", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["fad_encodec"] == pytest.approx(result["fad_encodec"])
    lo, hi = saved["ci_fad_clap-mini-proxy"]
    assert lo <= hi and saved["n_generated"] == 20 and saved["n_reference"] == 48
    assert "vggish" in saved["unavailable"] and saved["clap-mini-proxy_retrieval"]["n_clips"] == 20
    # Sanity: FAD of the test split against itself under the same embedder is ~0.
    a = clap_mini.fad_embeddings([sine(300), sine(900), noise()], SR)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_demo_degradation_removes_highs_and_adds_noise():
    from musicgen.metrics_demo import degrade

    x = sine(3000.0, 1.0) + sine(300.0, 1.0)
    y = degrade(x, SR, seed=0)
    spec_x, spec_y = np.abs(np.fft.rfft(x)), np.abs(np.fft.rfft(y))
    assert y.shape == x.shape and y.dtype == np.float32
    assert spec_y[3000] < 0.05 * spec_x[3000]  # 1 Hz bins: the 3 kHz tone is gone
    assert spec_y[300] > 0.8 * spec_x[300]  # the 300 Hz tone stays
    assert np.std(y - degrade(x, SR, seed=1)) > 0  # seeded noise
