"""musicgen.eval: semitone chroma, chroma correlation, keys, MIDI agreement, mel+chroma embedder, instruments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musicgen.eval.music import (
    ChromaEmbedder,
    KEY_PROFILES,
    MIDI_RANGE,
    Key,
    MelChromaEmbedder,
    MusicEvalError,
    chroma,
    chroma_correlation,
    estimate_key,
    frame_std,
    key_accuracy,
    key_from_caption,
    log_mel_frames,
    midi_agreement,
    mirex_key_score,
    pitch_class_masks,
    pitch_energy,
)

SR = 8000


def hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12.0)


def tone(midi: float, seconds: float, *, sr: int = SR, amp: float = 0.3, harmonics: int = 3) -> np.ndarray:
    """A harmonic tone (partials 1/k) with 10 ms fades, below Nyquist."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(amp / k * np.sin(2 * np.pi * k * hz(midi) * t) for k in range(1, harmonics + 1) if k * hz(midi) < 0.45 * sr)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    return x * fade


def render(notes, seconds: float, *, sr: int = SR) -> np.ndarray:
    """Sum of tones for (midi, start_s, end_s) notes."""
    out = np.zeros(int(seconds * sr))
    for p, s, e in notes:
        seg = tone(p, e - s, sr=sr)
        i = int(s * sr)
        out[i : i + len(seg)] += seg[: len(out) - i]
    return out


# ------------------------------------------------------------------------------------ chroma


