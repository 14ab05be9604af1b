"""Datasets in the audiofolder convention: audio files plus a metadata file with a text column.

Layout (the one Hugging Face's ``audiofolder`` loader reads)::

    ROOT/<split>/metadata.jsonl   # one JSON object a line: {"file_name": "x.wav", "text": "...", ...}
    ROOT/<split>/x.wav            # mono or multi-channel audio, any sample rate soundfile reads

``metadata.csv`` with a ``file_name`` column is accepted as well. The same loader serves the mini
world's rendered music and a user's own dataset in the paper preset.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np

from kdq.errors import KdqError


class DatasetError(KdqError):
    """A dataset folder that does not follow the audiofolder convention."""


@dataclass(frozen=True)
class Clip:
    """One example: where its audio is, its caption, and whatever else the metadata holds."""

    path: Path
    text: str
    meta: dict = field(default_factory=dict)


def read_split(root: str | Path, split: str, *, text_column: str = "text") -> list[Clip]:
    """Read ``ROOT/split/metadata.{jsonl,csv}`` into clips, in file order."""
    folder = Path(root) / split
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    elif csv_path.exists():
        with csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DatasetError(
            f"root={str(root)!r}, split={split!r}: no metadata.jsonl or metadata.csv in {folder}; "
            "expected the audiofolder layout ROOT/<split>/metadata.jsonl with file_name and text columns"
        )
    clips = []
    for i, row in enumerate(rows):
        if "file_name" not in row or text_column not in row:
            raise DatasetError(
                f"{folder}: metadata row {i} has columns {sorted(row)}; it needs 'file_name' and "
                f"{text_column!r} (text_column={text_column!r})"
            )
        meta = {k: v for k, v in row.items() if k not in ("file_name", text_column)}
        clips.append(Clip(folder / row["file_name"], str(row[text_column]), meta))
    return clips


def write_metadata(root: str | Path, split: str, rows: list[dict]) -> Path:
    """Write ``ROOT/split/metadata.jsonl`` atomically (rows need ``file_name`` and ``text``)."""
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "metadata.jsonl"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metadata.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


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
