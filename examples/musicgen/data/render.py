"""Real music rendered offline: music21's corpus -> MIDI -> mono audio clips with captions.

Pieces come from the corpus bundled with music21 (Bach chorales, fiddle tunes, Renaissance masses,
madrigals, trecento songs, classical quartets). Each selected piece is parsed, its key analysed,
converted to MIDI, and rendered ``renders_per_piece`` times through FluidSynth with the General MIDI
SoundFont that ships inside pretty_midi (TimGM6mb.sf2), each render with its own instrument, tempo and
transposition. Each render is cut into a few clips of ``clip_seconds`` with a caption a person could
have written ("A slow Bach chorale in G minor played on church organ, four-part harmony.").

Splits are by piece (every render and clip of a piece lands in one split); ``test`` is held out for
evaluation only. Everything is a deterministic function of the config (the seed included): each piece
draws from its own generator keyed by ``(seed, piece)``, so the result does not depend on worker
scheduling. Pieces that fail to parse or render are skipped and counted in the stats, never fatal.

Each clip's metadata also holds the score's notes that sound in it (``notes``: ``[MIDI pitch, onset_s,
offset_s]`` relative to the clip's start, after transposition), so that what a codec or a
generator does to pitch can be checked against the score.

Output (the audiofolder convention read by ``musicgen.data.audiofolder.read_split``)::

    OUT/{train,valid,test}/metadata.jsonl, OUT/<split>/*.wav, OUT/stats.json

The recipe is ``musicgen.config.RenderConfig``; ``render_dataset(cfg, out, seed=...)`` runs it.
"""

from __future__ import annotations

import io
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdq.errors import KdqError
from musicgen.data.audiofolder import write_metadata
from musicgen.files import write_json, write_wav

if TYPE_CHECKING:
    from musicgen.config import RenderConfig

SPLITS = ("train", "valid", "test")


class RenderError(KdqError):
    """A render configuration that cannot work (unknown source, bad fractions, no renderer)."""


@dataclass(frozen=True)
class Source:
    """A pool of corpus pieces and the words used to describe them."""

    composer: str  # music21 corpus composer directory
    suffixes: tuple[str, ...]  # file types kept (some pieces exist in several encodings)
    style: str  # noun phrase: "Bach chorale"
    era: str  # "baroque", "folk", ...


# Keys are the names used in ``RenderConfig.pieces``.
SOURCES: dict[str, Source] = {
    "bach": Source("bach", (".mxl",), "Bach chorale", "baroque"),
    "folk": Source("ryansMammoth", (".abc",), "fiddle tune", "folk"),
    "palestrina": Source("palestrina", (".krn",), "Renaissance mass movement by Palestrina", "renaissance"),
    "monteverdi": Source("monteverdi", (".mxl",), "Monteverdi madrigal", "renaissance"),
    "trecento": Source("trecento", (".xml",), "medieval trecento song", "medieval"),
    "classical": Source("mozart", (".mxl",), "Mozart string quartet movement", "classical"),
}

# General MIDI programs the TimGM6mb SoundFont renders well, with the name a person would use.
INSTRUMENTS: tuple[tuple[int, str], ...] = (
    (0, "piano"),
    (6, "harpsichord"),
    (19, "church organ"),
    (21, "accordion"),
    (24, "acoustic guitar"),
    (46, "harp"),
    (48, "string ensemble"),
    (52, "choir"),
    (71, "clarinet"),
    (73, "flute"),
    (11, "vibraphone"),
    (68, "oboe"),
)

#: What a ``RenderConfig`` renders also depends on this code: bump it when a change alters the audio,
#: captions or metadata of a config (stage keys and the hub's recipe digest include it, so caches
#: rendered by older code are redone). 2: each render of a piece has its own instrument.
RENDERER = 2

# Dance and form names found in fiddle-tune titles, used to refine "fiddle tune".
FOLK_FORMS = ("reel", "jig", "hornpipe", "strathspey", "march", "waltz", "polka", "air", "schottische")


@dataclass(frozen=True)
class Piece:
    """One corpus piece chosen for rendering."""

    key: str  # "bach/bwv10.7.mxl": stable identifier, relative to the corpus
    source: str
    path: str
    split: str


