"""Apply a ``kdq.quant.Plan`` to an ONNX graph, then check that the graph carries it.

A plan names torch modules; the TorchScript exporter names each ONNX node after the module scope that
produced it (``/decoder/model/decoder/layers.0/self_attn/q_proj/MatMul``). ``node_modules`` maps every
node back to the deepest module of the model that its scope names, so a plan written against
``model.named_modules()`` selects ONNX nodes without any hand-written list.

Which weighted ops each dtype converts, and to what, is the shared table ``kdq.dtypes.TABLE`` (the
one ``kdq.quant`` converts modules by): int8 and int4 convert the ops of ``Linear`` and ``Embedding``
(MatMul, Gemm, Gather) and leave Conv/ConvTranspose fp32, as ``kdq.quant`` leaves convolutions fp32;
where ONNX cannot do what ``kdq.quant`` does (int4 Gather stored int8, no 4-bit Gemm), the table says
so and why. Conversion uses ONNX Runtime's own tools, restricted to the selected nodes:

- int8: ``onnxruntime.quantization.quantize_dynamic`` (weight int8 per channel, activations quantized
  at run time) on the weighted nodes whose table entry is int8 (``nodes_to_quantize``).
- int4: ``MatMulNBitsQuantizer`` (4-bit blockwise symmetric weights, ``MatMulNBits``) on the MatMul
  nodes of int4 groups (every other MatMul in ``nodes_to_exclude``: its ``nodes_to_include`` widens
  rather than restricts). Embedding tables of int4 groups are stored int8 (reported as
  ``Gather(int4->int8)``).
- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with every node outside fp16
  groups in ``node_block_list`` (after clearing ``graph.value_info``, which otherwise makes it emit
  Casts of the wrong type).
  The converter wraps every blocked node in casts, so tensors passed between two fp32 nodes made a
  lossy fp32 -> fp16 -> fp32 round trip (an int8 MatMul's int32 accumulator overflowed to ``inf``);
  ``remove_fp16_round_trips`` bypasses those pairs. Casts of constants to fp16 at real boundaries are folded with
  saturation (``fold_constant_casts_to_fp16``): a run-time Cast turns the attention-mask fill value
  into ``-inf`` and a fully masked row into NaN.
- bf16 has no kernels in ONNX Runtime's CPU or mobile builds and is refused with a typed error
  (the table's ``onnx_refusal``).

Apply it to each graph before merging decoders: quantizers only see the top-level graph.

Conformance (``check_conformance``): every node whose group is assigned a dtype must carry it:
a *weighted* node (one that reads a weight initializer: MatMul, Gemm, Gather, Conv, ConvTranspose and
their quantized forms) carries the dtype its weight is stored and computed in (``MatMulInteger`` and
int8 ``Gather`` -> int8, ``MatMulNBits`` -> int4, a float weight -> its float type); any other node
carries the float type of its outputs (nodes with no float output, and ``Cast`` and (de)quantize glue,
carry nothing). Weighted nodes must carry what the table says their op becomes under their group's
dtype (``TABLE[dtype].onnx_dtype(op)``: the dtype itself, or fp32 for a Conv in an int8 group, or int8
for a Gather in an int4 group; such nodes are counted in the report as ``Conv(int8->fp32)``); other
nodes must carry fp16 in fp16 groups (unless their op type is on the converter's fp32 op block list)
and fp32 elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdq.dtypes import DTYPES, TABLE, WEIGHTED_OPS
from kdq.errors import KdqError

INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "QLinearMatMul", "QLinearConv"}
INT4_OPS = {"MatMulNBits", "GatherBlockQuantized"}
GLUE_OPS = {"Cast", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Identity", "Constant"}
_ELEM = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}


class PlanExportError(KdqError):
    """The plan asks for something the ONNX export cannot produce."""


class PlanConformanceError(KdqError):
    """Some nodes do not carry the dtype their group was assigned.

    Attributes:
        violations: ``[(node name, op type, group, expected dtype, carried dtype)]``.
    """

    def __init__(self, msg: str, violations: list[tuple[str, str, str, str, str]]):
        super().__init__(msg)
        self.violations = violations


def _scope(node_name: str) -> list[str]:
    parts = [p for p in node_name.split("/") if p]
    return parts[:-1]


def module_of(node_name: str, module_names: set[str]) -> str:
    """The deepest module in ``module_names`` named by a node's TorchScript scope ("" if none).

    A scope component is an attribute name, or for a ``ModuleList`` item ``list.i`` relative to the
    list's owner; for an item of a ``Sequential`` called directly, the component repeats the
    Sequential's own name (``/block/block.0``), so both joins are tried.
    """
    cur = ""
    for comp in _scope(node_name):
        joined = f"{cur}.{comp}" if cur else comp
        if joined in module_names:
            cur = joined
            continue
        parent = cur.rsplit(".", 1)[0] if "." in cur else ""
        sibling = f"{parent}.{comp}" if parent else comp
        if sibling in module_names and sibling != cur:
            cur = sibling
            continue
        break
    return cur


def _walk(graph) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _walk(attr.g)
            for g in attr.graphs:
                yield from _walk(g)


def initializers(graph, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Name -> initializer over a graph and its subgraphs (``If`` branches)."""
    into = {} if into is None else into
    for t in graph.initializer:
        into[t.name] = t
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                initializers(attr.g, into)
            for g in attr.graphs:
                initializers(g, into)
    return into


