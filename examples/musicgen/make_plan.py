"""Profile a MusicGen and write a measured mixed-precision plan.

    python examples/musicgen/make_plan.py --model DIR --out plan.json [--granularity layer]
        [--candidates fp32,fp16,bf16,int8] [--max-bytes N | --max-sensitivity S | --paper-size]
        [--cache profile.json]

Default budget: the size of TinyMusician's paper plan on this model (``--paper-size``), so the result
is directly comparable with the hand-chosen plan; both are measured and printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicgen.plans import GRANULARITIES, musicgen_groups, musicgen_score, paper_plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="MusicGen save_pretrained folder")
    ap.add_argument("--out", required=True, help="plan JSON to write")
    ap.add_argument("--granularity", default="layer", choices=GRANULARITIES)
    ap.add_argument("--candidates", default="fp32,fp16,bf16,int8")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--max-bytes", type=int)
    budget.add_argument("--max-sensitivity", type=float)
    budget.add_argument("--paper-size", action="store_true", help="budget = the paper plan's size (default)")
    ap.add_argument("--cache", help="profile cache JSON (resumable)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)

    import torch
    from transformers import MusicgenForConditionalGeneration

    from kdq.quant import MixedPrecisionPlanner

    if args.threads:
        torch.set_num_threads(args.threads)
    model = MusicgenForConditionalGeneration.from_pretrained(args.model).eval()
    score = musicgen_score(model, batch=args.batch, frames=args.frames)
    planner = MixedPrecisionPlanner(model, musicgen_groups(model, args.granularity), candidates=args.candidates.split(","))
    table = planner.profile(score, cache=args.cache)
    paper = planner.measure(paper_plan(), score)
    if args.max_sensitivity is not None:
        plan = planner.solve(table, max_sensitivity=args.max_sensitivity)
    else:
        plan = planner.solve(table, max_bytes=args.max_bytes if args.max_bytes is not None else int(paper["measured_bytes"]))
    mine = planner.measure(plan, score)
    plan.meta["measured"] = {"bytes": mine["measured_bytes"], "sensitivity": mine["measured_sensitivity"]}
    plan.meta["paper_plan"] = {"bytes": paper["measured_bytes"], "sensitivity": paper["measured_sensitivity"]}
    plan.save(args.out)
    fp32 = table.total_bytes("fp32")
    print(f"fp32        {fp32 / 1e6:10.2f} MB")
    print(f"paper plan  {paper['measured_bytes'] / 1e6:10.2f} MB  sensitivity {paper['measured_sensitivity']:.4g}")
    print(f"planned     {mine['measured_bytes'] / 1e6:10.2f} MB  sensitivity {mine['measured_sensitivity']:.4g}"
          f" (predicted {mine['predicted_sensitivity']:.4g})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
