"""Datasets in the audiofolder convention: audio files plus a metadata file with a text column.

Layout (the one Hugging Face's ``audiofolder`` loader reads)::

    ROOT/<split>/metadata.jsonl   # one JSON object a line: {"file_name": "x.wav", "text": "...", ...}
    ROOT/<split>/x.wav            # mono or multi-channel audio, any sample rate soundfile reads

``metadata.csv`` with a ``file_name`` column is accepted as well. The same loader serves the mini
world's rendered music and a user's own dataset in the paper preset.

A user's dataset may hold bad items. They are skipped and counted, each with its reason, never
fatal one by one: a metadata line that is not JSON or not UTF-8 (reported as ``file:line``), a
missing or non-text caption, a ``file_name`` that leads outside the split's folder, and (when the
audio is read) a missing, unreadable, empty or non-finite file. A split whose share of bad items
exceeds ``max_bad_fraction`` stops with a ``DatasetError`` listing the first reasons.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np

from kdq._io import atomic_write_text
from kdq.errors import KdqError


class DatasetError(KdqError):
    """A dataset folder that does not follow the audiofolder convention, or has too many bad items."""


@dataclass(frozen=True)
class Clip:
    """One example: where its audio is, its caption, and whatever else the metadata holds."""

    path: Path
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """Items left out of a split, with why (``where``: ``file:line`` or the audio file)."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.items.append((where, why))

    def summary(self) -> dict:
        return {"count": len(self.items), "reasons": dict(Counter(why for _, why in self.items)),
                "first": [f"{w}: {why}" for w, why in self.items[:5]]}


def _rows(folder: Path, skipped: Skipped) -> list[tuple[str, dict]]:
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        rows = []
        for n, raw in enumerate(jsonl.read_bytes().splitlines(), start=1):
            where = f"{jsonl}:{n}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.add(where, "not UTF-8")
                continue
            except json.JSONDecodeError as e:
                skipped.add(where, f"not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                skipped.add(where, "not a JSON object")
                continue
            rows.append((where, row))
        return rows
    if csv_path.exists():
        try:
            text = csv_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{csv_path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
        return [(f"{csv_path}:{n}", row) for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2)]
    raise DatasetError(
        f"no metadata.jsonl or metadata.csv in {folder}; expected the audiofolder layout "
        "ROOT/<split>/metadata.jsonl with file_name and text columns"
    )


def read_split(root: str | Path, split: str, *, text_column: str = "text",
               skipped: Skipped | None = None) -> list[Clip]:
    """Read ``ROOT/split/metadata.{jsonl,csv}`` into clips, in file order; bad rows go to ``skipped``."""
    folder = Path(root) / split
    skipped = skipped if skipped is not None else Skipped()
    base = folder.resolve()
    rows = _rows(folder, skipped)
    if rows and not any(text_column in row for _, row in rows):
        raise DatasetError(f"{folder}: no metadata row has the caption column {text_column!r} (text_column="
                           f"{text_column!r}); the first row has {sorted(rows[0][1])}")
    clips = []
    for where, row in rows:
        name, text = row.get("file_name"), row.get(text_column)
        if not isinstance(name, str) or not name:
            skipped.add(where, "no file_name")
            continue
        if not isinstance(text, str) or not text.strip():
            skipped.add(where, f"no caption in column {text_column!r}")
            continue
        path = (folder / name).resolve()
        if not path.is_relative_to(base):
            skipped.add(where, "file_name leads outside the split's folder")
            continue
        meta = {k: v for k, v in row.items() if k not in ("file_name", text_column)}
        clips.append(Clip(folder / name, text, meta))
    return clips


def check_bad_share(split: str, good: int, skipped: Skipped, max_bad_fraction: float) -> None:
    """Raise ``DatasetError`` if more than ``max_bad_fraction`` of a split's items were bad."""
    total = good + len(skipped.items)
    if total and len(skipped.items) / total > max_bad_fraction:
        s = skipped.summary()
        raise DatasetError(f"split {split!r}: {s['count']} of {total} items are bad (more than "
                           f"max_bad_fraction={max_bad_fraction}): {s['reasons']}; first: {s['first']}")


def write_metadata(root: str | Path, split: str, rows: list[dict]) -> Path:
    """Write ``ROOT/split/metadata.jsonl`` atomically (rows need ``file_name`` and ``text``)."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    return atomic_write_text(Path(root) / split / "metadata.jsonl", text)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling along the last axis (scipy); a no-op when the rates match."""
    if orig_sr == target_sr:
        return audio
    from scipy.signal import resample_poly

    g = gcd(int(orig_sr), int(target_sr))
    return resample_poly(audio, target_sr // g, orig_sr // g, axis=-1).astype(np.float32)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a file as mono float32 at ``sample_rate`` (channels averaged, resampled if needed)."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), sr, sample_rate)


def load_clips(clips: list[Clip], sample_rate: int, skipped: Skipped) -> tuple[list[Clip], list[np.ndarray]]:
    """Read every clip's audio; unreadable, empty or non-finite files go to ``skipped``."""
    kept, audio = [], []
    for clip in clips:
        try:
            x = load_audio(clip.path, sample_rate)
        except Exception as e:  # noqa: BLE001 - soundfile raises several types for bad files
            skipped.add(str(clip.path), "missing" if not clip.path.exists() else f"unreadable ({type(e).__name__})")
            continue
        if x.size == 0:
            skipped.add(str(clip.path), "no samples")
        elif not np.isfinite(x).all():
            skipped.add(str(clip.path), "NaN or infinite samples")
        else:
            kept.append(clip)
            audio.append(x)
    return kept, audio