def node_modules(model, module_names: Iterable[str], *, prefix: str = "") -> dict[str, str]:
    """Node name -> module name (deepest named module of its scope; ``prefix`` outside every module).

    Args:
        model: an ``onnx.ModelProto`` from the TorchScript exporter.
        module_names: the torch model's ``named_modules()`` names.
        prefix: the module the export's scopes are relative to. A wrapper whose ``forward`` calls its
            attribute ``text_encoder`` gets scopes ``/text_encoder/...`` and needs no prefix; a
            wrapper that calls a *method* such as ``model.audio_encoder.decode`` gets scopes from
            that module's children (``/decoder/layers.3/...``) and needs ``prefix="audio_encoder"``.
    """
    names = set(module_names)
    names.discard("")
    if prefix:
        names = {n[len(prefix) + 1 :] for n in names if n.startswith(prefix + ".")}

    def full(rel: str) -> str:
        return f"{prefix}.{rel}" if prefix and rel else (prefix or rel)

    return {n.name: full(module_of(n.name, names)) for n in _walk(model.graph)}


def weight_input(node, inits: Mapping[str, Any]) -> Any | None:
    """The weight initializer a weighted node reads (rank >= 2), or None."""
    if node.op_type not in {*WEIGHTED_OPS, *INT8_OPS, *INT4_OPS}:
        return None
    idx = {"Gather": [0], "GatherBlockQuantized": [0], "MatMulInteger": [1], "DynamicQuantizeMatMul": [1]}.get(node.op_type, [1, 0])
    for i in idx:
        if i < len(node.input) and node.input[i] in inits and len(inits[node.input[i]].dims) >= 2:
            return inits[node.input[i]]
    return None


def node_dtypes(model) -> dict[str, tuple[str, bool]]:
    """Node name -> (carried dtype or "", is weighted). See the module docstring for the rule."""
    import onnx

    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - contrib ops or huge models: fall back to declared types
        typed = model
    elem: dict[str, int] = {}

    def collect(graph):
        for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
            elem[vi.name] = vi.type.tensor_type.elem_type
        for t in graph.initializer:
            elem[t.name] = t.data_type
        for node in graph.node:
            for attr in node.attribute:
                if attr.g.node:
                    collect(attr.g)
                for g in attr.graphs:
                    collect(g)

    collect(typed.graph)
    inits = initializers(model.graph)
    out: dict[str, tuple[str, bool]] = {}
    for node in _walk(model.graph):
        w = weight_input(node, inits)
        if node.op_type in INT4_OPS:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            out[node.name] = ("int4" if bits == 4 else f"int{bits}", True)
        elif node.op_type in INT8_OPS:
            out[node.name] = ("int8", True)
        elif w is not None:
            kind = {3: "int8", 2: "int8"}.get(w.data_type, _ELEM.get(w.data_type, str(w.data_type)))
            out[node.name] = (kind, True)
        elif node.op_type in GLUE_OPS:
            out[node.name] = ("", False)
        else:
            floats = [_ELEM[elem[o]] for o in node.output if elem.get(o) in _ELEM]
            out[node.name] = (floats[0] if floats else "", False)
    return out