@pytest.mark.parametrize("midi", [36, 45, 57, 61, 70, 83, 94])
def test_a_sine_lands_on_its_pitch_class_with_closed_form_energy(midi):
    amp = 0.5
    x = amp * np.sin(2 * np.pi * hz(midi) * np.arange(3 * SR) / SR)
    energy, midis = pitch_energy(x, SR)
    mid = energy[:, energy.shape[1] // 2]
    i = list(midis).index(midi)
    assert mid[i] == pytest.approx(amp**2 / 4, rel=1e-3)  # |c| = A/2 at the filter's centre
    if i > 0:
        assert mid[i - 1] < 1e-5 * mid[i]  # the Hann zero sits on the semitone below's filter
    if i + 1 < len(midis):
        assert mid[i + 1] < 1e-3 * mid[i]
    c = chroma(x, SR)
    assert int(np.argmax(c[:, c.shape[1] // 2])) == midi % 12


def test_pitch_energy_matches_a_frame_by_frame_reference():
    from musicgen.eval.music import _pitch_kernels

    rng = np.random.default_rng(0)
    x, hop = rng.normal(size=3001), 97
    got, _ = pitch_energy(x, SR, hop=hop)
    kernels, _ = _pitch_kernels(SR, *MIDI_RANGE)
    for row, k in zip(range(0, len(kernels), 7), kernels[::7]):
        for t in (0, 5, got.shape[1] - 1):
            # the kernel's centre tap sits on sample t * hop; outside the signal counts as 0
            val = sum(k[j] * x[t * hop + j - len(k) // 2] for j in range(len(k)) if 0 <= t * hop + j - len(k) // 2 < len(x))
            assert got[row, t] == pytest.approx(abs(val) ** 2, rel=1e-9, abs=1e-15)
    assert got.shape[1] == 1 + len(x) // hop


def test_frames_are_centred_on_hop_multiples():
    x = render([(84, 1.0, 2.0)], 3.0)  # C6: a short window, sharp in time
    c = chroma(x, SR, hop=80)  # 10 ms frames
    e = c.sum(0)
    assert e[100 - 3] < 0.05 * e[100 + 20] and e[100 + 3] > 0.3 * e[100 + 20]
    assert e[200 + 3] < 0.05 * e[150]


def test_chroma_is_consistent_across_sample_rates():
    notes = [(60, 0.0, 1.0), (64, 0.0, 1.0), (67, 0.5, 1.5), (71, 1.0, 2.0)]
    c8 = chroma(render(notes, 2.0, sr=8000), 8000, hop=256)
    c16 = chroma(render(notes, 2.0, sr=16000), 16000, hop=512)
    n = min(c8.shape[1], c16.shape[1])
    assert np.corrcoef(c8[:, 5:n - 5].ravel(), c16[:, 5:n - 5].ravel())[0, 1] > 0.99


def _progression(seed: int, seconds: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    notes = []
    for s in np.arange(0, seconds, 0.5):
        root = int(rng.integers(48, 60))
        notes += [(root + d, s, s + 0.5) for d in (0, 4, 7)]
    return render(notes, seconds)


def test_chroma_correlation_levels():
    x = _progression(0)
    assert chroma_correlation(x, x, SR) == pytest.approx(1.0)
    noisy = x + np.random.default_rng(1).normal(size=len(x)) * np.sqrt(np.mean(x**2) / 10)  # 10 dB SNR
    assert chroma_correlation(x, noisy, SR) > 0.9
    assert chroma_correlation(x, np.zeros_like(x), SR) == 0.0  # nothing heard: no correlation
    assert chroma_correlation(x, x[: len(x) // 2], SR) == pytest.approx(1.0, abs=0.05)  # shorter clip
    chance = [chroma_correlation(_progression(s), _progression(s + 100), SR) for s in range(16)]
    assert abs(np.mean(chance)) < 0.15
    shifted = [chroma_correlation(_progression(s), render_shifted(s), SR) for s in range(3)]
    assert max(shifted) < 0.3


def render_shifted(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    notes = []
    for s in np.arange(0, 4.0, 0.5):
        root = int(rng.integers(48, 60)) + 1  # the same progression one semitone up
        notes += [(root + d, s, s + 0.5) for d in (0, 4, 7)]
    return render(notes, 4.0)


def test_chroma_errors():
    with pytest.raises(MusicEvalError, match="reference is silent"):
        chroma_correlation(np.zeros(SR), np.ones(SR), SR)
    with pytest.raises(MusicEvalError, match="sample_rate"):
        chroma(np.zeros(100), 100)
    with pytest.raises(MusicEvalError, match="x.shape"):
        chroma(np.zeros((2, 100)), SR)
    with pytest.raises(MusicEvalError, match="NaN"):
        chroma(np.full(100, np.nan), SR)
    with pytest.raises(MusicEvalError, match="hop"):
        chroma(np.zeros(100), SR, hop=0)


# -------------------------------------------------------------------------------------- keys


def cadence(key: Key, *, beat: float = 0.5) -> np.ndarray:
    """I-IV-V-I (i-iv-V-i in harmonic minor) over a bass, then the scale."""
    third = 4 if key.mode == "major" else 3
    tonic = 48 + key.tonic
    chords = [(0, third, 7), (5, 5 + third, 12), (7, 11, 14), (0, third, 7)]
    notes = []
    for i, ch in enumerate(chords):
        s = i * 2 * beat
        notes += [(tonic + d, s, s + 2 * beat) for d in ch] + [(tonic - 12 + ch[0], s, s + 2 * beat)]
    scale = (0, 2, 4, 5, 7, 9, 11, 12) if key.mode == "major" else (0, 2, 3, 5, 7, 8, 11, 12)
    notes += [(tonic + 12 + d, 8 * beat + i * beat / 2, 8 * beat + (i + 1) * beat / 2) for i, d in enumerate(scale)]
    return render(notes, 12 * beat + 0.1)


@pytest.mark.parametrize("tonic", range(12))
@pytest.mark.parametrize("mode", ["major", "minor"])
def test_estimate_key_recognises_cadences_in_every_key(tonic, mode):
    assert estimate_key(cadence(Key(tonic, mode)), SR) == Key(tonic, mode)


def test_key_profiles_match_music21():
    discrete = pytest.importorskip("music21.analysis.discrete")
    for name, cls in (("krumhansl", "KrumhanslKessler"), ("temperley", "TemperleyKostkaPayne"), ("aarden", "AardenEssen")):
        obj = getattr(discrete, cls)()
        assert list(KEY_PROFILES[name][0]) == pytest.approx(obj.getWeights("major"))
        assert list(KEY_PROFILES[name][1]) == pytest.approx(obj.getWeights("minor"))


class _Pick:
    """An rng stand-in for make_caption: integers() returns a fixed template index."""

    def __init__(self, i):
        self.i = i

    def integers(self, n):
        return self.i


def test_key_from_caption_reads_every_phrasing_of_make_caption():
    from music21 import pitch

    from musicgen.data.render import _key_words, make_caption

    names = ["C", "C#", "D-", "D", "D#", "E-", "E", "E#", "F-", "F", "F#", "G-", "G", "G#", "A-", "A", "A#",
             "B-", "B", "B#", "C-", "B--", "F##"]
    for name in names:
        for mode in ("major", "minor"):
            words = _key_words(name, mode)
            for i in range(4):
                cap = make_caption(rng=_Pick(i), style="Bach chorale", tempo="lively", key=words,
                                   instrument="church organ", texture="four-part harmony")
                assert key_from_caption(cap) == Key(pitch.Pitch(name).pitchClass, mode), (cap, name)


def test_enharmonic_spellings_are_equal():
    same = [("in C sharp major", "in D flat major"), ("in D sharp minor", "in E flat minor"),
            ("in E sharp major", "in F major"), ("in F flat minor", "in E minor"), ("in B sharp major", "in C major"),
            ("in Bb major", "in A sharp major"), ("in F# minor", "in G flat minor"), ("in E- major", "in D# major")]
    for a, b in same:
        assert key_from_caption(a) == key_from_caption(b) is not None, (a, b)
    assert key_from_caption("in C major") != key_from_caption("in C minor")
    assert key_from_caption("A lively reel played on flute, a single melody line.") is None
    assert str(Key(3, "major")) == "E flat major" and str(Key(8, "minor")) == "G sharp minor"


def test_mirex_score_cases_and_chance():
    ref = Key(0, "major")
    assert mirex_key_score(Key(0, "major"), ref) == 1.0
    assert mirex_key_score(Key(7, "major"), ref) == 0.5  # G major for C major: a fifth above
    assert mirex_key_score(Key(5, "major"), ref) == 0.0  # a fifth below: no credit (mir_eval default)
    assert mirex_key_score(Key(9, "minor"), ref) == 0.3  # relative
    assert mirex_key_score(Key(0, "minor"), ref) == 0.2  # parallel
    assert mirex_key_score(Key(0, "major"), Key(9, "minor")) == 0.3  # relative of A minor
    for r in (Key(0, "major"), Key(9, "minor")):  # uniform guessing scores 2/24 on average
        mean = np.mean([mirex_key_score(Key(t, m), r) for t in range(12) for m in ("major", "minor")])
        assert mean == pytest.approx(2 / 24)


def test_key_accuracy_on_synthetic_clips():
    keys = [Key(2, "major"), Key(9, "minor"), Key(10, "major"), Key(4, "minor")]
    clips = [cadence(k) for k in keys]
    captions = [f"A slow chorale in {k} played on harp." for k in keys]
    acc = key_accuracy(clips, captions, SR)
    assert (acc.accuracy, acc.mirex, acc.n, acc.n_skipped) == (1.0, 1.0, 4, 0)
    assert acc.chance == pytest.approx(1 / 24)
    wrong = key_accuracy(clips, captions[1:] + captions[:1], SR)
    assert wrong.accuracy == 0.0
    part = key_accuracy(clips, [captions[0], None, "no key", keys[3]], SR)
    assert (part.n, part.n_skipped, part.accuracy) == (2, 2, 1.0)
    assert math.isnan(part.per_item[1]) and part.to_dict()["per_item"][1] is None
    assert json.dumps(part.to_dict())
    with pytest.raises(MusicEvalError, match="len\\(captions\\)"):
        key_accuracy(clips, captions[:2], SR)
    with pytest.raises(MusicEvalError, match="no caption names a key"):
        key_accuracy(clips[:1], ["no key"], SR)
    with pytest.raises(MusicEvalError, match="profile"):
        estimate_key(clips[0], SR, profile="temperly")


# ---------------------------------------------------------------------------- MIDI agreement


def test_midi_agreement_hand_computed():
    c = np.zeros((12, 4))
    c[0, 0], c[4, 1], c[7, 2], c[2, 3] = 1.0, 1.0, 1.0, 1.0  # strongest: C, E, G, D
    active = np.zeros((4, 12), dtype=bool)
    active[0, [0, 4, 7]] = True  # C major chord: C heard -> hit
    active[1, [0, 4, 7]] = True  # E heard -> hit
    active[2, [2, 5, 9]] = True  # G heard, D minor sounding -> miss
    # frame 3: no note sounds -> left out
    assert midi_agreement(c, active) == pytest.approx(2 / 3)
    masks = (active * (1 << np.arange(12))).sum(axis=1)  # the same as 12-bit ints
    assert midi_agreement(c, masks) == pytest.approx(2 / 3)


def test_midi_agreement_on_rendered_notes():
    notes = [(60, 0.0, 1.0), (64, 0.0, 1.0), (67, 0.0, 1.0), (62, 1.0, 2.0), (65, 1.0, 2.0), (69, 1.0, 2.0),
             (72, 2.5, 3.5)]  # 2.0 - 2.5 s: no note
    x, hop = render(notes, 3.6), 256
    c = chroma(x, SR, hop=hop)
    masks = pitch_class_masks(notes, n_frames=c.shape[1], sample_rate=SR, hop=hop)
    assert not masks[int(2.25 * SR / hop)].any()
    assert midi_agreement(c, masks) > 0.9
    assert midi_agreement(c, np.roll(masks, 1, axis=1)) < 0.2  # the score a semitone off
    assert midi_agreement(np.zeros_like(c), masks) == 0.0  # silence hears nothing
    with pytest.raises(MusicEvalError, match="active frames"):
        midi_agreement(c, masks[:-1])
    with pytest.raises(MusicEvalError, match="no frame with a sounding note"):
        midi_agreement(c, np.zeros_like(masks))
    with pytest.raises(MusicEvalError, match="notes\\[0\\]"):
        pitch_class_masks([("x",)], n_frames=3, sample_rate=SR)


# ------------------------------------------------------------------------------------ embedder


def test_mel_chroma_embedder_shapes_and_interface():
    emb = MelChromaEmbedder()
    assert (emb.key, emb.name, emb.proxy) == ("mel-chroma", "mel-chroma", False)
    clips = [_progression(0, 2.0), _progression(1, 3.0)]
    frames = emb.embed_frames(clips, SR)
    assert [f.shape for f in frames] == [(1 + 2 * SR // 512, 76), (1 + 3 * SR // 512, 76)]
    assert emb.fad_embeddings(clips, SR).shape == (sum(len(f) for f in frames), 76)
    np.testing.assert_allclose(emb.embed(clips, SR), np.stack([f.mean(0) for f in frames]), rtol=1e-5, atol=1e-6)
    up = [render([(p, 0, 2.0)], 2.0, sr=32000) for p in (60, 61)]  # 32 kHz input is resampled
    e32 = emb.embed(up, 32000)
    assert [int(np.argmax(e[64:])) for e in e32] == [0, 1]  # the chroma part sees the semitone


def test_chroma_embedder_is_the_pitch_part_of_mel_chroma_and_ignores_gain():
    emb, full = ChromaEmbedder(), MelChromaEmbedder()
    assert (emb.key, emb.proxy) == ("chroma", False)
    clips = [_progression(0, 2.0), _progression(1, 3.0)]
    frames = emb.embed_frames(clips, SR)
    for f, g in zip(frames, full.embed_frames(clips, SR)):
        assert f.shape == (g.shape[0], 12)
        np.testing.assert_array_equal(f, g[:, 64:])
    loud = emb.embed_frames([4.0 * c for c in clips], SR)  # pitch-class shares: no loudness
    for f, g in zip(frames, loud):
        np.testing.assert_allclose(f, g, atol=1e-5)
    assert not np.allclose(full.embed_frames([4.0 * clips[0]], SR)[0], full.embed_frames([clips[0]], SR)[0], atol=0.1)
    tones = [render([(p, 0, 2.0)], 2.0, sr=SR) for p in (60, 61)]
    assert [int(np.argmax(e)) for e in emb.embed(tones, SR)] == [0, 1]


def test_log_mel_peak_band_holds_the_tone():
    from transformers.audio_utils import mel_filter_bank

    x = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)
    mel = log_mel_frames(x, SR)
    fb = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=0.0, max_frequency=SR / 2,
                         sampling_rate=SR, norm="slaney", mel_scale="slaney")
    band = int(np.argmax(mel[:, mel.shape[1] // 2]))
    assert fb[int(round(1000 / (SR / 1024))), band] > 0  # the band's filter covers 1 kHz


def test_frame_std_matches_a_plain_reference_and_reads_dynamics():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=4 * SR)
    ref = log_mel_frames(noise, SR).std(axis=1).mean()  # the definition, written out
    assert frame_std([noise], SR)[0] == pytest.approx(ref, rel=1e-5)
    # two levels of the same sound, a factor 100 apart in amplitude, half the frames each: log10(100) = 2
    gated = noise * np.where(np.arange(len(noise)) < len(noise) // 2, 1.0, 0.01)
    steady, two_level = frame_std([noise, gated], SR)
    assert steady < 0.4 and two_level == pytest.approx(np.sqrt(2.0**2 + steady**2), abs=0.15)
    # a plucked note (fast decay) is more dynamic than the same note held
    held = tone(60, 4.0)
    plucked = held * np.exp(-(np.arange(len(held)) / SR % 0.5) * 12.0)
    assert frame_std([plucked], SR)[0] > frame_std([held], SR)[0] + 0.3


@given(st.floats(0.05, 20.0))
@settings(max_examples=15, deadline=None)
def test_frame_std_does_not_depend_on_gain(gain):
    x = np.random.default_rng(1).normal(size=SR) * 0.1
    a, b = frame_std([x, gain * x], SR)
    assert b == pytest.approx(a, abs=1e-4)


# ---------------------------------------------------------------------------------- instruments


def _timbre_clip(kind: str, rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    """Three distinguishable timbres at random pitches: pure, bright (odd harmonics), plucked."""
    t = np.arange(int(seconds * SR)) / SR
    f = hz(int(rng.integers(55, 72)))
    if kind == "pure":
        x = np.sin(2 * np.pi * f * t)
    elif kind == "bright":
        x = sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, 12, 2) if k * f < 0.45 * SR)
    else:  # plucked: a bright attack repeated every 0.25 s, decaying fast
        env = np.exp(-(t % 0.25) * 30.0)
        x = env * sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, 6) if k * f < 0.45 * SR)
    return 0.2 * x * rng.uniform(0.5, 1.5) + 0.003 * rng.normal(size=len(t))


def _timbre_set(seed: int, per_class: int):
    rng = np.random.default_rng(seed)
    kinds = ["pure", "bright", "plucked"] * per_class
    return [_timbre_clip(k, rng) for k in kinds], kinds


def test_instrument_classifier_learns_distinguishable_timbres_and_round_trips(tmp_path):
    from dataclasses import replace

    from musicgen.eval.instrument import InstrumentClassifier, InstrumentConfig, instrument_accuracy, train_instrument_classifier

    cfg = replace(InstrumentConfig(), steps=150, hidden=32)
    clips, labels = _timbre_set(0, 12)
    clf = train_instrument_classifier(clips, labels, SR, cfg=cfg)
    assert clf.labels == ("bright", "plucked", "pure") and clf.info["train_accuracy"] == 1.0
    test_clips, test_labels = _timbre_set(1, 6)
    acc = instrument_accuracy(test_clips, test_labels, SR, classifier=clf)
    assert acc.accuracy >= 0.9 and acc.chance == pytest.approx(1 / 3) and acc.n == 18
    shuffled = instrument_accuracy(test_clips, test_labels[1:] + test_labels[:1], SR, classifier=clf)
    assert shuffled.accuracy <= 0.2  # the classifier is not guessing a constant
    clf.save(tmp_path / "clf")
    doc = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert doc["labels"] == ["bright", "plucked", "pure"] and doc["config"]["steps"] == 150
    assert InstrumentClassifier.load(tmp_path / "clf").cfg == cfg and clf.info["train_examples"] == 72
    loaded = InstrumentClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(loaded.predict_proba(test_clips, SR), clf.predict_proba(test_clips, SR))
    again = train_instrument_classifier(clips, labels, SR, cfg=cfg)  # seeded: the same weights
    for (k, v), (_, w) in zip(clf.net.state_dict().items(), again.net.state_dict().items()):
        assert torch_equal(v, w), k
    with pytest.raises(MusicEvalError, match="no instrument classifier"):
        InstrumentClassifier.load(tmp_path / "missing")
    with pytest.raises(MusicEvalError, match="labels"):
        train_instrument_classifier(clips[:2], ["pure", "oboe"], SR, cfg=cfg, classes=["pure", "bright"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_instrument_from_every_caption_phrasing():
    from musicgen.data.render import INSTRUMENTS, make_caption
    from musicgen.eval.instrument import instrument_from_caption

    names = [n for _, n in INSTRUMENTS]
    for name in names:
        for i in range(4):
            cap = make_caption(rng=_Pick(i), style="fiddle tune", tempo="fast", key="A major", instrument=name,
                               texture="a single melody line")
            assert instrument_from_caption(cap, names) == name, cap
    assert instrument_from_caption("A slow harpsichord piece", names) == "harpsichord"  # not "harp"
    assert instrument_from_caption("A slow piece", names) is None
