"""Model-free music measures: semitone chroma, key estimation, MIDI agreement, a mel+chroma embedder.

Nothing here loads a model: numpy and scipy (and transformers' numpy mel filter bank) compute every
number from the waveform, so a figure does not depend on the codec or the generator it judges.
Definitions, choices and sanity figures on the mini world's renders: docs/metrics.md ("Model-free
music measures"); ``python -m musicgen.eval.music DATA_ROOT`` recomputes the figures.

Chroma with semitone resolution. ``pitch_energy`` is a constant-Q analysis with one complex filter
per MIDI pitch ``p`` in 36..96 (C2 65 Hz .. C7 2093 Hz), centre ``f_p = 440 * 2^((p - 69) / 12)``:
a Hann-windowed complex sinusoid of length ``N_p = 2 Q sr / f_p`` with ``Q = 1 / (2^(1/12) - 1)``
(about 16.8), normalised so a sinusoid of amplitude A at ``f_p`` gives magnitude A/2. The Hann
window's first spectral zero lies ``2 sr / N_p = f_p / Q`` away, the distance to the next semitone
up: a steady tone at a pitch's centre gives the filter a semitone below it less than 1e-5 of its
energy and the filter a semitone above it 0.03-0.05% (tests/test_music_eval.py). The price is time
resolution at the bottom: the window is 0.51 s at C2, 16 ms at C7. Frame ``t`` is centred at sample
``t * hop`` (signal zero-padded), ``1 + len(x) // hop`` frames. ``chroma`` sums the energies
``|c|^2`` of all octaves of each pitch class (row 0 is C, row 9 is A). For comparison, the STFT
chroma of ``codec.chroma`` (2048-point Hann frames at 8 kHz) has a main lobe 15.6 Hz wide, more than
a semitone below about 260 Hz, so low notes smear into their neighbours there.

Also here: ``chroma_correlation`` (per-frame Pearson, chance near 0), key estimation with key
profiles and key accuracy against captions (``estimate_key``, ``key_from_caption``,
``key_accuracy``), ``midi_agreement`` of chroma frames with a score's sounding pitch classes, and
``MelChromaEmbedder`` and its pitch part alone, ``ChromaEmbedder``, for FAD and KAD; ``frame_std``,
the clips' dynamics. Instrument accuracy lives in ``musicgen.eval.instrument``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from kdq.errors import KdqError, bad_value
from musicgen.eval.embedders import AudioEmbedder

__all__ = [
    "ChromaEmbedder",
    "DEFAULT_PROFILE",
    "KEY_PROFILES",
    "MIDI_RANGE",
    "Key",
    "KeyAccuracy",
    "MelChromaConfig",
    "MelChromaEmbedder",
    "MusicEvalError",
    "chroma",
    "chroma_correlation",
    "chroma_frames",
    "estimate_key",
    "frame_std",
    "key_accuracy",
    "key_from_caption",
    "key_scores",
    "log_mel_frames",
    "mel_chroma_frames",
    "midi_agreement",
    "mirex_key_score",
    "pitch_class_masks",
    "pitch_energy",
]

MIDI_RANGE = (36, 96)  # C2 .. C7, inclusive
_SEMITONE_Q = 1.0 / (2.0 ** (1.0 / 12.0) - 1.0)


class MusicEvalError(KdqError):
    """Audio, captions or labels a music measure cannot be computed on."""


def _check_sr(sample_rate: object) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
        raise bad_value(MusicEvalError, "sample_rate", sample_rate, "an int >= 1000 (Hz)", "e.g. 8000 for the mini world")
    return int(sample_rate)


def _check_signal(x: object, arg: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.size == 0:
        raise bad_value(MusicEvalError, f"{arg}.shape", arr.shape, "a non-empty 1-D mono signal")
    if not np.isfinite(arr).all():
        raise MusicEvalError(f"{arg} has NaN or infinite samples; not allowed: check the generator's output")
    return arr


def _hop(hop: object, sample_rate: int) -> int:
    if hop is None:
        return max(1, round(0.032 * sample_rate))
    if isinstance(hop, bool) or not isinstance(hop, (int, np.integer)) or hop < 1:
        raise bad_value(MusicEvalError, "hop", hop, "a positive int (samples) or None for 32 ms")
    return int(hop)


@functools.lru_cache(maxsize=8)
def _pitch_kernels(sample_rate: int, midi_lo: int, midi_hi: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    kernels, midis = [], []
    for p in range(midi_lo, midi_hi + 1):
        f = 440.0 * 2.0 ** ((p - 69) / 12.0)
        if f >= 0.45 * sample_rate:  # too close to Nyquist for this rate
            break
        n = int(math.ceil(2.0 * _SEMITONE_Q * sample_rate / f)) | 1  # odd: centred on its sample
        w = np.hanning(n + 2)[1:-1]  # Hann without its two zero end points: n non-zero taps
        t = np.arange(n) - n // 2
        kernels.append(w * np.exp(-2j * np.pi * f * t / sample_rate) / w.sum())
        midis.append(p)
    return tuple(kernels), np.array(midis)


def pitch_energy(x: np.ndarray, sample_rate: int, *, hop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Constant-Q energy per MIDI pitch (module docstring), and the pitches.

    Args:
        x: mono signal [T].
        sample_rate: its rate in Hz; pitches whose centre is at or above 0.45 x rate are dropped.
        hop: frame step in samples (None: 32 ms).

    Returns:
        ``(energy, midis)``: energy [pitches, 1 + T // hop] (``|c|^2``; a sinusoid of amplitude A at a
        pitch's centre gives A^2 / 4) and the MIDI numbers of its rows.
    """
    sr = _check_sr(sample_rate)
    x = _check_signal(x, "x")
    hop = _hop(hop, sr)
    kernels, midis = _pitch_kernels(sr, *MIDI_RANGE)
    frames = 1 + len(x) // hop
    pad = len(kernels[0]) // 2 + 1
    xpad = np.pad(x, (pad, pad + hop))
    out = np.empty((len(kernels), frames))
    for i, k in enumerate(kernels):
        first = pad - len(k) // 2  # window of frame 0: its centre tap on sample 0
        windows = np.lib.stride_tricks.sliding_window_view(xpad, len(k))[first : first + (frames - 1) * hop + 1 : hop]
        # einsum (numpy's own loops, not a threaded BLAS call): a matrix-vector product per pitch
        # gains nothing from threads, and BLAS threads on a loaded 2-core machine slowed it 10-20x
        re_, im_ = np.einsum("fn,n->f", windows, k.real), np.einsum("fn,n->f", windows, k.imag)
        out[i] = re_**2 + im_**2
    return out, midis


