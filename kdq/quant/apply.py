"""Apply a ``Plan`` to a PyTorch model, and count a model's bytes exactly.

``apply_plan(model, plan)`` converts the model **in place** and returns it: every module gets the
dtype its winning rule names (``Plan`` precedence), converted by the handlers in ``kdq.quant.dtypes``
(float casts in place; ``Linear``/``Embedding`` replaced by int8/int4 weight-only modules).

Mixed dtypes need casts where activations cross a boundary. When the plan leaves any module computing
in something other than fp32, every module that holds floating tensors (in its subtree) gets a
forward pre-hook that casts its floating tensor inputs (positional and keyword, one level into
tuples/lists) to the module's compute dtype: ``fp16`` and ``bf16`` compute in themselves; ``fp32``,
``int8`` and ``int4`` compute in fp32. Casts down to fp16/bf16 clamp to the target's finite range
first: ``finfo(float32).min`` (the usual additive attention mask) would otherwise round to ``-inf``
and turn fully masked rows into NaN. Outputs are not cast back: a model whose last module is fp16
returns fp16.

Tied weights: a tensor held by several modules is converted once, with the dtype of the first module
(in ``named_modules`` order) that holds it; the other holders follow it and share the converted
storage, so ``model_bytes`` counts it once.

All or nothing: ``apply_plan`` checks everything it can first (the plan, the fingerprint, that every
rule matches a module, that the model is not already converted), then converts; if anything fails
while converting, every module, tensor, hook and compute mark is restored, so the model is exactly
the one passed in. A model converted once is refused by a second ``apply_plan``: a plan is defined on
the float model (int4 over int8, or fp16 over int4, is not that plan), so reload the float model and
apply one plan with all the rules.

On a transformers ``PreTrainedModel``, ``apply_plan`` also attaches kdq's ``hf_quantizer`` and
``config.quantization_config`` (``kdq.quant.hf``), so ``save_pretrained`` writes a folder that
``load_quantized`` restores exactly and that a plain ``from_pretrained`` refuses loudly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from kdq.errors import close_matches
from kdq.quant.dtypes import _WeightOnly, get_dtype, quantized_class
from kdq.quant.errors import PlanError
from kdq.quant.plan import Plan, model_fingerprint

__all__ = ["apply_plan", "check_rules_match", "explain_plan", "model_bytes", "tensor_bytes", "module_dtypes", "Conversion", "model_fingerprint"]

_HOOK_ATTR = "_kdq_cast_hook"
_COMPUTE_ATTR = "_kdq_compute"


# ---------------------------------------------------------------------------- counting
def _tensor_key(t: torch.Tensor) -> Any:
    if t.is_meta:
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _owned_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    # state_dict(keep_vars=True): parameters (parametrization originals included) and persistent buffers.
    return model.state_dict(keep_vars=True).values()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (``numel * element_size``)."""
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and persistent buffers, each distinct tensor once.

    Tied tensors (the same tensor under several names) count once; scales and other quantization
    buffers count like any buffer. Non-persistent buffers (recomputed constants) are not counted:
    this is what a checkpoint or an exported bundle stores.
    """
    seen: set[Any] = set()
    total = 0
    for t in _owned_tensors(model):
        key = _tensor_key(t)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


# ---------------------------------------------------------------------------- resolving
def _persistent_buffers(mod: nn.Module) -> list[torch.Tensor]:
    skip = getattr(mod, "_non_persistent_buffers_set", set())
    return [b for k, b in mod._buffers.items() if b is not None and k not in skip]


def _tied_owner(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> name of the first module (named_modules order) that holds it."""
    owner: dict[int, str] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), name)
    return owner


def module_dtypes(model: nn.Module, plan: Plan | Mapping[str, str]) -> dict[str, str]:
    """The effective dtype of every module of ``model`` under ``plan`` (tie-following applied).

    ``plan`` may be a ``Plan`` or a plain ``{rule: dtype}`` mapping. A module holding a weight that an
    earlier module also holds takes that module's dtype.
    """
    if not isinstance(plan, Plan):
        plan = Plan(plan)
    names = [n for n, _ in model.named_modules()]
    resolved = plan.resolve(names)
    resolved[""] = plan.default
    owner = _tied_owner(model)
    out = dict(resolved)
    for name, mod in model.named_modules():
        w = getattr(mod, "_parameters", {}).get("weight")
        if w is not None and owner.get(id(w), name) != name:
            out[name] = resolved[owner[id(w)]]
    return out


def check_rules_match(model: nn.Module, plan: Plan) -> None:
    """``plan.check_rules`` over ``model``'s module names: ``PlanError`` for a rule that matches none."""
    plan.check_rules(n for n, _ in model.named_modules())