def _piece_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def select_pieces(cfg: RenderConfig, *, seed: int) -> list[Piece]:
    """The seeded choice of pieces and their split, in a stable order.

    Each source's files are listed, sorted, shuffled with the seed, and the first ``n`` taken. The
    split is assigned per piece by a seeded permutation inside each source, so every source is
    represented in each split once it has enough pieces (at least one test piece per source with two
    or more pieces when the test fraction is positive).
    """
    from music21 import corpus

    out: list[Piece] = []
    for name, n in sorted(cfg.pieces.items()):
        src = SOURCES[name]
        paths = sorted(
            str(p) for p in corpus.getComposer(src.composer) if Path(str(p)).suffix.lower() in src.suffixes
        )
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        chosen = [paths[i] for i in rng.permutation(len(paths))[:n]]
        valid_f, test_f = cfg.fractions
        n_test = int(round(test_f * len(chosen)))
        n_valid = int(round(valid_f * len(chosen)))
        if len(chosen) >= 2 and test_f > 0:
            n_test = max(n_test, 1)
        if len(chosen) >= 3 and valid_f > 0:
            n_valid = max(n_valid, 1)
        for i, path in enumerate(chosen):
            split = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
            rel = path.split("/corpus/", 1)[-1]
            out.append(Piece(rel, name, path, split))
    return out


def _key_words(tonic: str, mode: str) -> str:
    """'E-' 'major' -> 'E flat major'."""
    name = tonic.replace("-", " flat").replace("#", " sharp")
    return f"{name} {mode}"


_NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def _texture(n_parts: int, source: str) -> str:
    if source == "classical":
        return "a quartet texture of melody and accompaniment"
    if n_parts <= 1:
        return "a single melody line"
    if n_parts == 2:
        return "two-part counterpoint"
    if source == "bach":
        return "four-part harmony"
    return f"{_NUMBER_WORDS.get(n_parts, 'many')}-voice polyphony"


def _tempo_word(bpm: float) -> str:
    if bpm < 72:
        return "slow"
    if bpm < 96:
        return "moderate"
    if bpm < 124:
        return "lively"
    return "fast"


def _style(source: str, title: str) -> str:
    style = SOURCES[source].style
    if source == "folk":
        low = title.lower()
        for form in FOLK_FORMS:
            if re.search(rf"\b{form}s?\b", low):
                return f"folk {form}"
    return style


def make_caption(*, rng: np.random.Generator, style: str, tempo: str, key: str, instrument: str, texture: str) -> str:
    """A caption in one of several phrasings a person might use."""
    article = "An" if tempo[0] in "aeiou" else "A"
    templates = (
        f"{article} {tempo} {style} in {key} played on {instrument}, {texture}.",
        f"{instrument.capitalize()} plays a {tempo} {style} in {key}, {texture}.",
        f"{style[0].upper() + style[1:]} in {key}, {tempo} tempo, on {instrument} with {texture}.",
        f"{article} {tempo} {instrument} rendition of a {style} in {key}; {texture}.",
    )
    return templates[int(rng.integers(len(templates)))]


def _sf2_path() -> str:
    import pretty_midi

    path = Path(pretty_midi.__file__).with_name("TimGM6mb.sf2")
    if not path.exists():
        raise RenderError(f"SoundFont {path} missing: reinstall pretty_midi (pip install 'kdq[examples]')")
    return str(path)


def _normalise(clip: np.ndarray, *, target_rms: float = 0.1) -> np.ndarray:
    rms = float(np.sqrt(np.mean(clip**2)) + 1e-9)
    clip = clip * (target_rms / rms)
    peak = float(np.abs(clip).max())
    return (clip / peak * 0.95 if peak > 0.95 else clip).astype(np.float32)


