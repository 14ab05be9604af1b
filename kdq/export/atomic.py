"""Atomic file writes for export, on the library-wide ``kdq._io``: a failed export never leaves a
half-written file behind (temporary file in the same folder, fsync, ``os.replace``, fsync of the folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from kdq._io import atomic_path
from kdq._io import atomic_write_text as write_text_atomic  # the export name of the one text writer

__all__ = ["atomic_path", "save_onnx_atomic", "write_text_atomic"]


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
