"""Export bundles with the in-place decoder (``export_bundle(..., decoder="inplace")``) of bench_generation.py's
random model, for the step and end-to-end benchmarks.

Reads ``--model`` (bench_generation.py's ``WORKDIR/model``) and writes ``OUT/bundle_NAME`` for each
``NAME=PLAN[:BLOCK]`` (PLAN one of bench_generation.py's plans: ``fp32``, ``int8dec``, ``int4dec``, or a
plan JSON file such as the one bench_latency_plan.py writes; BLOCK the 4-bit block size). Prints one
JSON line per bundle: export seconds, bytes, node counts, parity and conformance of the in-place
graphs (the full report is the bundle's ``export_report.json``).

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python benchmarks/inplace_bundles.py \\
        --model /tmp/kdq-bench14/small/model --out /tmp/kdq-bench14e/small \\
        --bundles inplace_int8=int8dec,inplace_int4=int4dec:32,inplace_int4_b128=int4dec:128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def summary(report: dict) -> dict:
    out = {"bundle_bytes": report["bundle_bytes"]}
    for name in ("cross_kv", "decoder_step"):
        e = report["parts"][name]
        par = e["parity"]
        if "snr_db_and_max_abs_diff" in par:
            par = {k: v for k, v in par["snr_db_and_max_abs_diff"].items() if k in ("logits", "cross_key.0")}
        else:
            par = {k: v for k, v in par["max_abs_diff"].items() if k in ("logits", "cross_key.0")}
        out[name] = {"file": e["file"], "bytes": e["bytes"], "nodes": e["nodes"], "parity": par,
                     "conforms": e.get("conformance", {}).get("conforms", True)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundles", required=True, help="comma-separated NAME=PLAN[:BLOCK]")
    args = ap.parse_args()
    from bench_generation import plans

    from kdq.quant import Plan
    from musicgen.bundle.build import export_bundle

    for spec in args.bundles.split(","):
        name, _, rest = spec.partition("=")
        plan_name, _, block = rest.partition(":")
        t = time.perf_counter()
        plan = Plan.load(plan_name) if plan_name.endswith(".json") else plans()[plan_name]
        report = export_bundle(args.model, Path(args.out) / f"bundle_{name}", plan=plan, decoder="inplace",
                               int4_block_size=int(block or 32), progress=False)
        print(json.dumps({"name": name, "plan": plan_name, "block": int(block or 32),
                          "export_s": round(time.perf_counter() - t, 1), **summary(report)}), flush=True)


if __name__ == "__main__":
    main()
