"""One atomic write for the whole library: a file is either its old content or its new content.

Every file kdq writes (plans, profile caches, ONNX graphs, safetensors) goes through here:

1. the new content is written to a temporary file in the destination's folder (same file system, so
   the rename below is atomic), named ``.<name>.<random>.tmp``;
2. the temporary file is flushed and ``fsync``-ed, so its data is on disk before it gets the name;
3. its mode is set to ``0o666 & ~umask`` (``mkstemp`` creates ``0o600``), as ``open()`` would;
4. ``os.replace`` moves it onto the destination (readers see the old or the new file, never half);
5. the folder is ``fsync``-ed, so the rename itself survives a power cut.

If anything fails before step 4 the temporary file is removed and the destination is untouched.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Sync a folder's entries (a rename, a new file) to disk; best effort where the OS refuses it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it becomes ``path`` only if the block succeeds.

    For writers that take a file name (``onnx.save``, ``safetensors.torch.save_file``). The parent
    folder is created if needed. On an exception the temporary file is removed and ``path`` keeps its
    previous content (or stays absent).

    Example:
        >>> with atomic_path("model.onnx") as tmp:  # doctest: +SKIP
        ...     onnx.save(model, str(tmp))
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))
