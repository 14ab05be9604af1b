"""Aggregate an ONNX Runtime profile of the decoder into where a cached step's time goes.

``SessionOptions.enable_profiling`` makes ONNX Runtime write a Chrome-trace JSON: one ``model_run``
event (category ``Session``) per ``InferenceSession.run`` and one event per executed node (category
``Node``, ``args.op_name``, ``args.parameter_size`` = bytes of its initializer inputs), nodes inside
an ``If`` branch included. ``aggregate`` assigns node events to runs by time, drops the first run(s)
(the uncached first step) and sums per op type, per category and per node with the layer index
stripped (``layers.*``), in milliseconds per run.

The merged decoder is one ``If`` node whose branches hold the graph, and the ``If`` event's duration
includes the nodes inside it: ``If (own)`` is the ``If`` time minus theirs (starting the subgraph,
moving its outputs out), ``run overhead`` the ``model_run`` time minus the ``If`` (feeding inputs,
binding outputs). The categories therefore add up to the ``model_run`` time.
"""

from __future__ import annotations

import re
from collections import defaultdict

# what each op type is, for the summary table (anything else is "other")
CATEGORY = {
    "MatMulNBits": "weight matmul", "DynamicQuantizeMatMul": "weight matmul", "MatMulIntegerToFloat": "weight matmul",
    "MatMulInteger": "weight matmul", "Gemm": "weight matmul", "DynamicQuantizeLinear": "activation quantize",
    "Softmax": "attention (scores, softmax, values)", "MultiHeadAttention": "attention (scores, softmax, values)",
    "Attention": "attention (scores, softmax, values)", "Concat": "KV cache concat",
    # the in-place decoder's self-attention: scores, softmax, values and the in-place cache write
    "GroupQueryAttention": "attention (scores, softmax, values)",
    "LayerNormalization": "layer norm", "SkipLayerNormalization": "layer norm", "SimplifiedLayerNormalization": "layer norm",
    "Gelu": "GELU", "BiasGelu": "GELU", "FastGelu": "GELU", "Erf": "GELU",
    "Transpose": "reshape / transpose / copies", "Reshape": "reshape / transpose / copies",
    "Unsqueeze": "reshape / transpose / copies", "Squeeze": "reshape / transpose / copies",
    "Identity": "reshape / transpose / copies", "Expand": "reshape / transpose / copies", "Cast": "reshape / transpose / copies",
    "Shape": "shape bookkeeping", "Gather": "shape bookkeeping", "Slice": "shape bookkeeping", "Range": "shape bookkeeping",
    "Equal": "shape bookkeeping", "Where": "shape bookkeeping", "ConstantOfShape": "shape bookkeeping",
    "Add": "elementwise (add, mul, ...)", "Mul": "elementwise (add, mul, ...)", "Div": "elementwise (add, mul, ...)",
    "Sub": "elementwise (add, mul, ...)", "Pow": "elementwise (add, mul, ...)", "Sqrt": "elementwise (add, mul, ...)",
}


def category(op: str, parameter_bytes: int, inputs_listed: int = 2) -> str:
    """The summary row of a node: its op type's entry in ``CATEGORY`` (else ``other``), except that a
    ``MatMul`` or ``FusedMatMul`` is a projection when one operand is a weight (``parameter_bytes > 0``,
    or fewer than two inputs listed: the profiler leaves out an outer-scope initializer, which is where
    the merged decoder keeps its weights) and attention's Q.K^T or P.V otherwise, and a ``Gather``
    from a table of more than 1 MiB or from an outer-scope one is an embedding lookup."""
    if op in ("MatMul", "FusedMatMul"):
        return "weight matmul" if parameter_bytes > 0 or inputs_listed < 2 else "attention (scores, softmax, values)"
    if op == "Gather" and (parameter_bytes > 1 << 20 or inputs_listed < 2):
        return "embedding gather"
    return CATEGORY.get(op, "other")


def node_key(name: str) -> str:
    """A profiler node name without its layer index and the ``_kernel_time`` suffix."""
    return re.sub(r"layers\.\d+", "layers.*", name.removesuffix("_kernel_time"))


def aggregate(events: list[dict], *, skip_runs: int = 1, top: int = 15) -> dict:
    """Per-category, per-op and per-node milliseconds per run after the first ``skip_runs`` runs.

    Args:
        events: the profile's events (the parsed JSON list).
        skip_runs: leading ``model_run`` events to drop (1: the decoder's uncached first step).
        top: how many nodes to list.

    Returns:
        ``cached_runs``, ``model_run_ms_per_step``, ``nodes_ms_per_step`` and the lists
        ``by_category``, ``by_op`` (with ``calls_per_step``) and ``top_nodes``, each entry with
        ``ms_per_step`` and ``share`` (of the ``model_run`` time), largest first.

    Raises:
        ValueError: no run is left after ``skip_runs``.
    """
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"])
    kept = runs[skip_runs:]
    n = len(kept)
    if n == 0:
        raise ValueError("no cached decoder runs in the profile")
    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    by_cat: dict[str, float] = defaultdict(float)
    by_node: dict[tuple[str, str], float] = defaultdict(float)
    ifs = 0.0
    inside_if = 0.0
    run_total = sum(r["dur"] for r in kept)
    j = 0
    for r in kept:
        start, end = r["ts"], r["ts"] + r["dur"]
        while j < len(nodes) and nodes[j]["ts"] < start:
            j += 1
        in_run = []
        k = j
        while k < len(nodes) and nodes[k]["ts"] <= end:
            in_run.append(nodes[k])
            k += 1
        if_events = [e for e in in_run if e["args"].get("op_name") == "If"]
        for e in in_run:
            op = e["args"].get("op_name", "?")
            if op == "If":
                ifs += e["dur"]
                continue
            if any(f["ts"] <= e["ts"] and e["ts"] + e["dur"] <= f["ts"] + f["dur"] for f in if_events):
                inside_if += e["dur"]
            pbytes = int(e["args"].get("parameter_size", 0) or 0)
            by_op[op] += e["dur"]
            calls[op] += 1
            by_cat[category(op, pbytes, len(e["args"].get("input_type_shape", [None, None])))] += e["dur"]
            by_node[(node_key(e["name"]), op)] += e["dur"]
    nodes_total = sum(by_op.values())
    by_cat["If (own)"] = ifs - inside_if
    by_cat["run overhead"] = run_total - ifs if ifs else run_total - nodes_total

    def ms(us: float) -> float:
        return round(us / n / 1000, 4)

    return {
        "cached_runs": n,
        "model_run_ms_per_step": ms(run_total),
        "nodes_ms_per_step": ms(nodes_total),
        "by_category": sorted(({"category": c, "ms_per_step": ms(v), "share": round(v / run_total, 4)} for c, v in by_cat.items()),
                              key=lambda x: -x["ms_per_step"]),
        "by_op": sorted(({"op": o, "ms_per_step": ms(v), "share": round(v / run_total, 4), "calls_per_step": calls[o] / n}
                         for o, v in by_op.items()), key=lambda x: -x["ms_per_step"]),
        "top_nodes": [{"node": k[0], "op": k[1], "ms_per_step": ms(v), "share": round(v / run_total, 4)}
                      for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]],
    }