@dataclass
class PrecisionReport:
    """What ``apply_plan_onnx`` did to one graph.

    Attributes:
        groups: plan rule (or "(default)") -> dtype, for the rules that win for some node's module.
        nodes: dtype -> number of weighted nodes carrying it.
        weight_bytes: dtype -> bytes of weight initializers read by weighted nodes carrying it.
        kept_by_op_type: nodes that carry something other than their group's dtype by design, by op
            type: fp16-group nodes kept fp32 by the converter's op block list (``TopK``), and weighted
            nodes the dtype table realises differently (``Conv(int8->fp32)``, ``Gather(int4->int8)``).
        violations: conformance violations (empty when the graph conforms).
    """

    groups: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)
    kept_by_op_type: dict[str, int] = field(default_factory=dict)
    violations: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.groups, "weighted_nodes": self.nodes, "weight_bytes": self.weight_bytes,
                "kept_fp32_by_op_type": self.kept_by_op_type, "conforms": not self.violations,
                "violations": [list(v) for v in self.violations[:20]]}


def tensor_bytes(t) -> int:
    """Bytes of an initializer's data (``TensorProto``)."""
    import numpy as np
    from onnx import helper

    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def resolve_nodes(plan: Any, nodes_to_module: Mapping[str, str]) -> dict[str, str]:
    """Module -> dtype for every module owning nodes; "" (outside every module) gets the default."""
    modules = sorted({m for m in nodes_to_module.values() if m})
    resolved = dict(plan.resolve(modules)) if modules else {}
    resolved[""] = plan.default if hasattr(plan, "default") else "fp32"
    return resolved


def check_conformance(
    model, plan: Any, module_names: Iterable[str], *, prefix: str = "", fp16_op_block_list: Iterable[str] | None = None
) -> PrecisionReport:
    """Check that every node carries its group's dtype (see the module docstring); never raises.

    Args:
        model: an ``onnx.ModelProto`` (merged decoders with ``If`` branches are walked too).
        plan: a ``kdq.quant.Plan`` (anything with ``resolve(names)`` and ``default``).
        module_names: the torch model's module names (``[n for n, _ in model.named_modules()]``),
            prefixed the way the export wrapper names them.
        prefix: see ``node_modules``.
        fp16_op_block_list: op types the fp16 converter keeps in fp32 (default: its own list).

    Returns:
        A ``PrecisionReport``; ``report.violations`` is empty when the graph conforms.
    """
    from onnxruntime.transformers import float16

    blocked_ops = set(float16.DEFAULT_OP_BLOCK_LIST if fp16_op_block_list is None else fp16_op_block_list)
    mods = node_modules(model, module_names, prefix=prefix)
    resolved = resolve_nodes(plan, mods)
    carried = node_dtypes(model)
    inits = initializers(model.graph)
    rules = {}
    for m, d in resolved.items():
        if m:
            rule = plan.winning_rule(m) if hasattr(plan, "winning_rule") else m
            rules[rule or "(default)"] = d
    rep = PrecisionReport(groups=rules)
    nodes: Counter[str] = Counter()
    wbytes: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for node in _walk(model.graph):
        group = mods.get(node.name, "")
        want = resolved.get(group, "fp32")
        have, weighted = carried[node.name]
        if weighted:
            nodes[have] += 1
            w = weight_input(node, inits)
            if w is not None:
                wbytes[have] += tensor_bytes(w)
            realised = TABLE[want].onnx_dtype(node.op_type) if want in TABLE else want
            if have != realised:
                rep.violations.append((node.name, node.op_type, group, realised, have))
            elif realised != want:
                kept[f"{node.op_type}({want}->{realised})"] += 1
        elif have:
            expect = "fp16" if want == "fp16" else "fp32"
            if expect == "fp16" and have == "fp32" and node.op_type in blocked_ops:
                kept[node.op_type] += 1
            elif have != expect:
                rep.violations.append((node.name, node.op_type, group, expect, have))
    rep.nodes, rep.weight_bytes, rep.kept_by_op_type = dict(nodes), dict(wbytes), dict(kept)
    return rep


