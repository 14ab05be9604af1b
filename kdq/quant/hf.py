"""``save_pretrained`` / ``from_pretrained`` on a model converted by ``apply_plan`` (transformers only).

The habit ``apply_plan(m, plan); m.save_pretrained(d); AutoModel*.from_pretrained(d)`` used to give a
model whose int8/int4 layers were newly initialised (the state dict holds ``qweight``/``scale`` where
the float class expects ``weight``; transformers 5.x reports them and warns, nothing more): logits off
by 0.46 on a tiny Llama. Now:

- ``apply_plan`` on a transformers ``PreTrainedModel`` attaches a ``KdqHfQuantizer`` as
  ``model.hf_quantizer`` and a ``KdqConfig`` as ``model.config.quantization_config``, the hooks
  transformers' own quantizers use. ``save_pretrained`` then writes ``config.json`` with
  ``"quantization_config": {"quant_method": "kdq", "format": "kdq.hf/1", "plan": "<the plan file's JSON text>"}``
  (a string, not an object: transformers writes config.json with sorted keys, and the order of a
  plan's ``re:`` rules is part of its precedence)
  and ``model.safetensors`` with every tensor of the converted model (each tied tensor once) under
  the model's own state-dict names (not reverted to an older checkpoint layout by transformers'
  conversion mapping, which knows float weights only), its header naming the format and the SHA-256
  of the plan's JSON.
- ``kdq.quant.load_quantized(d)`` restores that folder exactly (the same code path as a
  ``save_quantized`` folder: build the float architecture, apply the plan, copy the tensors in after
  checking names, shapes and dtypes).
- A plain ``from_pretrained(d)`` fails loudly instead of loading random layers. In a process where kdq
  has registered its quantizer (importing this module does, and ``apply_plan``/``load_quantized`` on a
  transformers model import it), transformers dispatches ``quant_method: "kdq"`` to
  ``KdqHfQuantizer``, whose ``validate_environment`` raises ``ModelFolderError`` naming
  ``kdq.quant.load_quantized``. In a process where it has not (transformers alone), transformers 5.x
  only warns "Unknown quantization type, got kdq" and loads on; so for every weight kdq replaced, the
  file also holds a one-element int8 placeholder under the float name (``<module>.weight``), whose
  shape cannot fit the float layer: transformers' loader raises ``RuntimeError`` (a size mismatch)
  after its load report lists those modules. Only ``ignore_mismatched_sizes=True`` would load random
  layers there, and that is the user asking for them.

Why not load through ``from_pretrained`` itself: transformers builds the model on the meta device with
ties undone, loads into it and re-ties by parameter name; kdq's modules hold buffers (``qweight``) and
expose ``weight`` as a read-only view, so re-tying and its missing-key initialisation would need
kdq-specific code inside transformers' loader. ``load_quantized`` is one call and exact.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from kdq.quant.dtypes import _WeightOnly
from kdq.quant.errors import ModelFolderError
from kdq.quant.plan import Plan

__all__ = ["FORMAT", "QUANT_METHOD", "attach", "is_transformers_model", "placeholder_keys", "register", "state_dict_to_save"]

QUANT_METHOD = "kdq"
FORMAT = "kdq.hf/1"
LOAD_WITH = "kdq.quant.load_quantized(folder)"


def is_transformers_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked only if transformers is already imported)."""
    import sys

    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def placeholder_keys(model: nn.Module) -> list[str]:
    """``<module>.weight`` for every int8/int4 module of a converted model (the float names they replaced)."""
    return [f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, _WeightOnly)]


def state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's tensors, each distinct tensor once, plus the placeholders (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[Any] = set()
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[k] = t
    for k in placeholder_keys(model):
        out[k] = torch.zeros(1, dtype=torch.int8)  # one element each: no two share storage
    return out


_REGISTERED: dict[str, Any] = {}


def register() -> tuple[type, type]:
    """Register ``KdqConfig`` and ``KdqHfQuantizer`` with transformers (idempotent); returns both classes."""
    if _REGISTERED:
        return _REGISTERED["config"], _REGISTERED["quantizer"]
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class KdqConfig(QuantizationConfigMixin):
        """transformers' view of a kdq plan: ``{"quant_method": "kdq", "format", "plan", "load_with"}``."""

        def __init__(self, plan: str | None = None, format: str = FORMAT, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.format = format
            self.plan = plan
            self.load_with = LOAD_WITH

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "format": self.format, "plan": self.plan, "load_with": LOAD_WITH}

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    class KdqHfQuantizer(HfQuantizer):
        """Saves a planned model through ``save_pretrained``; refuses ``from_pretrained`` with the fix."""

        requires_calibration = False  # so that validate_environment gives kdq's message in both cases

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if not self.pre_quantized:
                raise ModelFolderError(
                    "quantization_config=KdqConfig(...) is not allowed in from_pretrained: load the float "
                    "model, then kdq.quant.apply_plan(model, plan)"
                )
            if self.quantization_config.format != FORMAT:
                return  # a save_quantized folder: no model.safetensors, transformers raises OSError on its own
            raise ModelFolderError(
                "this folder holds a model converted by kdq (config.json: quantization_config.quant_method "
                "'kdq'); from_pretrained cannot rebuild kdq's int8/int4 layers and would leave them random: "
                f"load it with {LOAD_WITH}"
            )

        def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            return state_dict_to_save(model), {"kdq_format": FORMAT, "plan_sha256": _sha256(self.quantization_config.plan)}

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    for mapping, cls in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, KdqConfig), (auto.AUTO_QUANTIZER_MAPPING, KdqHfQuantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is not None and getattr(existing, "__module__", "") != __name__:  # another library's: keep it
            raise ModelFolderError(f"transformers already has a quant_method {QUANT_METHOD!r} ({existing!r}); kdq will not replace it")
        mapping[QUANT_METHOD] = cls
    _REGISTERED.update(config=KdqConfig, quantizer=KdqHfQuantizer)
    return KdqConfig, KdqHfQuantizer


def attach(model: nn.Module, plan: Plan) -> None:
    """Make ``model.save_pretrained`` write the kdq layout (called by ``apply_plan`` on transformers models)."""
    config_cls, quantizer_cls = register()
    qconfig = config_cls(plan=plan.to_json())  # a string: config.json sorts keys, and rule order is precedence
    model.config.quantization_config = qconfig
    model.hf_quantizer = quantizer_cls(qconfig, pre_quantized=True)
    # Save under the model's own names: save_pretrained otherwise reverts transformers' conversion
    # mapping (ViT's q_proj -> attention.query, ...), which knows float weights, not kdq's qweight/scale.
    model._weight_conversions = []
