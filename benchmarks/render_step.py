"""Render benchmarks/results/step.csv (bench_step.py) as markdown tables, one per comparison.

    python benchmarks/render_step.py [--op step/session_int8]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "step.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", default=None, help="only this comparison (the CSV's op column)")
    ap.add_argument("--csv", default=str(RESULTS))
    args = ap.parse_args()
    groups: dict[tuple[str, str], dict[str, dict[str, dict]]] = {}
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            if args.op and row["op"] != args.op:
                continue
            groups.setdefault((row["op"], row["shape"]), {}).setdefault(row["impl"], {})[row["metric"]] = row
    for (op, shape), impls in groups.items():
        print(f"\n{op}, {shape}\n")
        print("| variant | ms / cached step, median (p20-p80) | vs first | first step ms | same greedy codes | commit |")
        print("| --- | --- | --- | --- | --- | --- |")
        base = None
        for impl, m in impls.items():
            s = m["ms_per_cached_step"]
            base = base or float(s["median"])
            same = next((f"{r['median'] == '1'} ({k.removeprefix('same_codes_as_')})" for k, r in m.items()
                         if k.startswith("same_codes_as_")), "")
            first = m.get("ms_first_step", {}).get("median", "")
            print(f"| `{impl}` | {float(s['median']):.2f} ({float(s['p20']):.2f}-{float(s['p80']):.2f}) | "
                  f"{base / float(s['median']):.2f}x | {float(first):.1f} | {same} | {s['commit']} |")


if __name__ == "__main__":
    main()
