"""``kdq._io``, the one atomic write: old content survives a failure, no temp files, umask modes, fsync order."""

from __future__ import annotations

import os
import stat

import pytest

from kdq import _io
from kdq._io import atomic_path, atomic_write_bytes, atomic_write_text


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_text_and_bytes_round_trip_and_overwrite(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    atomic_write_bytes(path, b"\x00\xffnew")
    assert path.read_bytes() == b"\x00\xffnew"
    assert _listing(path.parent) == ["a.txt"]


@pytest.mark.parametrize("where", ["writer", "replace", "fsync"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    path = atomic_write_text(tmp_path / "plan.json", "old")
    if where == "writer":
        with pytest.raises(RuntimeError, match="boom"):
            with atomic_path(path) as tmp:
                tmp.write_text("half writ")
                raise RuntimeError("boom")
    else:
        def fail(*args, **kwargs):
            raise OSError(f"{where} failed")

        monkeypatch.setattr(os, where, fail)
        with pytest.raises(OSError, match=f"{where} failed"):
            atomic_write_text(path, "new content")
    assert path.read_text() == "old"
    assert _listing(tmp_path) == ["plan.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"x")
            raise KeyError("writer failed")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_mode_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        new = atomic_write_text(tmp_path / "new.txt", "x")
        existing = tmp_path / "existing.txt"
        existing.write_text("x")
        existing.chmod(0o600)
        atomic_write_text(existing, "y")  # a rewrite gets the umask's mode too, as open() on a new file would
        with atomic_path(tmp_path / "w.bin") as tmp:  # writers that create the file themselves
            tmp.unlink()
            tmp.write_bytes(b"z")
    finally:
        os.umask(old)
    for p in (new, existing, tmp_path / "w.bin"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name
    assert _io._umask() == old


def test_fsync_file_before_rename_and_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    atomic_write_text(tmp_path / "f.json", "{}")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_export_names_are_the_library_writer(tmp_path):
    from kdq.export import atomic

    assert atomic.atomic_path is atomic_path and atomic.write_text_atomic is atomic_write_text
    assert atomic.write_text_atomic(tmp_path / "x.txt", "y").read_text() == "y"


def test_fsync_dir_is_best_effort(tmp_path):
    from kdq._io import fsync_dir

    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # the folder of a file that may not exist yet: no error