def render_piece(piece: Piece, cfg: RenderConfig, out: Path, *, seed: int) -> tuple[list[dict], dict | None]:
    """Parse, analyse and render one piece; write its clips under ``out/<split>/``.

    Returns the metadata rows and ``None``, or no rows and a failure record ``{piece, stage, error}``.
    """
    import pretty_midi
    from music21 import converter
    from music21.midi import translate

    rng = _piece_rng(seed, piece.key)
    stage = "parse"
    try:
        score = converter.parse(piece.path)
        if hasattr(score, "scores"):  # an Opus: take its first score
            score = score.scores[0]
        title = (score.metadata.title if score.metadata and score.metadata.title else Path(piece.key).stem) or ""
        n_parts = max(1, len(score.parts))
        stage = "key"
        k = score.analyze("key")
        stage = "midi"
        midi_bytes = translate.streamToMidiFile(score).writestr()
        base = pretty_midi.PrettyMIDI(io.BytesIO(midi_bytes))
        _, tempi = base.get_tempo_changes()
        source_bpm = float(tempi[0]) if len(tempi) else 120.0
        if not any(inst.notes for inst in base.instruments):
            raise RenderError("no notes")
    except Exception as e:  # noqa: BLE001 - a bad corpus file is counted, never fatal
        return [], {"piece": piece.key, "stage": stage, "error": f"{type(e).__name__}: {e}"[:300]}

    rows: list[dict] = []
    folder = out / piece.split
    clip_len = int(round(cfg.clip_seconds * cfg.sample_rate))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", piece.key.rsplit(".", 1)[0]).strip("_")
    style = _style(piece.source, title)
    texture = _texture(n_parts, piece.source)
    sf2 = _sf2_path()
    # Each render of a piece gets its own instrument (a seeded order, drawn before anything else, so
    # render r is the same whatever renders_per_piece is): the instrument is not tied to the piece.
    order = rng.permutation(len(INSTRUMENTS))
    for r in range(cfg.renders_per_piece):
        program, instrument = INSTRUMENTS[int(order[r % len(INSTRUMENTS)])]
        bpm = float(rng.uniform(*cfg.bpm_range))
        shift = int(rng.integers(-cfg.transpose_range, cfg.transpose_range + 1))
        try:
            stage = "render"
            stretch = source_bpm / bpm  # seconds scale: slower tempo -> longer notes
            pm = pretty_midi.PrettyMIDI()
            inst = pretty_midi.Instrument(program=program)
            for src_inst in base.instruments:
                if src_inst.is_drum:
                    continue
                for n in src_inst.notes:
                    start, end = n.start * stretch, n.end * stretch
                    if start >= cfg.max_render_seconds:
                        continue
                    pitch = min(127, max(0, n.pitch + shift))
                    inst.notes.append(pretty_midi.Note(velocity=n.velocity, pitch=pitch, start=start, end=end))
            pm.instruments.append(inst)
            audio = pm.fluidsynth(fs=cfg.sample_rate, synthesizer=sf2).astype(np.float32)
        except Exception as e:  # noqa: BLE001
            return rows, {"piece": piece.key, "stage": stage, "error": f"{type(e).__name__}: {e}"[:300]}
        # Skip leading silence, then take non-overlapping windows that are not near-silent.
        active = np.flatnonzero(np.abs(audio) > 1e-3)
        start = int(active[0]) if len(active) else 0
        key = k.transpose(shift) if shift else k
        key_words = _key_words(key.tonic.name, key.mode)
        for c in range(cfg.clips_per_render):
            lo = start + c * clip_len
            clip = audio[lo : lo + clip_len]
            if len(clip) < clip_len or float(np.sqrt(np.mean(clip**2))) < 1e-3:
                break
            name = f"{slug}_r{r}_c{c}.wav"
            write_wav(folder / name, _normalise(clip), cfg.sample_rate)
            caption = make_caption(
                rng=rng, style=style, tempo=_tempo_word(bpm), key=key_words, instrument=instrument, texture=texture
            )
            rows.append(
                {
                    "file_name": name,
                    "text": caption,
                    "piece": piece.key,
                    "source": piece.source,
                    "era": SOURCES[piece.source].era,
                    "instrument": instrument,
                    "program": program,
                    "bpm": round(bpm, 1),
                    "tempo": _tempo_word(bpm),
                    "key": key_words,
                    "mode": key.mode,
                    "transpose": shift,
                    "parts": n_parts,
                    "texture": texture,
                    "render": r,
                    "clip": c,
                    "seconds": cfg.clip_seconds,
                    "notes": _clip_notes(inst.notes, lo / cfg.sample_rate, cfg.clip_seconds),
                }
            )
    if not rows:
        return [], {"piece": piece.key, "stage": "clip", "error": "render shorter than one clip or silent"}
    return rows, None