def apply_plan_onnx(
    model,
    plan: Any,
    module_names: Iterable[str],
    *,
    prefix: str = "",
    keep_io_types: bool | list[str] = True,
    int4_block_size: int = 32,
    int4_accuracy_level: int | None = 4,
    check: bool = True,
):
    """Convert an fp32 ``onnx.ModelProto`` to the dtypes ``plan`` assigns to its nodes' modules.

    Args:
        model: an fp32 graph exported from the model ``plan`` was written for (not a merged decoder).
        plan: a ``kdq.quant.Plan``; it is read, never changed.
        module_names: the torch model's module names (``[n for n, _ in model.named_modules()]``).
        prefix: the module the graph's scopes are relative to (see ``node_modules``).
        keep_io_types: keep float graph inputs and outputs in fp32 (``True``), convert them all to fp16
            when fp16 is used (``False``), or keep only the listed names in fp32.
        int4_block_size: block size of 4-bit weights (``MatMulNBits``).
        int4_accuracy_level: ``MatMulNBits`` compute type: 4 quantizes activations to int8 at run time
            and uses integer dot products (the fast path on CPUs); None/0 dequantizes to fp32.
        check: raise ``PlanConformanceError`` if the result does not carry the plan.

    Returns:
        ``(model, PrecisionReport)``.

    Raises:
        PlanExportError: the plan assigns bf16, or a dtype kdq does not know.
        PlanConformanceError: with ``check``, nodes that do not carry their group's dtype.
    """
    import onnx

    module_names = list(module_names)
    mods = node_modules(model, module_names, prefix=prefix)
    resolved = resolve_nodes(plan, mods)
    exportable = [d for d in DTYPES if TABLE[d].onnx is not None]
    bad = sorted({d for d in resolved.values() if d not in exportable})
    if bad:
        users = sorted(m for m, d in resolved.items() if d in bad)[:5]
        why = "; ".join(f"{d}: {TABLE[d].onnx_refusal}" if d in TABLE else f"{d}: not a kdq dtype" for d in bad)
        raise PlanExportError(f"plan assigns {bad} to {users}...; ONNX export supports {exportable} ({why})")
    inits = initializers(model.graph)
    by_dtype: dict[str, list[str]] = {d: [] for d in exportable}  # nodes by the dtype the table realises
    for node in model.graph.node:
        if weight_input(node, inits) is not None:
            want = resolved.get(mods.get(node.name, ""), "fp32")
            by_dtype[TABLE[want].onnx_dtype(node.op_type)].append(node.name)
    int8_ops = sorted({op for d in exportable for op, q in TABLE[d].onnx.items() if q == "int8"})
    # quantize_dynamic first rewrites every Gemm as MatMul (+ Add) named "<gemm>_MatMul": select that name too
    ops = {n.name: n.op_type for n in model.graph.node}
    by_dtype["int8"] += [f"{n}_MatMul" for n in by_dtype["int8"] if ops.get(n) == "Gemm"]
    with tempfile.TemporaryDirectory(prefix="kdq-plan-") as tmp:
        cur = model
        if by_dtype["int8"]:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "int8.onnx"
            onnx.save_model(cur, str(src))
            quantize_dynamic(
                str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_quantize=by_dtype["int8"], op_types_to_quantize=int8_ops,
                extra_options={"MatMulConstBOnly": True},
            )
            cur = onnx.load(str(dst))
        if by_dtype["int4"]:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # nodes_to_include does not restrict (it is OR-ed with the op types): exclude the others
            keep = set(by_dtype["int4"])
            others = [n.name for n in cur.graph.node if n.op_type == "MatMul" and n.name not in keep]
            q = MatMulNBitsQuantizer(cur, bits=4, block_size=int4_block_size, is_symmetric=True,
                                     accuracy_level=int4_accuracy_level, nodes_to_exclude=others,
                                     op_types_to_quantize=("MatMul",))
            q.process()
            cur = q.model.model
        fp16_groups = {m for m, d in resolved.items() if d == "fp16"}
        if fp16_groups:
            from onnxruntime.transformers import float16

            mods_now = node_modules(cur, module_names, prefix=prefix)
            block = [n.name for n in cur.graph.node if mods_now.get(n.name, "") not in fp16_groups]
            del cur.graph.value_info[:]
            cur = float16.convert_float_to_float16(cur, keep_io_types=keep_io_types, node_block_list=block,
                                                   disable_shape_infer=False)
            del cur.graph.value_info[:]
            topological_sort(cur.graph)
            remove_fp16_round_trips(cur.graph)
            fold_constant_casts_to_fp16(cur.graph)
            topological_sort(cur.graph)
    onnx.checker.check_model(cur)
    report = check_conformance(cur, plan, module_names, prefix=prefix)
    if check and report.violations:
        lines = "; ".join(f"{n} ({op}, group {g!r}): wants {w}, carries {h}" for n, op, g, w, h in report.violations[:8])
        raise PlanConformanceError(
            f"{len(report.violations)} node(s) do not carry their group's dtype: {lines}. Assign a dtype these ops "
            f"support in ONNX Runtime ({_coverage()}) or fp32",
            report.violations,
        )
    return cur, report


