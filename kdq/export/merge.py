"""Merge a first-step and a cached-step decoder graph into one graph with an ``If`` node.

The merged file holds each weight once: initializers of the two graphs are moved to the outer graph
and deduplicated by content (the two exports name the same transposed weight differently), and both
``If`` branches read them from the outer scope. Precision changes (int8, fp16) must be applied to the
two graphs *before* merging: quantizers look at the top-level graph only, so on a merged file they
run without error and change nothing.
"""

from __future__ import annotations

import hashlib

from kdq.errors import KdqError


class MergeError(KdqError):
    """The two decoder graphs cannot be merged (their inputs or outputs disagree)."""


def _tensor_key(t) -> tuple:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    return (t.data_type, tuple(t.dims), hashlib.sha1(arr.tobytes()).hexdigest())


def _rename_in_graph(graph, mapping: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
        for attr in node.attribute:
            if attr.g.node:
                _rename_in_graph(attr.g, mapping)
            for g in attr.graphs:
                _rename_in_graph(g, mapping)
    for out in graph.output:
        if out.name in mapping:
            out.name = mapping[out.name]


def merge_decoders(no_past, with_past, *, flag: str = "use_cache_branch", graph_name: str = "merged_decoder"):
    """Merge two decoder ``ModelProto`` s into one that switches on a boolean input ``flag``.

    Args:
        no_past: the first-step graph (no cache inputs); the ``else`` branch.
        with_past: the cached-step graph; the ``then`` branch. Its outputs must be the same names,
            in the same order, as ``no_past`` 's.
        flag: name of the boolean input (shape ``[1]``) that selects the cached branch.

    Returns:
        The merged ``onnx.ModelProto``: inputs are the union of both graphs' inputs plus ``flag``;
        outputs are ``no_past`` 's.
    """
    import onnx
    from onnx import helper

    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(no_past)
    b.CopyFrom(with_past)
    outs_a = [o.name for o in a.graph.output]
    outs_b = [o.name for o in b.graph.output]
    if outs_a != outs_b:
        raise MergeError(f"decoder outputs differ: first step {outs_a} vs cached step {outs_b}; export both with the same output_names")

    # 1. One copy of each distinct weight, in the outer graph.
    shared: dict[tuple, str] = {}
    outer_inits = []
    taken = {o for m in (a, b) for n in m.graph.node for o in n.output}
    taken |= {i.name for m in (a, b) for i in m.graph.input}
    for tag, model in (("a", a), ("b", b)):
        mapping: dict[str, str] = {}
        for init in model.graph.initializer:
            key = _tensor_key(init)
            if key not in shared:
                name = init.name
                while name in taken:
                    name = f"{name}.{tag}"
                taken.add(name)
                shared[key] = name
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = name
                outer_inits.append(copy)
            if shared[key] != init.name:
                mapping[init.name] = shared[key]
        _rename_in_graph(model.graph, mapping)
        del model.graph.initializer[:]

    # 2. Branch-internal names must not shadow outer names (the If outputs): rename producers.
    outer_inputs: dict[str, object] = {}
    for model in (a, b):
        for inp in model.graph.input:
            if inp.name in outer_inputs:
                if inp.type.tensor_type.elem_type != outer_inputs[inp.name].type.tensor_type.elem_type:
                    raise MergeError(f"input {inp.name!r} has different element types in the two decoder graphs")
                continue
            outer_inputs[inp.name] = inp
    branches = []
    for tag, model in (("no_past", a), ("with_past", b)):
        g = model.graph
        produced = {o for n in g.node for o in n.output}
        mapping = {o: f"{o}/{tag}" for o in outs_a if o in produced}
        _rename_in_graph(g, mapping)
        new_outputs = []
        for out in g.output:
            if out.name in outer_inputs or out.name in outs_a:  # an input passed straight through
                ident = f"{out.name}/{tag}/identity"
                g.node.append(helper.make_node("Identity", [out.name], [ident], name=f"/{tag}/passthrough/{out.name}"))
                out.name = ident
            new_outputs.append(out)
        del g.input[:]
        del g.value_info[:]
        for out in g.output:  # branch outputs: keep the element type, drop shapes (they differ per branch)
            out.type.tensor_type.ClearField("shape")
        g.name = tag
        branches.append(g)

    if_node = helper.make_node("If", [flag], outs_a, name="/use_cache_branch/If", then_branch=branches[1], else_branch=branches[0])
    inputs = list(outer_inputs.values()) + [helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, [1])]
    outputs = []
    for out in no_past.graph.output:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(out)
        shape = vi.type.tensor_type.shape
        for k, dim in enumerate(shape.dim):  # lengths differ between branches: give them fresh names
            if dim.HasField("dim_param") and "sequence" in dim.dim_param:
                dim.dim_param = f"{out.name}_dim_{k}"
        outputs.append(vi)
    graph = helper.make_graph([if_node], graph_name, inputs, outputs, initializer=outer_inits)
    opsets = {}
    for model in (a, b):
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    merged.ir_version = max(a.ir_version, b.ir_version)
    merged.producer_name = "kdq"
    onnx.checker.check_model(merged)
    return merged
