"""Checkpoints of the training loop: atomic, checksummed, and resumable from the newest intact one.

A checkpoint of step N is a folder ``DIR/step-0000000N/`` holding

- ``weights.safetensors``: the tensors the run trains or updates (trainable parameters, and buffers
  such as a codec's codebooks), by name;
- ``optimizer.safetensors`` and ``state.json``: AdamW's per-parameter tensors; the step, the
  optimizer's hyper-parameters and the caller's JSON state;
- ``checksums.json``: the SHA-256 of the three files above, written last.

It is written into a temporary sibling folder, every file fsynced, moved into place with
``os.replace``, and only then ``DIR/latest.json`` is replaced atomically. The last ``keep`` complete
checkpoints are kept. On resume the newest checkpoint whose files match their checksums is loaded; a
torn or corrupted one (truncated file, flipped bits, deleted folder, unreadable JSON) is skipped with
a warning naming it, and a ``CheckpointError`` naming the folder is raised when checkpoints exist but
none is intact. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from kdq._io import atomic_write_text, fsync_dir
from kdq.errors import KdqError
from musicgen.files import sha256

FILES = ("weights.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(KdqError):
    """No intact checkpoint in a folder that has some, or a checkpoint that does not fit the run."""


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: str | Path, *, step: int, tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """Write ``folder/step-N`` (see the module docstring) and point ``latest.json`` at it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step:08d}.", suffix=".tmp"))
    try:
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _optimizer_parts(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
        (tmp / "checksums.json").write_text(json.dumps({f: sha256(tmp / f) for f in FILES}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(folder / "latest.json", json.dumps({"step": step, "path": final.name}))
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step-*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _intact(path: Path) -> str | None:
    """None if the checkpoint folder's files match its checksums, else what is wrong."""
    try:
        sums = json.loads((path / "checksums.json").read_text())
    except (OSError, ValueError):
        return "checksums.json is missing or unreadable"
    for name in FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256(path / name) != sums.get(name):
            return f"{name} does not match its checksum"
    return None


def candidates(folder: Path) -> list[Path]:
    """Checkpoint folders, newest first (``latest.json``'s choice first when it is readable)."""
    found = sorted((p for p in folder.glob("step-*") if p.is_dir()), reverse=True)
    try:
        latest = folder / json.loads((folder / "latest.json").read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return found
    return [latest, *(p for p in found if p != latest)]


def load_checkpoint(folder: str | Path, *, tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore the newest intact checkpoint into ``tensors`` (in place) and ``optimizer``.

    Returns its JSON state (with ``step``), or None when the folder holds no checkpoint at all.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    tried = []
    for path in candidates(folder) if folder.is_dir() else []:
        problem = _intact(path)
        if problem is not None:
            tried.append(f"{path.name}: {problem}")
            warnings.warn(f"checkpoint {path} is not intact ({problem}); trying an older one", stacklevel=2)
            continue
        weights = load_file(str(path / "weights.safetensors"))
        if sorted(weights) != sorted(tensors):
            extra, missing = sorted(set(weights) - set(tensors)), sorted(set(tensors) - set(weights))
            raise CheckpointError(f"checkpoint {path} does not fit this run (unexpected {extra[:3]}, missing "
                                  f"{missing[:3]}); resume with the same model, or use a fresh output folder")
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(weights[name])
        state = json.loads((path / "state.json").read_text())
        optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer")))
        return state
    if tried:
        raise CheckpointError(f"no intact checkpoint in {folder} ({'; '.join(tried)}); delete the folder to start over")
    return None
