"""Save a model converted by ``apply_plan`` and load it back exactly: ``save_quantized`` / ``load_quantized``.

``save_pretrained`` / ``from_pretrained`` do not know kdq's int8/int4 modules: the state dict holds
``qweight``/``scale`` where the float class expects ``weight``, so transformers reports them as
unexpected, leaves the layers at their random initialisation and returns a model whose logits are
off (by 0.79 on a tiny MusicGen in the adversarial pass of issue 13), with a warning only. kdq saves and loads its own format instead.

A folder (format ``kdq.quantized/1``) holds:

- ``kdq_model.safetensors``: every parameter and persistent buffer of the converted model (int8
  ``qweight``, fp32/fp16 ``scale``, fp16/bf16 weights, fp32 norms ...), each tied tensor once. Its
  header names the format and the SHA-256 of the plan file, so weights and plan of two different saves
  are never mixed.
- ``kdq_plan.json``: the plan that was applied (an ordinary plan file, ``kdq plan show`` reads it).
- ``config.json``, for transformers models: the model's config with ``architectures`` and a
  ``quantization_config`` of ``{"quant_method": "kdq", ...}`` saying how to load it.

``load_quantized`` builds the float architecture (``build()``, or the class ``config.json`` names,
built from that config with no weights read and no remote code), applies the saved plan (which
creates the int modules, the cast hooks and checks the plan's fingerprint), then copies the saved
tensors in after checking that names, shapes and dtypes match exactly. Building initialises random
float weights first (seconds at MusicGen-small size); they are replaced.

A plain ``from_pretrained`` on such a folder fails loudly (``OSError``: no ``model.safetensors`` or
``pytorch_model.bin``); transformers 5.24 only warns about the unknown ``quant_method``, so the
refusal rests on the weights' file name, and ``save_quantized`` refuses a folder that already holds
weights under the names transformers reads (it would load those instead). Safetensors and JSON only.

``load_quantized`` also reads the folder ``save_pretrained`` writes for a planned transformers model
(format ``kdq.hf/1``: the plan in ``config.json``'s ``quantization_config``, the tensors in
``model.safetensors``; see ``kdq.quant.hf``, which also makes plain ``from_pretrained`` refuse it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq._io import atomic_path, atomic_write_text
from kdq.quant.apply import apply_plan
from kdq.quant.errors import ModelFolderError
from kdq.quant.plan import Plan

__all__ = ["FORMAT", "PLAN_FILE", "WEIGHTS_FILE", "load_quantized", "model_from_config", "save_quantized"]

FORMAT = "kdq.quantized/1"
WEIGHTS_FILE = "kdq_model.safetensors"
PLAN_FILE = "kdq_plan.json"
_HF_WEIGHTS = re.compile(
    r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?$"
)


def save_quantized(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Save a model converted by ``apply_plan`` to ``folder`` (see the module docstring); returns it.

    Each file is written atomically; files of other names in ``folder`` are left alone.

    Raises:
        ModelFolderError: ``model`` was not converted by ``apply_plan``, or ``folder`` holds weights
            that ``from_pretrained`` would load instead of these.
    """
    from safetensors.torch import save_model

    plan = getattr(model, "_kdq_plan", None)
    if not isinstance(plan, Plan):
        raise ModelFolderError(
            f"model={type(model).__name__} was not converted by kdq.quant.apply_plan: save_quantized saves "
            "quantized models; save a float model with save_pretrained or safetensors"
        )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    clash = sorted(p.name for p in out.iterdir() if _HF_WEIGHTS.match(p.name))
    if clash:
        raise ModelFolderError(
            f"folder={str(out)!r} holds {clash}: from_pretrained would load those float weights and ignore "
            "the quantized ones; save into another folder, or remove them yourself (kdq never deletes them)"
        )
    plan_text = plan.to_json()
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp), metadata={"format": FORMAT, "plan_sha256": _sha256(plan_text)})
    atomic_write_text(out / PLAN_FILE, plan_text)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        d = config.to_dict()
        d["architectures"] = [type(model).__name__]
        d["quantization_config"] = {
            "quant_method": "kdq",
            "format": FORMAT,
            "weights": WEIGHTS_FILE,
            "plan": PLAN_FILE,
            "load_with": "kdq.quant.load_quantized(folder)",
        }
        atomic_write_text(out / "config.json", json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out


def load_quantized(folder: str | os.PathLike[str], *, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``, with exactly the saved tensors, in eval mode.

    Args:
        folder: the folder ``save_quantized`` wrote.
        build: returns the float model the plan was applied to (same class and sizes). Optional for
            transformers models: then the class and config come from ``folder/config.json``.

    Raises:
        ModelFolderError: a missing or corrupt file, weights and plan from different saves, no
            ``build`` and no ``config.json``, or saved tensors whose names, shapes or dtypes differ
            from what the plan makes of the built model.
        PlanError: the plan was made for a different architecture (fingerprint) or matches nothing.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    d = Path(folder)
    weights, plan_path = d / WEIGHTS_FILE, d / PLAN_FILE
    qc = None if weights.is_file() or plan_path.is_file() else _hf_quantization_config(d)
    if qc is not None:
        return _load_save_pretrained_folder(d, qc, build)
    missing = [p.name for p in (weights, plan_path) if not p.is_file()]
    if missing:
        raise ModelFolderError(
            f"folder={str(d)!r} is not a kdq quantized model: {missing} missing; write one with "
            "kdq.quant.save_quantized(model, folder)"
        )
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{weights} is not a readable safetensors file ({e}); save the model again") from None
    if meta.get("format") != FORMAT:
        raise ModelFolderError(f"{weights} has format {meta.get('format')!r}: this kdq reads {FORMAT!r}")
    plan_text = plan_path.read_bytes()
    if meta.get("plan_sha256") != _sha256(plan_text):
        raise ModelFolderError(
            f"{plan_path} is not the plan {weights.name} was saved with (SHA-256 differs): the folder mixes "
            "two saves; save the model again"
        )
    plan = Plan.load(plan_path)
    model = _build_planned(d, plan, build)
    _load_exactly(model, tensors, weights)
    return model.eval()


def _build_planned(d: Path, plan: Plan, build: Callable[[], nn.Module] | None) -> nn.Module:
    """The float model (``build()`` or from ``d/config.json``) with ``plan`` applied."""
    if build is None:
        model = model_from_config(d)
    else:
        model = build()
        if not isinstance(model, nn.Module):
            raise ModelFolderError(f"build() returned {type(model).__name__}: it must return the float nn.Module")
    return apply_plan(model, plan)


def _hf_quantization_config(d: Path) -> dict[str, Any] | None:
    """``quantization_config`` of ``d/config.json`` if ``save_pretrained`` wrote it for a kdq plan, else None."""
    from kdq.quant import hf

    try:
        qc = json.loads((d / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(qc, dict) and qc.get("quant_method") == hf.QUANT_METHOD and qc.get("format") != FORMAT:
        return qc
    return None


def _load_save_pretrained_folder(d: Path, qc: dict[str, Any], build: Callable[[], nn.Module] | None) -> nn.Module:
    """A folder ``save_pretrained`` wrote for a planned model (``kdq/quant/hf.py``): plan in config.json,
    tensors in ``model.safetensors`` (or its shards), placeholders under the replaced float names."""
    from safetensors import SafetensorError, safe_open

    from kdq.quant import hf

    if qc.get("format") != hf.FORMAT or not isinstance(qc.get("plan"), str):
        raise ModelFolderError(f"{d / 'config.json'} has a kdq quantization_config of format {qc.get('format')!r}: this kdq reads {hf.FORMAT!r}")
    plan = Plan.from_json(qc["plan"])
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif index.is_file():
        try:
            files = [d / f for f in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFolderError(f"{index} is not a safetensors index ({e}); save the model again") from None
    else:
        raise ModelFolderError(f"folder={str(d)!r} has a kdq quantization_config but no model.safetensors; save the model again")
    want = _sha256(qc["plan"])
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("kdq_format") != hf.FORMAT or meta.get("plan_sha256") != want:
                    raise ModelFolderError(
                        f"{f} was not written for the plan in {d / 'config.json'} (format {meta.get('kdq_format')!r}, "
                        "plan SHA-256 differs): the folder mixes two saves; save the model again"
                    )
                tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
        except (SafetensorError, OSError) as e:
            raise ModelFolderError(f"{f} is not a readable safetensors file ({e}); save the model again") from None
    model = _build_planned(d, plan, build)
    for k in hf.placeholder_keys(model):
        t = tensors.pop(k, None)
        if t is None or t.dtype != torch.int8 or tuple(t.shape) != (1,):
            raise ModelFolderError(f"{files[0]}: {k} is not kdq's placeholder for a replaced weight; save the model again")
    _load_exactly(model, tensors, files[0])
    return model.eval()


def model_from_config(folder: str | os.PathLike[str], *, device: str = "cpu", arg: str = "folder") -> nn.Module:
    """The transformers model ``folder/config.json`` describes, built on ``device`` with no weights read.

    The class comes from the config's ``architectures`` (never remote code); a ``quantization_config``
    is dropped, so a ``save_quantized`` folder gives its float architecture.

    Raises:
        ModelFolderError: no such folder or config, or an architecture transformers does not provide.
    """
    d = Path(folder)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(
            f"{arg}={str(d)!r} has no config.json; for a model that is not a transformers model pass build=, "
            "a function returning the float model"
        )
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelFolderError("building a model from config.json needs transformers: pip install 'kdq[transformers]'") from None
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{cfg_path} is not JSON text: {e}") from None
    data.pop("quantization_config", None)
    archs = data.get("architectures") or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    model_type = data.get("model_type")
    config_cls = transformers.CONFIG_MAPPING[model_type] if model_type in transformers.CONFIG_MAPPING else None
    if cls is None or config_cls is None:
        raise ModelFolderError(
            f"{arg}={str(d)!r}: config.json names architectures {archs} and model_type "
            f"{data.get('model_type')!r}, which transformers does not provide together; kdq never runs remote code"
        )
    config = config_cls.from_dict(data)
    with torch.device(device):
        return cls(config)


def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _load_exactly(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``tensors`` into ``model``: every name known, shapes and dtypes equal, ties covered once."""
    state = model.state_dict()
    alias: dict[Any, list[str]] = {}
    for k, t in state.items():
        alias.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape)), []).append(k)
    bad = []
    for k, t in tensors.items():
        if k not in state:
            bad.append(f"{k} (not in the model)")
        elif t.dtype != state[k].dtype or t.shape != state[k].shape:
            bad.append(f"{k} (file {t.dtype} {tuple(t.shape)}, model {state[k].dtype} {tuple(state[k].shape)})")
    uncovered = [names[0] for names in alias.values() if not any(n in tensors for n in names)]
    if bad or uncovered:
        raise ModelFolderError(
            f"{path} does not fit the model built for it: {bad[:5]} mismatched, {uncovered[:5]} missing; "
            "build() must return the float model the plan was applied to before saving"
        )
    model.load_state_dict(tensors, strict=False)