def _holds_tensors(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))


def explain_plan(
    model: nn.Module, plan: Plan, *, file: Any = None, only_params: bool = True
) -> list[tuple[str, str, str, str]]:
    """Print (and return) which rule sets each module of ``model``: (module, dtype, stored, rule).

    ``dtype`` is what the rules resolve to, after tied weights follow their first holder (as
    ``apply_plan`` does); ``stored`` is what the module's own tensors will be stored in (an
    integer dtype keeps norms and convolutions in fp32; ``-`` for no persistent float tensors).

    Args:
        model: the float model the plan is for (a meta-device model is enough).
        plan: the plan.
        file: where to print (stdout by default; ``False`` prints nothing).
        only_params: list only modules that hold parameters or buffers themselves.
    """
    dtypes = module_dtypes(model, plan)
    owner = _tied_owner(model)
    rows = []
    for name, mod in model.named_modules():
        if not name or (only_params and not _holds_tensors(mod)):
            continue
        dtype = dtypes[name]
        rule = plan.winning_rule(name)
        why = "(default)" if rule is None else rule
        w = mod._parameters.get("weight")
        if w is not None and owner.get(id(w), name) != name:
            why = f"(tied to {owner[id(w)]})"
        skip = mod._non_persistent_buffers_set
        floats = any(p is not None and p.is_floating_point() for p in mod._parameters.values()) or any(
            b is not None and k not in skip and b.is_floating_point() for k, b in mod._buffers.items()
        )
        if not floats:
            stored = "-"
        elif get_dtype(dtype).weight_only:
            stored = dtype if quantized_class(mod, dtype) is not None else "fp32"
        else:
            stored = dtype
        rows.append((name, dtype, stored, why))
    if file is not False:
        out = sys.stdout if file is None else file
        width = max([len(r[0]) for r in rows] + [6])
        print(f"{'module':<{width}}  {'dtype':<5}  {'stored':<6}  rule", file=out)
        for name, dtype, stored, why in rows:
            print(f"{name:<{width}}  {dtype:<5}  {stored:<6}  {why}", file=out)
    return rows


# ---------------------------------------------------------------------------- converting
def _cast(t: Any, dtype: torch.dtype) -> Any:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        if dtype in (torch.float16, torch.bfloat16) and torch.finfo(t.dtype).max > torch.finfo(dtype).max:
            fi = torch.finfo(dtype)  # fp32's min would round to -inf: keep masks finite
            t = t.clamp(fi.min, fi.max)
        return t.to(dtype)
    return t


def _cast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = getattr(module, _COMPUTE_ATTR, torch.float32)

    def one(x: Any) -> Any:
        if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
            return type(x)(_cast(v, dtype) for v in x)
        return _cast(x, dtype)

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _has_float_tensors(mod: nn.Module) -> bool:
    return any(p.is_floating_point() for p in mod.parameters()) or any(b.is_floating_point() for b in mod.buffers())


def install_cast_hooks(model: nn.Module) -> list[Any]:
    """Give every module holding floating tensors an input-casting pre-hook (idempotent); returns handles."""
    handles = []
    for _, mod in model.named_modules():
        if getattr(mod, _HOOK_ATTR, None) is None and _has_float_tensors(mod):
            h = mod.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
            object.__setattr__(mod, _HOOK_ATTR, h)
            handles.append((mod, h))
    return handles


def remove_cast_hooks(handles: list[Any]) -> None:
    """Undo ``install_cast_hooks``."""
    for mod, h in handles:
        h.remove()
        object.__setattr__(mod, _HOOK_ATTR, None)


