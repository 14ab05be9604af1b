"""Milliseconds per cached decoder step of the generation loop, for loop variants side by side.

Each variant runs ``MusicgenOnnx.generate_codes`` (greedy, guidance 3, batch 1, ``--tokens`` new
tokens) in its own process: one warm-up generation, then one timed generation; variants alternate
within each repeat, and the figure is the median over repeats of each run's mean cached step (the
per-step median of each run is kept too). Rows go to a CSV (op, impl, shape, metric, median, p20, p80,
machine, commit, load), the load average before each run is recorded, and every run's greedy codes are
compared with its reference variant's (``same_codes``, see ``ref`` below): a loop change must not
change the output.

A variant is ``name=BUNDLE[:DTYPE][+KEY=VALUE...]`` with BUNDLE a folder under ``--workdir``,
DTYPE the decoder file variant to load (``fp32``, ``q8``, ``q4``...) and KEYs:

- ``io=0|1``: IO binding of the KV cache (``MusicgenOnnx(io_binding=...)``; default 1 here, the rows in
  step.csv were taken with it; the runtime's own default is off since they were measured);
- ``spin=0|1``: ``session.intra_op.allow_spinning`` (ONNX Runtime's default is 1);
- ``denormal=0|1``: ``session.set_denormal_as_zero``;
- ``opt=disable|basic|extended|layout|all``: graph optimization level (default all);
- ``ort=0|1``: load the ``.ort`` files (converted on demand, as ``device_run.py --ort-format``);
- ``arena=0|1``: the CPU memory arena and memory patterns (0 = ``low_memory``, as ``device_run.py``);
- ``decoder=auto|merged|inplace``: which decoder graphs to run (``MusicgenOnnx(decoder=...)``; ``auto``, the
  default, runs the in-place graphs of a bundle exported with ``decoder="inplace"`` or ``"both"``);
- ``ref=NAME``: the variant whose greedy codes this one must reproduce (default: the first variant
  over the same bundle folder; a variant with another decoder, e.g. another block size, is its own).

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python benchmarks/bench_step.py \\
        --workdir /tmp/kdq-bench14/small --tokens 64 --repeats 5 \\
        --variants "base=bundle_int8dec,nospin=bundle_int8dec+spin=0" --tag session_options
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generation import _commit, _load, append_rows  # noqa: E402  (one definition for the benchmarks' CSV rows)

RESULTS = ROOT / "benchmarks" / "results" / "step.csv"
FIELDS = ["op", "impl", "shape", "metric", "median", "p20", "p80", "machine", "commit", "load"]
PROMPT = "lively folk dance with violin and flute"
KEYS = {"io", "spin", "denormal", "opt", "ort", "arena", "ref", "decoder"}


def parse_variant(spec: str) -> dict:
    name, _, rest = spec.partition("=")
    head, *opts = rest.split("+")
    folder, _, dtype = head.partition(":")
    out = {"name": name, "bundle": folder, "dtype": dtype or None, "opts": {}}
    for o in opts:
        k, _, v = o.partition("=")
        if k not in KEYS:
            raise SystemExit(f"variant {name!r}: unknown key {k!r}; valid: {sorted(KEYS)}")
        out["opts"][k] = v
    return out


def make_runtime(bundle: Path, dtype: str | None, opts: dict, threads: int):
    from musicgen.bundle.runtime import MusicgenOnnx

    ort_format = opts.get("ort", "0") == "1"
    if ort_format:
        from musicgen.bundle.device import ensure_ort_format

        ensure_ort_format(bundle)
    config = {}
    if "spin" in opts:
        config["session.intra_op.allow_spinning"] = opts["spin"]
    if "denormal" in opts:
        config["session.set_denormal_as_zero"] = opts["denormal"]
    return MusicgenOnnx(bundle, threads=threads, dtypes={"decoder_model_merged": dtype} if dtype else None,
                        ort_format=ort_format, io_binding=opts.get("io", "1") == "1",
                        low_memory=opts.get("arena", "1") == "0", graph_optimization=opts.get("opt", "all"),
                        session_config=config, decoder=opts.get("decoder", "auto"))


def worker(args) -> None:
    import numpy as np

    v = parse_variant(args.variant)
    t = time.perf_counter()
    rt = make_runtime(Path(args.workdir) / v["bundle"], v["dtype"], v["opts"], args.threads)
    load_s = time.perf_counter() - t
    ids, mask = rt.tokenize([PROMPT])
    hidden = rt.encode_text(ids, mask)
    rt.generate_codes(hidden, mask, max_new_tokens=args.tokens, guidance_scale=3.0)  # warm-up
    steps = []
    t = time.perf_counter()
    for out_ids, _ in rt._steps(hidden, mask, max_new_tokens=args.tokens, guidance_scale=3.0):
        now = time.perf_counter()
        steps.append(now - t)
        t = now
    cached = steps[1:]
    np.save(args.codes, out_ids)
    print(json.dumps({"load_s": load_s, "first_ms": 1000 * steps[0], "mean_ms": 1000 * statistics.fmean(cached),
                      "median_ms": 1000 * statistics.median(cached)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="folder holding the bundles (bench_generation.py --workdir)")
    ap.add_argument("--variants", help="comma-separated variants (see the module docstring)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="a label for this comparison (the CSV's op column: step/TAG)")
    ap.add_argument("--size", default="small", help="label of the model size for the CSV's shape column")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--codes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import numpy as np

    variants = [parse_variant(s) for s in args.variants.split(",")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}", "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    reference: dict = {}  # greedy codes of each variant's first run
    codes = Path(args.workdir) / "_bench_step_codes.npy"
    print(f"load before: {_load()}", flush=True)
    for r in range(args.repeats):
        for spec, v in zip(args.variants.split(","), variants):
            load = _load()
            cmd = [sys.executable, __file__, "--worker", "--variant", spec, "--workdir", args.workdir,
                   "--tokens", str(args.tokens), "--threads", str(args.threads), "--codes", str(codes)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{v['name']} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            got = np.load(codes)
            ref = v["opts"].get("ref") or next(w["name"] for w in variants if w["bundle"] == v["bundle"])
            reference.setdefault(v["name"], got)
            want = reference.get(ref)
            res["same_codes"] = None if want is None else bool(want.shape == got.shape and (want == got).all())
            res["ref"] = ref
            res["load"] = load
            runs[v["name"]].append(res)
            print(f"  repeat {r} {v['name']:<14} mean {res['mean_ms']:7.2f} ms  median {res['median_ms']:7.2f} ms  "
                  f"first {res['first_ms']:7.1f} ms  same codes as {res['ref']}: {res['same_codes']}  load {load}", flush=True)
    codes.unlink(missing_ok=True)
    rows = []
    shape = f"{args.size} N={args.tokens} B=1 cfg=3"
    machine = f"{platform.machine()}-{os.cpu_count()}cpu-{args.threads}thr"
    commit = _commit()
    for name, rs in runs.items():
        if not rs:
            continue
        spec = next(s for s, v in zip(args.variants.split(","), variants) if v["name"] == name)
        for metric, key in (("ms_per_cached_step", "mean_ms"), ("ms_per_cached_step_run_median", "median_ms"),
                            ("ms_first_step", "first_ms")):
            vals = sorted(x[key] for x in rs)
            q = statistics.quantiles(vals, n=5, method="inclusive") if len(vals) >= 2 else [vals[0]] * 4
            rows.append({"op": f"step/{args.tag}" if args.tag else "step", "impl": spec, "shape": shape, "metric": metric,
                         "median": round(statistics.median(vals), 4), "p20": round(q[0], 4), "p80": round(q[3], 4),
                         "machine": machine, "commit": commit, "load": " | ".join(x["load"] for x in rs)})
        rows.append({"op": f"step/{args.tag}" if args.tag else "step", "impl": spec, "shape": shape,
                     "metric": f"same_codes_as_{rs[0]['ref']}", "median": int(all(x["same_codes"] for x in rs)), "p20": "", "p80": "", "machine": machine,
                     "commit": commit, "load": ""})
    base = None
    print(f"load after: {_load()}", flush=True)
    for row in rows:
        if row["metric"] == "ms_per_cached_step":
            base = base or row["median"]
            print(f"{row['impl']:<60} {row['median']:8.2f} ms/step (p20 {row['p20']:.2f}, p80 {row['p80']:.2f})  "
                  f"x{base / row['median']:.3f} vs first", flush=True)
    if not args.no_csv:
        append_rows(RESULTS, FIELDS, rows)
        print(f"{len(rows)} rows appended to {RESULTS}", flush=True)


if __name__ == "__main__":
    main()