def chroma(x: np.ndarray, sample_rate: int, *, hop: int | None = None) -> np.ndarray:
    """Pitch-class energy [12, frames]: ``pitch_energy`` summed over octaves (row 0 = C, 1 = C#, ...).

    Unnormalised (silence gives zeros); frame ``t`` is centred at sample ``t * hop``.
    """
    energy, midis = pitch_energy(x, sample_rate, hop=hop)
    out = np.zeros((12, energy.shape[1]))
    np.add.at(out, midis % 12, energy)
    return out


def _active_frames(c: np.ndarray, rel: float = 1e-3) -> np.ndarray:
    """Frames whose total chroma energy is at least ``rel`` (-30 dB) of the clip's loudest frame."""
    e = c.sum(axis=0)
    top = float(e.max()) if e.size else 0.0
    return (e >= rel * top) & (e > 0) if top > 0 else np.zeros(e.shape, dtype=bool)


def chroma_correlation(reference: np.ndarray, other: np.ndarray, sample_rate: int, *, hop: int | None = None) -> float:
    """Mean over frames of the Pearson correlation of the two clips' 12-bin chroma energy vectors.

    ``r = mean_t corr(C_ref[:, t], C_other[:, t])`` over the frames ``t`` (of the shorter clip) where
    the reference sounds (chroma energy within 30 dB of its loudest frame). A frame where ``other``
    has a constant chroma (silence) counts as 0. 1 means the same pitch classes at the same times in
    the same proportions; 0 is chance (on the mini world's valid clips a clip from another piece
    gave -0.01); a one-semitone transposition of the same clip gives about -0.2 (neighbouring pitch
    classes are rarely in one chord). Not symmetric: ``reference`` chooses the frames.

    Raises:
        MusicEvalError: bad signals, or a reference with no sounding frame.
    """
    ca, cb = chroma(reference, sample_rate, hop=hop), chroma(other, sample_rate, hop=hop)
    t = min(ca.shape[1], cb.shape[1])
    ca, cb = ca[:, :t], cb[:, :t]
    active = _active_frames(ca)
    if not active.any():
        raise MusicEvalError("reference is silent (no frame within 30 dB of a non-zero peak); chroma correlation needs a sounding reference")
    a = ca - ca.mean(axis=0)
    b = cb - cb.mean(axis=0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    ok = (na > 0) & (nb > 0)
    r = np.zeros(t)
    r[ok] = (a[:, ok] * b[:, ok]).sum(axis=0) / (na[ok] * nb[ok])
    return float(r[active].mean())


# ------------------------------------------------------------------------------------------- keys

# Key profiles (weights of the 12 pitch classes above the tonic), as music21 ships them
# (tests/test_music_eval.py compares): Krumhansl & Kessler 1982 probe-tone ratings; Temperley's
# Kostka-Payne corpus frequencies (Temperley 2007); Aarden-Essen folk-song frequencies (music21's
# default for ``Stream.analyze("key")``, which labelled the mini world's captions).
KEY_PROFILES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "krumhansl": (
        (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88),
        (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17),
    ),
    "temperley": (
        (0.748, 0.06, 0.488, 0.082, 0.67, 0.46, 0.096, 0.715, 0.104, 0.366, 0.057, 0.4),
        (0.712, 0.084, 0.474, 0.618, 0.049, 0.46, 0.105, 0.747, 0.404, 0.067, 0.133, 0.33),
    ),
    "aarden": (
        (17.7661, 0.145624, 14.9265, 0.160186, 19.8049, 11.3587, 0.291248, 22.062, 0.145624, 8.15494, 0.232998, 4.95122),
        (18.2648, 0.737619, 14.0499, 16.8599, 0.702494, 14.4362, 0.702494, 18.6161, 4.56621, 1.93186, 7.37619, 1.75623),
    ),
}
DEFAULT_PROFILE = "temperley"  # best of the three on the train split's renders (0.567 vs 0.519 / 0.419)