def _set_parent(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[attr]
    parent._modules[attr] = new
    return old


class Conversion:
    """Converts named modules to dtypes in place and can undo it (used by the profiler and apply).

    Args:
        model: the model to convert (in place).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.memo: dict = {}
        self._undo: list[tuple] = []

    def convert(self, targets: Mapping[str, str]) -> None:
        """Convert each ``{module name: dtype}`` (each module's own tensors only)."""
        modules = dict(self.model.named_modules())
        for name, dtype in targets.items():
            spec = get_dtype(dtype)
            mod = modules.get(name)
            if mod is None:
                raise PlanError(f"module {name!r} is not in this model{close_matches(name, modules)}")
            self._set_compute(mod, spec.compute)
            qcls = quantized_class(mod, dtype) if spec.weight_only else None
            if qcls is not None:
                new = qcls.from_float(mod, self.memo)
                if getattr(mod, _HOOK_ATTR, None) is not None:  # carry the cast hook over to the replacement
                    nh = new.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
                    object.__setattr__(new, _HOOK_ATTR, nh)
                    self._undo.append(("hook", new, nh))
                object.__setattr__(new, _COMPUTE_ATTR, spec.compute)
                self._undo.append(("module", name, _set_parent(self.model, name, new)))
                continue
            storage = torch.float32 if spec.weight_only else spec.storage
            for pname, p in mod._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != storage:
                    self._undo.append(("data", p, p.data))
                    p.data = p.data.to(storage)
            skip = mod._non_persistent_buffers_set
            for bname, b in list(mod._buffers.items()):
                if b is not None and bname not in skip and b.is_floating_point() and b.dtype != storage:
                    self._undo.append(("buffer", mod, bname, b))
                    mod._buffers[bname] = b.to(storage)

    def commit(self) -> None:
        """Keep every conversion made so far: ``restore`` will no longer undo them."""
        self._undo.clear()
        self.memo.clear()

    def _set_compute(self, mod: nn.Module, compute: torch.dtype) -> None:
        self._undo.append(("compute", mod, mod.__dict__.get(_COMPUTE_ATTR)))
        object.__setattr__(mod, _COMPUTE_ATTR, compute)

    def restore(self) -> None:
        """Undo every conversion since construction (or the last restore), newest first."""
        for op in reversed(self._undo):
            kind = op[0]
            if kind == "data":
                op[1].data = op[2]
            elif kind == "buffer":
                op[1]._buffers[op[2]] = op[3]
            elif kind == "module":
                _set_parent(self.model, op[1], op[2])
            elif kind == "hook":
                op[2].remove()
            elif kind == "compute":
                if op[2] is None:
                    op[1].__dict__.pop(_COMPUTE_ATTR, None)
                else:
                    object.__setattr__(op[1], _COMPUTE_ATTR, op[2])
        self._undo.clear()
        self.memo.clear()


def subtree_targets(model: nn.Module, roots: Iterable[str], dtype: str) -> dict[str, str]:
    """``{module: dtype}`` for every module in the subtrees of ``roots``.

    A module whose weight is tied to an earlier module's goes with that module: it is included when
    the owner is inside the subtrees (even if it is not), and left out when the owner is outside.
    """
    owner = _tied_owner(model)
    roots = list(roots)

    def inside(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if w is not None and owner.get(id(w), name) != name:
            if inside(owner[id(w)]):
                out[name] = dtype
        elif inside(name):
            out[name] = dtype
    return out


def apply_plan(model: nn.Module, plan: Plan, *, check: bool = True) -> nn.Module:
    """Convert ``model`` in place to the dtypes ``plan`` assigns; returns the same model object.

    Args:
        model: a float32 ``nn.Module`` (the one the plan was made for).
        plan: the plan; its rules are resolved per module with ``Plan`` precedence.
        check: verify the plan's model fingerprint and that every name rule names a module.

    Raises:
        PlanError: the plan was made for a different model, a rule names no module, or the model was
            already converted by a plan. Nothing is converted then; and if converting fails midway,
            the model is restored exactly before the error propagates.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan={plan!r} is not allowed: pass a kdq.quant.Plan (Plan.load(path) reads a file)")
    check_unconverted(model, "apply_plan")
    if check:
        plan.check_model(model)
        check_rules_match(model, plan)
    dtypes = module_dtypes(model, plan)
    targets = {name: dtypes[name] for name, _ in model.named_modules()}
    computes = {get_dtype(d).compute for d in dtypes.values()}
    hooks: list[Any] = []
    conv = Conversion(model)
    try:
        if computes != {torch.float32}:
            hooks = install_cast_hooks(model)  # before converting: replacements inherit the hook
        conv.convert(targets)
    except BaseException:
        conv.restore()
        remove_cast_hooks(hooks)
        raise
    conv.commit()
    model._kdq_plan = plan  # type: ignore[attr-defined]
    from kdq.quant import hf

    if hf.is_transformers_model(model):
        hf.attach(model, plan)  # save_pretrained writes what load_quantized restores (kdq/quant/hf.py)
    return model


def check_unconverted(model: nn.Module, what: str) -> None:
    """Raise ``PlanError`` if ``model`` was already converted by ``apply_plan`` (or still carries its marks)."""
    for name, mod in model.named_modules():
        if isinstance(mod, _WeightOnly) or _COMPUTE_ATTR in mod.__dict__ or getattr(mod, _HOOK_ATTR, None) is not None:
            plan = getattr(model, "_kdq_plan", None)
            was = f" by {plan!r}" if plan is not None else ""
            raise PlanError(
                f"model is already converted{was} (module {name or '(root)'!r}): {what} needs the float model; "
                "reload it (from_pretrained, or kdq.quant.load_quantized for a saved quantized model) and "
                "apply one plan that holds all the rules"
            )
