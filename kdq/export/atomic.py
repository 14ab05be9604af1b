"""Atomic file writes: a failed export never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the destination folder, so the final ``os.replace`` is atomic on
    POSIX file systems. If the block raises, the temporary file is removed and ``path`` is left as it
    was (absent, or its previous content).

    Example:
        >>> with atomic_path("model.onnx") as tmp:  # doctest: +SKIP
        ...     onnx.save(model, tmp)
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_onnx_atomic(model, path: str | os.PathLike) -> Path:
    """Check ``model`` (an ``onnx.ModelProto``) and save it to ``path`` atomically.

    Models above protobuf's 2 GB limit are not supported here (no external data): MusicGen-small's
    largest graph (the decoder, 1.7 GB in fp32) fits.
    """
    import onnx

    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
    return Path(path)
