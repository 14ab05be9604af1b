"""Render benchmarks/results/generation.csv as a markdown table (latest row per impl, shape, metric).

    python benchmarks/render_generation.py [--shape "small N=128 B=1 cfg=3"]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "generation.csv"
COLUMNS = [("seconds", "s", 2), ("rtf", "RTF", 2), ("ms_per_cached_step", "ms/step", 1), ("floor_ms_per_step", "floor ms/step", 1),
           ("step_over_floor", "x floor", 1), ("peak_rss_bytes", "peak RSS GB", 2), ("bundle_bytes", "bundle GB", 3),
           ("speedup_vs_hf_fp32", "x vs hf fp32", 1), ("speedup_vs_hf_bf16dec", "x vs hf bf16", 1)]
SCALE = {"peak_rss_bytes": 1e-9, "bundle_bytes": 1e-9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=None, help="only rows of this shape")
    ap.add_argument("--csv", default=str(RESULTS))
    args = ap.parse_args()
    latest: dict[tuple[str, str], dict[str, dict]] = {}
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            if args.shape and row["shape"] != args.shape or row["impl"] == "torch_sum":
                continue
            latest.setdefault((row["shape"], row["impl"]), {})[row["metric"]] = row
    print("| shape | impl | " + " | ".join(c[1] for c in COLUMNS) + " | commit | load |")
    print("|" + " --- |" * (len(COLUMNS) + 4))
    for (shape, impl), metrics in latest.items():
        cells = []
        for key, _, digits in COLUMNS:
            r = metrics.get(key)
            cells.append(f"{float(r['median']) * SCALE.get(key, 1):.{digits}f}" if r else "")
        any_row = next(iter(metrics.values()))
        print(f"| {shape} | {impl} | " + " | ".join(cells) + f" | {any_row['commit']} | {any_row['load']} |")


if __name__ == "__main__":
    main()