def _clip_notes(notes: list, start: float, seconds: float) -> list[list[float]]:
    """``[MIDI pitch, onset, offset]`` of the notes sounding in ``[start, start + seconds)``, clip-relative."""
    end = start + seconds
    return [[int(n.pitch), round(max(n.start, start) - start, 3), round(min(n.end, end) - start, 3)]
            for n in sorted(notes, key=lambda n: (n.start, n.pitch)) if n.start < end and n.end > start]


def _work(args: tuple) -> tuple[list[dict], dict | None, str]:
    piece, cfg, out, seed = args
    rows, failure = render_piece(piece, cfg, Path(out), seed=seed)
    return rows, failure, piece.split


def render_dataset(cfg: RenderConfig, out: str | Path, *, seed: int, progress: bool = True) -> dict:
    """Render the whole dataset into ``out`` and return its stats (also written to ``out/stats.json``).

    ``out`` is written in place; callers that need atomicity render into a temporary folder and rename
    it (the stage runner does). Uses ``cfg.workers`` processes; the output does not depend on it.
    """
    from tqdm import tqdm

    _sf2_path()
    out = Path(out)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    pieces = select_pieces(cfg, seed=seed)
    t0 = time.time()
    jobs = [(p, cfg, str(out), seed) for p in pieces]
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    failures: list[dict] = []
    bar = tqdm(total=len(jobs), desc="render", unit="piece", disable=not progress)
    import multiprocessing as mp

    # Always render in fresh "spawn" workers, even with one: the audio must not depend on what the
    # calling process did before (its torch threads, floating-point modes other libraries set, a synth
    # already loaded). Seen: an in-process render inside the full test suite differed from a spawned one.
    # Results come back in piece order.
    with mp.get_context("spawn").Pool(cfg.workers) as pool:
        for r, failure, split in pool.imap(_work, jobs, chunksize=2):
            rows[split].extend(r)
            if failure:
                failures.append(failure)
            bar.update()
    bar.close()
    for split in SPLITS:
        write_metadata(out, split, rows[split])
    stats = dataset_stats(rows, failures, cfg=cfg, n_pieces=len(pieces), seconds=time.time() - t0)
    write_json(out / "stats.json", stats)
    return stats


def dataset_stats(rows: dict[str, list[dict]], failures: list[dict], *, cfg: RenderConfig, n_pieces: int, seconds: float) -> dict:
    """Counts, minutes, caption vocabulary and failures of a rendered dataset."""
    words = Counter(w for split in rows.values() for row in split for w in re.findall(r"[a-z]+", row["text"].lower()))
    per_split = {}
    for split, rs in rows.items():
        per_split[split] = {
            "clips": len(rs),
            "pieces": len({r["piece"] for r in rs}),
            "minutes": round(sum(r["seconds"] for r in rs) / 60.0, 2),
            "sources": dict(sorted(Counter(r["source"] for r in rs).items())),
        }
    all_rows = [r for rs in rows.values() for r in rs]
    return {
        "pieces_selected": n_pieces,
        "pieces_rendered": len({r["piece"] for r in all_rows}),
        "failures": len(failures),
        "failure_list": failures,
        "clips": len(all_rows),
        "minutes": round(sum(r["seconds"] for r in all_rows) / 60.0, 2),
        "splits": per_split,
        "instruments": dict(sorted(Counter(r["instrument"] for r in all_rows).items())),
        "tempo_words": dict(sorted(Counter(r["tempo"] for r in all_rows).items())),
        "modes": dict(sorted(Counter(r["mode"] for r in all_rows).items())),
        "caption_vocabulary": len(words),
        "caption_words": dict(words.most_common()),
        "distinct_captions": len({r["text"] for r in all_rows}),
        "render_seconds": round(seconds, 1),
        "sample_rate": cfg.sample_rate,
    }
