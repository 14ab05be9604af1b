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
(``fp32`` loads ``onnx/decoder_model_merged.onnx``). A bundle with the in-place decoder
(``benchmarks/inplace_bundles.py``) is profiled on its ``decoder_step`` session (``cross_kv`` runs
once per clip, outside the profile); its graph has no ``If``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

PROMPT = "lively folk dance with violin and flute"

def resolve_variant(spec: str, workdir: Path) -> tuple[str, Path, str | None]:
    name, _, rest = spec.partition("=")
    folder, _, dtype = rest.partition(":")
    return name, workdir / folder, dtype or None


def worker(args) -> None:
    import onnxruntime as ort

    from musicgen.bundle.profiling import aggregate
    from musicgen.bundle.runtime import MusicgenOnnx, Timings

    dtypes = {"decoder_model_merged": args.dtype} if args.dtype else None
    rt = MusicgenOnnx(args.bundle, threads=args.threads, dtypes=dtypes)
    ids, mask = rt.tokenize([PROMPT])
    hidden = rt.encode_text(ids, mask)
    timings = Timings()
    rt.generate_codes(hidden, mask, max_new_tokens=args.tokens, guidance_scale=3.0, timings=timings)
    plain_ms = 1000 * timings.stages["decoder_cached_steps"] / (timings.decoder_steps - 1)
    part = "decoder_step" if rt.decoder_kind == "inplace" else "decoder_model_merged"
    with tempfile.TemporaryDirectory(prefix="kdq-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "decoder")
        rt.sessions[part] = ort.InferenceSession(str(rt.files[part]), opts, providers=["CPUExecutionProvider"])
        timings = Timings()
        rt.generate_codes(hidden, mask, max_new_tokens=args.tokens, guidance_scale=3.0, timings=timings)
        profiled_ms = 1000 * timings.stages["decoder_cached_steps"] / (timings.decoder_steps - 1)
        events = json.loads(Path(rt.sessions[part].end_profiling()).read_text())
    agg = aggregate(events)
    out = {"decoder_file": str(rt.files[part]), "decoder_bytes": rt.files[part].stat().st_size,
           "decoder_kind": rt.decoder_kind, "nodes_per_step": round(sum(o["calls_per_step"] for o in agg["by_op"]), 1),
           "loop_ms_per_cached_step_unprofiled": round(plain_ms, 3),
           "loop_ms_per_cached_step_profiled": round(profiled_ms, 3), **agg}
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
              f"{res['loop_ms_per_cached_step_profiled']} profiled, model_run {res['model_run_ms_per_step']} ms, "
              f"{res['nodes_per_step']} nodes per step "
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
