"""Atomic, resumable training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``DIR/`` holding ``model.safetensors`` (the module's state dict),
``optim.safetensors`` (the optimizer's per-parameter tensors and the data generator's RNG state) and
``state.json`` (step, optimizer hyper-parameters, caller's scalars). It is written into a temporary
sibling folder and moved into place with ``os.replace``, so a run killed at any moment leaves either
the previous checkpoint or the new one, never a torn one. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kdq.errors import KdqError


class CheckpointError(KdqError):
    """A checkpoint folder that is missing files or does not match the model it is loaded into."""


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    state: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    extra: dict[str, torch.Tensor] = {}
    meta: dict = {"state": state or {}}
    if optimizer is not None:
        extra, meta["optimizer"] = _flatten_optimizer(optimizer)
    if generator is not None:
        extra["rng.generator"] = generator.get_state()
    extra["rng.torch"] = torch.get_rng_state()
    save_file(extra, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """Restore a checkpoint in place and return the caller's ``state`` dict saved with it."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint={str(path)!r}: {name} is missing; delete the folder to start over")
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint={str(path)!r} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "the model config changed, delete the checkpoint to retrain"
        )
    meta = json.loads((path / "state.json").read_text())
    extra = load_file(str(path / "optim.safetensors"))
    if optimizer is not None and "optimizer" in meta:
        optimizer.load_state_dict(_unflatten_optimizer(extra, meta["optimizer"]))
    if generator is not None and "rng.generator" in extra:
        generator.set_state(extra["rng.generator"])
    if "rng.torch" in extra:
        torch.set_rng_state(extra["rng.torch"])
    return meta["state"]
