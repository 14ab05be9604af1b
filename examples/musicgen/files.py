"""Files the example writes: strict JSON, WAV, and SHA-256 sums, always atomically (``kdq._io``)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdq._io import atomic_path, atomic_write_text


def plain(obj: Any) -> Any:
    """``obj`` as strict JSON data: numpy scalars and tensors as numbers and lists, paths as strings,
    NaN and infinities as None (so that any JSON parser reads the file)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return plain(obj.item())
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays, torch tensors
        return plain(obj.tolist())
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` (through ``plain``) as indented strict JSON, atomically."""
    return atomic_write_text(path, json.dumps(plain(obj), indent=1, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (UTF-8)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int, *, normalise: bool = False) -> Path:
    """Write mono ``[samples]`` or ``[channels, samples]`` float audio as 16-bit PCM WAV, atomically.

    Samples are clipped to [-1, 1]; ``normalise`` first scales a clip whose peak exceeds 1 down to 1.
    """
    import soundfile as sf

    data = np.asarray(audio, dtype=np.float32)
    if normalise:
        data = data / max(1.0, float(np.abs(data).max(initial=0.0)))
    data = np.clip(data, -1.0, 1.0)
    data = data.T if data.ndim == 2 else data
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, sample_rate, format="WAV", subtype="PCM_16")
    return Path(path)


def sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
