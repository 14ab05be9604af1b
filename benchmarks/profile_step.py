"""Where a cached decoder step's time goes: ONNX Runtime's profiler over the generation loop.

For each bundle (or decoder variant), in its own process: ``MusicgenOnnx`` generates ``--tokens`` new
tokens once without the profiler (warm-up, and the unprofiled ms per cached step), then once more with
the decoder session's profiler on (``SessionOptions.enable_profiling``). The profile's node events are
assigned to decoder runs by time; the first run (no cache) is dropped and the cached runs are
aggregated per op type (time per cached step, share, calls per step) and per node, with the layer
index stripped (``layers.*``), so the 24 layers' copies of a node add up.

The merged decoder is one ``If`` node whose branches hold the graph; the profiler times the nodes
inside the branch and the ``If`` itself (which includes them): ``If (own)`` is the ``If`` time minus
the nodes inside it (starting the subgraph, copying its outputs out), ``run overhead`` is the
session's ``model_run`` time minus the ``If`` (binding inputs and outputs).

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python \\
        benchmarks/profile_step.py --workdir /tmp/kdq-bench14/small --tokens 64 \\
        --variants int8dec=bundle_int8dec,int4dec=bundle_int4dec,fp32=bundle_int8dec:fp32 \\
        --out benchmarks/results/profile_step_small.json

A variant is ``name=BUNDLE[:DTYPE]``: a bundle folder under ``--workdir`` (built by
``benchmarks/bench_generation.py --workdir``) and, optionally, the decoder file variant to load
(``fp32`` loads ``onnx/decoder_model_merged.onnx``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

PROMPT = "lively folk dance with violin and flute"

# what each op type is, for the summary table (anything else is "other")
CATEGORY = {
    "MatMulNBits": "weight matmul", "DynamicQuantizeMatMul": "weight matmul", "MatMulIntegerToFloat": "weight matmul",
    "MatMulInteger": "weight matmul", "DynamicQuantizeLinear": "activation quantize", "FusedMatMul": "weight matmul",
    "Gemm": "weight matmul", "Softmax": "attention (scores, softmax, values)", "MultiHeadAttention": "attention (scores, softmax, values)",
    "Attention": "attention (scores, softmax, values)", "Concat": "KV cache concat",
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


def category(op: str, parameter_bytes: int) -> str:
    if op == "MatMul":  # a MatMul with an initializer is a projection; without, attention's Q.K^T or P.V
        return "weight matmul" if parameter_bytes > 0 else "attention (scores, softmax, values)"
    if op == "Gather" and parameter_bytes > 1 << 20:
        return "embedding gather"
    return CATEGORY.get(op, "other")


def node_key(name: str) -> str:
    """A profiler node name without its layer index and the ``_kernel_time`` suffix."""
    return re.sub(r"layers\.\d+", "layers.*", name.removesuffix("_kernel_time"))


def aggregate(events: list[dict], skip_runs: int = 1) -> dict:
    """Per-op and per-node time of the decoder runs after the first ``skip_runs`` (see the module doc)."""
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
            by_cat[category(op, pbytes)] += e["dur"]
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
                      for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:15]],
    }


def resolve_variant(spec: str, workdir: Path) -> tuple[str, Path, str | None]:
    name, _, rest = spec.partition("=")
    folder, _, dtype = rest.partition(":")
    return name, workdir / folder, dtype or None


def worker(args) -> None:
    import onnxruntime as ort

    from musicgen.bundle.runtime import MusicgenOnnx, Timings

    dtypes = {"decoder_model_merged": args.dtype} if args.dtype else None
    rt = MusicgenOnnx(args.bundle, threads=args.threads, dtypes=dtypes)
    ids, mask = rt.tokenize([PROMPT])
    hidden = rt.encode_text(ids, mask)
    timings = Timings()
    rt.generate_codes(hidden, mask, max_new_tokens=args.tokens, guidance_scale=3.0, timings=timings)
    plain_ms = 1000 * timings.stages["decoder_cached_steps"] / (timings.decoder_steps - 1)
    with tempfile.TemporaryDirectory(prefix="kdq-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "decoder")
        rt.sessions["decoder_model_merged"] = ort.InferenceSession(str(rt.files["decoder_model_merged"]), opts,
                                                                   providers=["CPUExecutionProvider"])
        timings = Timings()
        rt.generate_codes(hidden, mask, max_new_tokens=args.tokens, guidance_scale=3.0, timings=timings)
        profiled_ms = 1000 * timings.stages["decoder_cached_steps"] / (timings.decoder_steps - 1)
        events = json.loads(Path(rt.sessions["decoder_model_merged"].end_profiling()).read_text())
    out = {"decoder_file": str(rt.files["decoder_model_merged"]), "decoder_bytes": rt.files["decoder_model_merged"].stat().st_size,
           "loop_ms_per_cached_step_unprofiled": round(plain_ms, 3),
           "loop_ms_per_cached_step_profiled": round(profiled_ms, 3), **aggregate(events)}
    print(json.dumps(out))


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="folder holding the bundles (bench_generation.py --workdir)")
    ap.add_argument("--variants", default="int8dec=bundle_int8dec,int4dec=bundle_int4dec")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import onnxruntime as ort

    result = {"command": " ".join(["python", "benchmarks/profile_step.py", *sys.argv[1:]]), "commit": _commit(),
              "machine": f"{platform.machine()}-{os.cpu_count()}cpu", "cpu": _cpu_model(), "onnxruntime": ort.__version__,
              "threads": args.threads, "tokens": args.tokens, "guidance_scale": 3.0, "variants": {}}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}", "OMP_NUM_THREADS": str(args.threads)}
    for spec in args.variants.split(","):
        name, bundle, dtype = resolve_variant(spec, Path(args.workdir))
        load_before = _load()
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "--tokens", str(args.tokens),
               "--threads", str(args.threads), *(["--dtype", dtype] if dtype else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update({"load_before": load_before, "load_after": _load(), "wall_s": round(time.perf_counter() - t, 1)})
        result["variants"][name] = res
        print(f"== {name}: loop {res['loop_ms_per_cached_step_unprofiled']} ms/step unprofiled, "
              f"{res['loop_ms_per_cached_step_profiled']} profiled, model_run {res['model_run_ms_per_step']} ms "
              f"(load {load_before} -> {res['load_after']})", flush=True)
        for c in res["by_category"]:
            print(f"   {c['category']:<40} {c['ms_per_step']:8.3f} ms  {100 * c['share']:5.1f}%", flush=True)
        for o in res["by_op"][:12]:
            print(f"   op {o['op']:<30} {o['ms_per_step']:8.3f} ms  {100 * o['share']:5.1f}%  x{o['calls_per_step']:.0f}", flush=True)
        for o in res["top_nodes"][:8]:
            print(f"   node {o['node'][:70]:<70} {o['op']:<22} {o['ms_per_step']:7.3f} ms", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