_LETTER_PC = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
# Spelling for display: the usual key signature per pitch class and mode (no double accidentals).
_MAJOR_NAMES = ("C", "D flat", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B")
_MINOR_NAMES = ("C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "G sharp", "A", "B flat", "B")
MODES = ("major", "minor")


class Key(NamedTuple):
    """A key as a tonic pitch class (0 = C .. 11 = B) and a mode; enharmonic spellings are equal.

    ``Key(3, "major") == key_from_caption("in E flat major") == key_from_caption("in D sharp major")``;
    ``str(key)`` spells it with the usual key signature ("E flat major").
    """

    tonic: int
    mode: str

    def __str__(self) -> str:
        names = _MAJOR_NAMES if self.mode == "major" else _MINOR_NAMES
        return f"{names[self.tonic % 12]} {self.mode}"


def _profile(profile: str) -> tuple[np.ndarray, np.ndarray]:
    if profile not in KEY_PROFILES:
        from kdq.errors import close_matches

        raise bad_value(
            MusicEvalError, "profile", profile, f"one of {sorted(KEY_PROFILES)}" + close_matches(profile, KEY_PROFILES)
        )
    major, minor = KEY_PROFILES[profile]
    return np.asarray(major), np.asarray(minor)


def key_scores(pitch_class_weights: np.ndarray, *, profile: str = DEFAULT_PROFILE) -> np.ndarray:
    """Pearson correlation of a 12-vector with the 24 rotated profiles: [2, 12] (mode, tonic).

    ``scores[m, t] = corr(w, roll(profile_m, t))``, i.e. the profile read with pitch class ``t`` as
    its tonic (Krumhansl-Schmuckler key finding).
    """
    w = np.asarray(pitch_class_weights, dtype=np.float64)
    if w.shape != (12,) or not np.isfinite(w).all():
        raise bad_value(MusicEvalError, "pitch_class_weights.shape", w.shape, "12 finite weights (C .. B)")
    out = np.zeros((2, 12))
    if np.ptp(w) == 0:
        return out  # no pitch information: every key scores 0
    for m, prof in enumerate(_profile(profile)):
        for t in range(12):
            out[m, t] = np.corrcoef(w, np.roll(prof, t))[0, 1]
    return out


def estimate_key(audio: np.ndarray, sample_rate: int, *, profile: str = DEFAULT_PROFILE) -> Key:
    """The key whose rotated profile best correlates with the clip's total chroma energy.

    ``argmax_{mode, tonic} corr(sum_t chroma[:, t], roll(profile_mode, tonic))`` with ``chroma`` as
    above (energy, so loud frames weigh more). Ties and silence resolve to the first key (C major).
    """
    w = chroma(audio, sample_rate).sum(axis=1)
    scores = key_scores(w, profile=profile)
    m, t = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return Key(int(t), MODES[m])


_KEY_RE = re.compile(
    r"\bin\s+([A-G])((?:\s*-?\s*(?:flat|sharp)|b(?=\s)|#|-|\u266d|\u266f)*)\s+(major|minor)\b", re.IGNORECASE
)


def key_from_caption(text: str) -> Key | None:
    """The key a caption names ("... in E flat major ...", "in F sharp minor"), or None.

    Accepts the mini world's wording (``musicgen.data``: "in <letter>[ flat| sharp]... <mode>", so
    "B flat flat" is A) and the compact forms "Eb", "F#", "E-", "E♭". Accidentals add -1 / +1 to
    the letter's pitch class, so enharmonic spellings give equal keys.
    """
    if not isinstance(text, str):
        raise bad_value(MusicEvalError, "text", text, "a caption string")
    m = _KEY_RE.search(text)
    if m is None:
        return None
    letter, acc, mode = m.group(1).upper(), m.group(2).lower(), m.group(3).lower()
    tokens = re.findall(r"flat|sharp|#|\u266f|\u266d|b|-", re.sub(r"-\s*(?=flat|sharp)", "", acc))
    shift = sum(1 if t in ("sharp", "#", "\u266f") else -1 for t in tokens)
    return Key((_LETTER_PC[letter] + shift) % 12, mode)


def mirex_key_score(estimated: Key, reference: Key) -> float:
    """MIREX key score (as mir_eval's ``weighted_score``): 1 same key; 0.5 a fifth above in the same
    mode; 0.3 the relative key; 0.2 the parallel key; else 0."""
    if estimated == reference:
        return 1.0
    d = (estimated.tonic - reference.tonic) % 12
    if estimated.mode == reference.mode:
        return 0.5 if d == 7 else 0.0
    if (reference.mode == "major" and d == 9) or (reference.mode == "minor" and d == 3):
        return 0.3
    return 0.2 if d == 0 else 0.0


@dataclass(frozen=True)
class KeyAccuracy:
    """Key agreement of clips with the keys their captions name.

    ``accuracy``: share of scored clips whose estimated key equals the caption's (tonic pitch class and
    mode). ``mirex``: mean MIREX score (partial credit for fifth / relative / parallel errors), a
    relaxed figure, labelled as such. ``chance`` (1/24) and ``chance_mirex`` (2/24: one exact, one
    fifth, one relative and one parallel key among 24) are the expected values for a uniformly random
    guess. ``per_item`` and ``per_item_mirex`` hold one value per input clip (NaN where the caption
    names no key; those clips are not scored), ready for ``kdq.metrics.paired_bootstrap``.
    """

    accuracy: float
    mirex: float
    n: int
    n_skipped: int
    chance: float
    chance_mirex: float
    profile: str
    per_item: tuple[float, ...]
    per_item_mirex: tuple[float, ...]
    estimated: tuple[str, ...]

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN entries become None)."""
        d = asdict(self)
        for k in ("per_item", "per_item_mirex"):
            d[k] = [None if math.isnan(v) else v for v in d[k]]
        return d


def key_accuracy(
    audio_list: Sequence[np.ndarray], captions: Sequence[str | Key | None], sample_rate: int, *, profile: str = DEFAULT_PROFILE
) -> KeyAccuracy:
    """Share of clips whose ``estimate_key`` equals the key named by their caption (see ``KeyAccuracy``).

    Args:
        audio_list: mono clips.
        captions: one per clip: a caption (parsed with ``key_from_caption``), a ``Key``, or None.
        sample_rate: the clips' rate.
        profile: key profile name (``KEY_PROFILES``).

    Raises:
        MusicEvalError: different lengths, or no caption names a key.
    """
    if len(audio_list) != len(captions):
        raise bad_value(MusicEvalError, "len(captions)", len(captions), f"{len(audio_list)} (one per clip)")
    per, per_m, names = [], [], []
    for x, cap in zip(audio_list, captions):
        ref = cap if isinstance(cap, Key) or cap is None else key_from_caption(cap)
        est = estimate_key(x, sample_rate, profile=profile)
        names.append(str(est))
        if ref is None:
            per.append(float("nan"))
            per_m.append(float("nan"))
        else:
            per.append(float(est == ref))
            per_m.append(mirex_key_score(est, ref))
    scored = [v for v in per if not math.isnan(v)]
    if not scored:
        raise MusicEvalError("no caption names a key (expected wording like 'in E flat major'); nothing to score")
    return KeyAccuracy(
        float(np.mean(scored)), float(np.nanmean(per_m)), len(scored), len(per) - len(scored), 1 / 24, 2 / 24,
        profile, tuple(per), tuple(per_m), tuple(names),
    )


# --------------------------------------------------------------------------------- MIDI agreement


def pitch_class_masks(
    notes: Sequence[tuple[int, float, float]], *, n_frames: int, sample_rate: int, hop: int | None = None
) -> np.ndarray:
    """Which pitch classes sound in a score at each chroma frame: bool [n_frames, 12].

    ``notes`` are ``(midi_pitch, start_s, end_s)`` relative to the clip's first sample (e.g.
    pretty_midi notes shifted by the clip's start). Frame ``t`` is the instant ``t * hop /
    sample_rate`` (the centre of ``chroma``'s frame ``t`` at the same ``hop``); a note sounds there
    when ``start <= instant < end``.
    """
    sr = _check_sr(sample_rate)
    hop = _hop(hop, sr)
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise bad_value(MusicEvalError, "n_frames", n_frames, "a positive int", "use chroma(x, sr, hop=hop).shape[1]")
    times = np.arange(n_frames) * hop / sr
    out = np.zeros((n_frames, 12), dtype=bool)
    for i, note in enumerate(notes):
        try:
            pitch, start, end = int(note[0]), float(note[1]), float(note[2])
        except (TypeError, ValueError, IndexError) as e:
            raise bad_value(MusicEvalError, f"notes[{i}]", note, "(midi_pitch, start_s, end_s)") from e
        out[(times >= start) & (times < end), pitch % 12] = True
    return out


def _as_masks(active: object, n_frames: int) -> np.ndarray:
    arr = np.asarray(active)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):  # 12-bit masks, bit k = pitch class k
        if (arr < 0).any() or (arr >= 1 << 12).any():
            raise bad_value(MusicEvalError, "active", "out-of-range masks", "ints in [0, 4095] (bit k = pitch class k)")
        arr = ((arr[:, None] >> np.arange(12)) & 1).astype(bool)
    if arr.ndim != 2 or arr.shape[1] != 12:
        raise bad_value(
            MusicEvalError, "active.shape", arr.shape, "[frames, 12] booleans or [frames] 12-bit int masks"
        )
    if arr.shape[0] != n_frames:
        raise bad_value(
            MusicEvalError, "active frames", arr.shape[0], f"{n_frames} to match the chroma frames",
            "build the masks with pitch_class_masks(..., n_frames=chroma.shape[1], hop=<the chroma's hop>)",
        )
    return arr.astype(bool)


def midi_agreement(chroma_frames: np.ndarray, active: np.ndarray) -> float:
    """Share of score frames whose strongest chroma class is a pitch class sounding in the score.

    ``mean_t [ argmax_c chroma[c, t] in active[t] ]`` over the frames ``t`` where at least one note
    sounds; frames with no note are left out. A frame whose chroma is silent (below 30 dB under the
    clip's loudest frame, or all zero) counts as a miss: nothing was heard. Chance for a random
    strongest class is (mean number of sounding classes) / 12.

    Args:
        chroma_frames: [12, frames] from ``chroma`` (row 0 = C).
        active: [frames, 12] booleans, or [frames] ints whose bit k is pitch class k
            (``pitch_class_masks`` builds them from notes, on the same frame grid).

    Raises:
        MusicEvalError: shapes that do not match, or no frame with a sounding note.
    """
    c = np.asarray(chroma_frames, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != 12 or not np.isfinite(c).all():
        raise bad_value(MusicEvalError, "chroma_frames.shape", c.shape, "[12, frames] finite values")
    mask = _as_masks(active, c.shape[1])
    scored = mask.any(axis=1)
    if not scored.any():
        raise MusicEvalError("active has no frame with a sounding note; nothing to compare")
    heard = _active_frames(c)
    top = np.argmax(c, axis=0)
    hit = heard & mask[np.arange(c.shape[1]), top]
    return float(hit[scored].mean())


# ------------------------------------------------------------------------------ mel+chroma frames


@dataclass(frozen=True)
class MelChromaConfig:
    """Frame features of ``MelChromaEmbedder``; plain data.

    Attributes:
        sample_rate: inputs are resampled to this rate (the mini world's 8 kHz keeps every pitch of
            ``MIDI_RANGE`` and the spectrum up to 4 kHz).
        n_fft: STFT size for the mel part (Hann window).
        hop: frame step in samples, shared by the mel and chroma parts.
        n_mels: Slaney mel bands from 0 Hz to Nyquist (transformers' filter bank).
        chroma_floor: the chroma part is ``weight * log10(chroma / sum(chroma) + floor)`` per frame.
        chroma_weight: that ``weight``. On the train split's renders the mel dimensions spread 2.8x
            as much as the unweighted chroma ones (mean per-dimension standard deviation 1.67 vs
            0.59), so FAD and KAD would hardly see pitch; 3 gives every dimension about equal say.
    """

    sample_rate: int = 8000
    n_fft: int = 1024
    hop: int = 512
    n_mels: int = 64
    chroma_floor: float = 0.01
    chroma_weight: float = 3.0


def log_mel_frames(x: np.ndarray, sample_rate: int, *, n_fft: int = 1024, hop: int = 512, n_mels: int = 64) -> np.ndarray:
    """log10 mel power [n_mels, 1 + T // hop] (floor 1e-6), frames centred like ``chroma``'s.

    Periodic Hann window of ``n_fft``, power spectrum, Slaney-normalised Slaney-scale mel bands from
    0 Hz to Nyquist (``transformers.audio_utils.mel_filter_bank``).
    """
    from transformers.audio_utils import mel_filter_bank

    sr = _check_sr(sample_rate)
    x = _check_signal(x, "x")
    fb = _mel_bank(sr, n_fft, n_mels, mel_filter_bank)
    frames = 1 + len(x) // hop
    xpad = np.pad(x, (n_fft // 2, n_fft // 2 + hop))
    win = np.hanning(n_fft + 1)[:-1]
    seg = np.lib.stride_tricks.sliding_window_view(xpad, n_fft)[np.arange(frames) * hop] * win
    power = np.abs(np.fft.rfft(seg, axis=1)) ** 2
    return np.log10(np.maximum(fb.T @ power.T, 1e-6))


@functools.lru_cache(maxsize=8)
def _mel_bank(sr: int, n_fft: int, n_mels: int, make) -> np.ndarray:
    return make(
        num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=sr / 2,
        sampling_rate=sr, norm="slaney", mel_scale="slaney",
    )


def chroma_frames(x: np.ndarray, sample_rate: int, cfg: MelChromaConfig = MelChromaConfig()) -> np.ndarray:
    """Per-frame pitch-class shares [frames, 12]: ``weight * log10(chroma / sum(chroma) + floor)``
    (silent frame: ``weight * log10(floor)``). Unchanged by the clip's gain."""
    c = chroma(x, sample_rate, hop=cfg.hop)
    total = c.sum(axis=0, keepdims=True)
    dist = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
    return (cfg.chroma_weight * np.log10(dist + cfg.chroma_floor)).T


def mel_chroma_frames(x: np.ndarray, sample_rate: int, cfg: MelChromaConfig = MelChromaConfig()) -> np.ndarray:
    """Per-frame features [frames, n_mels + 12]: ``log_mel_frames`` then ``chroma_frames``."""
    mel = log_mel_frames(x, sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels)
    return np.concatenate([mel.T, chroma_frames(x, sample_rate, cfg)], axis=1)


def frame_std(audio_batch, sample_rate: int, cfg: MelChromaConfig = MelChromaConfig()) -> np.ndarray:
    """Dynamics per clip: the standard deviation over frames of log10 mel power, averaged over bands.

    ``std_t(log_mel[b, t])`` averaged over the ``cfg.n_mels`` bands of ``log_mel_frames`` (the frames
    ``MelChromaEmbedder`` sees, after resampling to ``cfg.sample_rate``), one value per clip
    ``[N]``. A steady sound scores near 0; notes that start and decay, or rests, score higher;
    a clip that alternates between two levels of the same sound ``a`` and ``b`` apart in amplitude
    scores ``|log10(a / b)|`` (half the 2 log10 gap in power). It does not depend on the clip's gain
    (above the 1e-6 power floor). Real renders of the mini world score about 1, its codec's
    reconstructions about half that (docs/mini_world.md).
    """
    frames = MelChromaEmbedder(cfg).embed_frames(audio_batch, sample_rate)
    return np.array([float(f[:, : cfg.n_mels].std(axis=0).mean()) for f in frames])


class MelChromaEmbedder(AudioEmbedder):
    """Model-free embedder for FAD and KAD: frames of log-mel (64) and log pitch-class distribution (12).

    ``fad_embeddings`` returns every frame of every clip (64 ms hop at 8 kHz: 63 rows per 4 s clip),
    the convention of the frame-level embedders (``EncodecEmbedder``); ``embed_frames`` keeps them per
    clip (for ``kdq.metrics.kad_bootstrap`` and ``paired_kad_bootstrap``, which resample clips);
    ``embed`` is the per-clip frame mean [N, 76]. Unlike the codec-latent embedder it does not
    depend on any trained model, so it can judge the codec itself; the chroma part sees pitch
    classes with semitone resolution, the mel part timbre and loudness. Key: ``mel-chroma``.
    """

    name = "mel-chroma"
    proxy = False

    def __init__(self, cfg: MelChromaConfig = MelChromaConfig()) -> None:
        self.cfg = cfg
        self.sample_rate = int(cfg.sample_rate)

    def _frames(self, clip: np.ndarray) -> np.ndarray:
        return mel_chroma_frames(clip, self.sample_rate, self.cfg)

    def embed_frames(self, audio_batch, sample_rate: int) -> list[np.ndarray]:
        """Per-clip frame features, each [frames, D] float32 (D = 76 here, 12 for ``ChromaEmbedder``)."""
        return [self._frames(c).astype(np.float32) for c in self._prepare(audio_batch, sample_rate)]

    def _embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        return np.stack([self._frames(c).mean(axis=0) for c in clips])

    def units(self, audio_batch, sample_rate: int) -> list[np.ndarray]:
        """Every frame of every clip (FAD and KAD are computed on frames)."""
        return self.embed_frames(audio_batch, sample_rate)


class ChromaEmbedder(MelChromaEmbedder):
    """Model-free pitch embedder for FAD and KAD: ``MelChromaEmbedder``'s chroma part alone, 12 weighted
    log pitch-class shares per frame (``chroma_frames``). Key: ``chroma``.

    Why beside ``mel-chroma``: in the combined rows the 64 mel dimensions (loudness, dynamics,
    timbre) outweigh the 12 pitch ones, so a difference in the notes can hide behind a difference in
    dynamics. On the mini world's valid split (docs/reproduction.md) the teacher and ``student_base``
    were within noise on ``mel-chroma`` FAD while the chroma part alone separated them; this
    embedder reports that part on its own. It does not see loudness at all (the shares are
    normalised per frame).
    """

    name = "chroma"

    def _frames(self, clip: np.ndarray) -> np.ndarray:
        return chroma_frames(clip, self.sample_rate, self.cfg)


# ----------------------------------------------------------------------------------- sanity CLI


def _degradations(clips: list[np.ndarray], sample_rate: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Test transformations of real clips: what a measure should and should not notice."""
    from scipy.signal import istft, resample, stft

    rng = np.random.default_rng(seed)

    def noise(x, snr_db):
        n = rng.normal(size=len(x))
        return x + n * math.sqrt(np.mean(x**2) / np.mean(n**2) / 10 ** (snr_db / 10))

    def envelope_noise(x, frame=256):  # white noise with the clip's loudness over time, no pitch
        return rng.normal(size=len(x)) * np.sqrt(np.convolve(x**2, np.ones(frame) / frame, mode="same"))

    def spectral_envelope_noise(x, width_hz):  # |STFT| smoothed over width_hz, random phase
        f, _, z = stft(x, fs=sample_rate, nperseg=1024)
        k = max(1, round(width_hz / (f[1] - f[0])))
        mag = np.apply_along_axis(lambda c: np.convolve(c, np.ones(k) / k, mode="same"), 0, np.abs(z))
        _, y = istft(mag * np.exp(2j * np.pi * rng.random(z.shape)), fs=sample_rate, nperseg=1024)
        return y[: len(x)]

    return {
        "noise 10 dB": [noise(x, 10) for x in clips],
        "semitone up": [resample(x, round(len(x) / 2 ** (1 / 12))) for x in clips],  # also 6% faster
        "temporal-envelope noise": [envelope_noise(x) for x in clips],
        "spectral-envelope noise 66 Hz": [spectral_envelope_noise(x, 66) for x in clips],
        "spectral-envelope noise 200 Hz": [spectral_envelope_noise(x, 200) for x in clips],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Sanity figures on an audiofolder dataset's renders (docs/metrics.md quotes them)."""
    import argparse
    import json

    import torch

    from kdq.metrics import frechet_bootstrap, kad_bootstrap, median_bandwidth, paired_bootstrap, paired_kad_bootstrap
    from musicgen.data.audiofolder import load_audio, read_split
    from musicgen.eval.instrument import instrument_accuracy, train_instrument_classifier

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root", help="audiofolder root with train/valid/test splits (metadata: text, instrument, piece)")
    ap.add_argument("--sample-rate", type=int, default=8000)
    ap.add_argument("--ref-clips", type=int, default=200, help="train clips in the FAD/KAD reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sr = args.sample_rate
    splits = {s: read_split(args.root, s) for s in ("train", "valid", "test")}
    audio = {s: [load_audio(c.path, sr).astype(np.float64) for c in clips] for s, clips in splits.items()}
    valid, captions = audio["valid"], [c.text for c in splits["valid"]]
    pieces = [c.meta.get("piece") for c in splits["valid"]]
    other = []
    for i in range(len(valid)):  # a clip of another piece: the chance level
        j = (i + 37) % len(valid)
        while pieces[j] == pieces[i] and j != i:
            j = (j + 1) % len(valid)
        other.append(valid[j])
    degraded = _degradations(valid, sr, args.seed)
    out: dict = {"root": str(args.root), "clips": {s: len(a) for s, a in audio.items()}}
    out["chroma_correlation"] = {
        name: float(np.mean([chroma_correlation(x, y, sr) for x, y in zip(valid, clips)]))
        for name, clips in {"other piece": other, **degraded}.items()
    }
    out["key_accuracy"] = {
        s: key_accuracy(audio[s], [c.text for c in splits[s]], sr).to_dict() for s in ("train", "valid", "test")
    }
    for name in ("noise 10 dB", "semitone up", "temporal-envelope noise"):
        out["key_accuracy"][f"valid, {name}"] = key_accuracy(degraded[name], captions, sr).to_dict()
    for v in out["key_accuracy"].values():
        v.pop("per_item"), v.pop("per_item_mirex"), v.pop("estimated")
    classes = sorted({c.meta["instrument"] for c in splits["train"]})
    clf = train_instrument_classifier(audio["train"], [c.meta["instrument"] for c in splits["train"]], sr, classes=classes)
    out["instrument_accuracy"] = {"train": clf.info["train_accuracy"], "chance": 1 / len(classes)}
    sets = {"valid": valid, "test": audio["test"], **{f"valid, {k}": v for k, v in degraded.items()}}
    for name, clips in sets.items():
        caps = [c.text for c in splits["test"]] if name == "test" else captions
        out["instrument_accuracy"][name] = instrument_accuracy(clips, caps, sr, classifier=clf).accuracy
    emb = MelChromaEmbedder()
    order = np.random.default_rng(args.seed).permutation(len(audio["train"]))
    ref = emb.embed_frames([audio["train"][i] for i in order[: args.ref_clips]], sr)
    h = median_bandwidth(np.concatenate(ref))
    same = [audio["train"][i] for i in order[args.ref_clips : args.ref_clips + len(valid)]]
    frames = {k: emb.embed_frames(v, sr) for k, v in {"train, other clips": same, "valid": valid, **{f"valid, {k}": v for k, v in degraded.items()}}.items()}
    out["mel_chroma"] = {"bandwidth": h, "ref_clips": len(ref), "ref_rows": int(sum(len(r) for r in ref))}
    for name, fr in frames.items():
        fad = frechet_bootstrap(np.concatenate(fr), np.concatenate(ref), n_boot=50, seed=args.seed)
        kb = kad_bootstrap(fr, ref, bandwidth=h, n_boot=200, seed=args.seed)
        out["mel_chroma"][name] = {"clips": len(fr), "fad": fad.to_dict(), "kad": kb.to_dict()}
    out["paired"] = {}
    for name in ("noise 10 dB", "semitone up"):
        out["paired"][f"KAD: valid - valid, {name}"] = paired_kad_bootstrap(
            frames["valid"], frames[f"valid, {name}"], ref, bandwidth=h, n_boot=200, seed=args.seed
        ).to_dict()
        a = np.array(key_accuracy(valid, captions, sr).per_item)
        b = np.array(key_accuracy(degraded[name], captions, sr).per_item)
        out["paired"][f"key accuracy: valid - valid, {name}"] = paired_bootstrap(
            lambda x, _: float(np.mean(x)), a, b, n_boot=1000, seed=args.seed
        ).to_dict()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
    return out


if __name__ == "__main__":
    main()