def _coverage() -> str:
    """What each weight-only dtype converts in ONNX, from the table (for error messages)."""
    parts = []
    for d in DTYPES:
        info = TABLE[d]
        if info.weight_only and info.onnx is not None:
            parts.append(f"{d} covers " + "/".join(f"{op}" + ("" if q == d else f" as {q}") for op, q in info.onnx.items() if q != "fp32"))
    return "; ".join(parts)


def planned_weight_bytes(model, plan: Any, module_names: Iterable[str], *, prefix: str = "") -> dict[str, int]:
    """fp32 bytes of the weights that ``model`` 's weighted nodes read, by the dtype the export stores them in
    (the table's realisation of the plan's dtype: a Conv of an int8 group counts as fp32)."""
    mods = node_modules(model, module_names, prefix=prefix)
    resolved = resolve_nodes(plan, mods)
    inits = initializers(model.graph)
    out: Counter[str] = Counter()
    for node in _walk(model.graph):
        w = weight_input(node, inits)
        if w is not None:
            want = resolved.get(mods.get(node.name, ""), "fp32")
            out[TABLE[want].onnx_dtype(node.op_type) if want in TABLE else want] += tensor_bytes(w)
    return dict(out)


def remove_fp16_round_trips(graph) -> int:
    """Bypass ``Cast(to=fp32)(Cast(to=fp16)(x))`` pairs (in place); returns how many were bypassed.

    ``convert_float_to_float16`` marks every float tensor fp16 and wraps each blocked (fp32) node in
    casts, so a tensor passed between two blocked nodes goes fp32 -> fp16 -> fp32. Inside an int8
    region that tensor can be ``MatMulInteger``'s int32 accumulator (tens of thousands): the round
    trip turns it into ``inf``. Consumers of the outer Cast read ``x`` directly instead, so blocked
    regions really stay fp32.
    """
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped = set()
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        inner = producer.get(node.input[0])
        if inner is None or cast_to(inner) != TensorProto.FLOAT16:
            continue
        source = producer.get(inner.input[0])
        if source is not None and cast_to(source) == TensorProto.FLOAT16:
            continue  # x itself is fp16: not a round trip
        rename[node.output[0]] = inner.input[0]
        dropped.add(id(node))
    if not rename:
        return 0
    keep = [n for n in graph.node if id(n) not in dropped]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    used = {i for n in keep for i in n.input} | outputs
    keep = [n for n in keep if not (cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)


def fold_constant_casts_to_fp16(graph) -> int:
    """Replace ``Cast(to=float16)`` of a constant with a clamped fp16 initializer (in place).

    When an fp32 node's constant also feeds an fp16 node, the converter inserts a run-time Cast. A
    Cast does not saturate: the attention-mask fill value ``finfo(float32).min`` becomes ``-inf`` in
    fp16, and a fully masked row (the unconditional half of classifier-free guidance) then turns into
    NaN. Folding the Cast with values clamped to +-65504, as the converter does for constants it
    converts itself, keeps them finite. Returns the number of Casts folded.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    folded, keep = 0, []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src = consts.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if to == TensorProto.FLOAT16 and src is not None and src.dtype.kind == "f":
            value = np.clip(src.astype(np.float32), -65504.0, 65504.0).astype(np.float16)
            graph.initializer.append(numpy_helper.from_array(value, name=node.output[0]))
            folded += 1
        else:
            keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (in place).

    ``convert_float_to_float16`` appends some Cast/Identity nodes at the end of the graph; ONNX
    requires topological order (``onnx.checker`` refuses the file otherwise).
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    outer = set()  # names a node reads from an enclosing scope never appear here for top-level graphs
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available or i in outer for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: keep the remaining order
            ordered.extend(rest)
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def graph_runs(path: str | os.PathLike, feeds: Iterable[Mapping[str, Any]]) -> None:
    """Load ``path`` in ONNX Runtime (CPU) and run it on each feed; errors propagate."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    for feed in feeds:
        sess.run(None, {k: v for k, v in feed.items() if k in names})
