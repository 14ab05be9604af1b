"""Apply a precision plan to the four fp32 MusicGen graphs before the decoders are merged.

Each graph goes through ``kdq.export.apply_plan_onnx`` (ONNX Runtime's quantizer and fp16 converter,
restricted to the nodes of each plan group, then a conformance check). The file variant of each
part (``_fp16``, ``_quantized``, ``_q4``) is the dtype that holds most of the part's weight bytes
under the plan. Tensors that cross parts (encoder states, logits, audio) stay fp32 whatever the
dtypes, since transformers.js feeds one part's output to the next without casting; a decoder whose
weights are all fp16 keeps its KV cache in fp16 (``kv_cache_dtype`` in ``config.json``, read by
transformers.js). The two decoder graphs must end up with the same variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from kdq.dtypes import TABLE
from kdq.errors import KdqError
from kdq.export.atomic import save_onnx_atomic
from kdq.export.precision import apply_plan_onnx, node_modules, planned_weight_bytes
from kdq.quant.apply import check_rules_match
from musicgen.bundle.parts import GRAPHS


class BundlePlanError(KdqError):
    """A graph's node scopes or variants do not fit the bundle layout (an export bug, not user input)."""


def apply_bundle_plan(model, graphs: dict[str, Path], plan: Any, work: Path, *, int4_block_size: int = 32):
    """Convert each exported fp32 graph per ``plan``.

    Args:
        model: the ``MusicgenForConditionalGeneration`` the graphs were exported from.
        graphs: graph name (``text_encoder``, ``decoder_model``, ``decoder_with_past_model``,
            ``encodec_decode``) -> fp32 ``.onnx`` path.
        plan: a ``kdq.quant.Plan``.
        work: folder for the converted graphs.
        int4_block_size: block size of 4-bit weights (``MatMulNBits``; 32, 64, 128...).

    Returns:
        ``(new graph paths, dtype per bundle part, report)`` where the report holds the plan JSON and,
        per part, the planned weight bytes by dtype, the conformance report and ``mixed`` (more than one
        dtype among its weights).
    """
    import onnx

    module_names = [n for n, _ in model.named_modules()]
    plan.check_model(model)
    check_rules_match(model, plan)  # a rule that names no module is a typo: refused, as apply_plan does
    out_paths: dict[str, Path] = {}
    dtypes: dict[str, str] = {}
    parts: dict[str, Any] = {}
    specs = {g.name: g for g in GRAPHS}
    for name, path in graphs.items():
        spec = specs[name]
        part, prefix = spec.part, spec.scope
        g = onnx.load(str(path))
        found = set(node_modules(g, module_names, prefix=prefix).values())
        stray = sorted(m for m in found if m and not any(m == r or m.startswith(r + ".") for r in spec.roots if r))
        if stray:
            raise BundlePlanError(f"{name}: node scopes map to modules outside {spec.roots}: {stray[:5]}")
        planned = planned_weight_bytes(g, plan, module_names, prefix=prefix)
        variant = max(planned, key=lambda d: (planned[d], -TABLE[d].bits)) if planned else "fp32"
        if part in dtypes and dtypes[part] != variant:
            raise BundlePlanError(f"decoder graphs disagree on their variant: {dtypes[part]} vs {variant}")
        dtypes[part] = variant
        fp16_cache = variant == "fp16" and len(planned) == 1 and part == "decoder_model_merged"
        keep: bool | list[str] = True
        if fp16_cache:  # only the KV cache in fp16; tensors crossing parts stay fp32 (see the docstring)
            keep = [v.name for v in [*g.graph.input, *g.graph.output] if not v.name.startswith(("past_key_values.", "present."))]
        converted, rep = apply_plan_onnx(g, plan, module_names, prefix=prefix, keep_io_types=keep,
                                         int4_block_size=int4_block_size)
        new = work / f"{name}.{variant}.onnx"
        save_onnx_atomic(converted, new)
        out_paths[name] = new
        entry = {"planned_weight_bytes_fp32": planned, "mixed": len(planned) > 1, "conformance": rep.to_json(),
                 "kv_cache_dtype": "float16" if fp16_cache else ("float32" if part == "decoder_model_merged" else None)}
        if name == "decoder_with_past_model":
            parts[part]["conformance_cached_step"] = rep.to_json()
        else:
            parts[part] = entry
    plan_json = plan.to_dict() if hasattr(plan, "to_dict") else str(plan)
    return out_paths, dtypes, {"plan": plan_json, "parts": parts, "int4_block_size": int4_block_size}
