"""Cost of one Frechet distance by embedding dimension: kdq's scipy ``sqrtm`` path vs the plain reference.

A FAD bootstrap with B replicates costs about B times one call, so this table says what
``--bootstrap`` costs for each embedder (clap-mini 64-D, VGGish 128-D, LAION CLAP 512-D).

    flock /tmp/kdq-heavy.lock python benchmarks/bench_frechet.py

Rows are appended to ``benchmarks/results/frechet.csv``
(op, impl, shape, metric, median, p20, p80, machine, commit).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from kdq.metrics import frechet_distance, frechet_distance_reference

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "benchmarks" / "results" / "frechet.csv"
FIELDS = ("op", "impl", "shape", "metric", "median", "p20", "p80", "machine", "commit")
IMPLS = {"kdq_sqrtm": frechet_distance, "reference_eigh": frechet_distance_reference}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()}cpu numpy{np.__version__} load={os.getloadavg()[0]:.2f}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="16,64,128,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    args = ap.parse_args()
    rows = []
    rng = np.random.default_rng(0)
    for d in (int(x) for x in args.dims.split(",")):
        n = max(1000, 2 * d)
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.1 + 0.1
        times: dict[str, list[float]] = {k: [] for k in IMPLS}
        values = {}
        for _ in range(args.repeats):  # alternate implementations within one process
            for name, fn in IMPLS.items():
                t0 = time.perf_counter()
                values[name] = fn(a, b)
                times[name].append(time.perf_counter() - t0)
        rel = abs(values["kdq_sqrtm"] - values["reference_eigh"]) / values["reference_eigh"]
        for name, ts in times.items():
            p20, med, p80 = np.percentile(ts, [20, 50, 80])
            rows.append({"op": "frechet_distance", "impl": name, "shape": f"N={n} D={d}", "metric": "seconds",
                         "median": f"{med:.4g}", "p20": f"{p20:.4g}", "p80": f"{p80:.4g}", "machine": machine(),
                         "commit": commit()})
            print(f"D={d:4d} N={n:5d} {name:15s} median {med * 1e3:9.2f} ms  (p20 {p20 * 1e3:.2f}, p80 {p80 * 1e3:.2f})"
                  f"  rel. diff to reference {rel:.1e}")
    if not args.no_csv:
        from bench_generation import append_rows

        append_rows(CSV_PATH, FIELDS, rows)


if __name__ == "__main__":
    main()
