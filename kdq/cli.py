"""The ``kdq`` command line.

    kdq plan show PLAN [--model DIR] [--all]   the plan's rules, budgets, objective and device; with a
                                               model, which rule sets each module
    kdq plan size PLAN --model DIR [--json]    bytes of the model under the plan, by part and by dtype
    kdq --version

``--model DIR`` is a ``save_pretrained`` folder of a transformers model (its ``config.json`` names the
class). Only the config is read: the model is built on the ``meta`` device (no weights are loaded,
no remote code runs), which is enough for names, shapes and exact byte counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdq.errors import KdqError

__all__ = ["main", "load_meta_model"]


def load_meta_model(model_dir: str | Path) -> Any:
    """Build the transformers model described by ``DIR/config.json`` on the meta device (no weights).

    A ``kdq.quant.save_quantized`` folder gives its float architecture.

    Raises:
        ModelFolderError: no such folder/config, or an architecture transformers does not know.
    """
    from kdq.quant.saving import model_from_config

    return model_from_config(model_dir, device="meta", arg="--model").eval()


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _fmt_seconds(s: float) -> str:
    return f"{1e3 * s:,.3f} ms"


def _fmt_budget(key: str, value: Any) -> str:
    if value is None:
        return f"{key} none"
    if key == "max_bytes":
        return f"max_bytes {_fmt_bytes(value)}"
    if key == "max_latency":
        return f"max_latency {_fmt_seconds(value)}"
    if key == "extra_limits" and isinstance(value, dict):
        return ", ".join(f"{k} <= {v:g}" for k, v in value.items())
    return f"{key} {value:.4g}" if isinstance(value, (int, float)) else f"{key} {value}"


def _fmt_device(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _plan_show(args: argparse.Namespace) -> int:
    from kdq.quant import Plan, explain_plan

    plan = Plan.load(args.plan)
    print(f"plan {args.plan}  (schema kdq.plan/1, default {plan.default})")
    if plan.model.get("fingerprint"):
        print(f"made for model {plan.model['fingerprint']}" + (
            f", fp32 {_fmt_bytes(plan.model['bytes_fp32'])}" if "bytes_fp32" in plan.model else ""))
    if plan.predicted:
        parts = []
        if "bytes" in plan.predicted:
            parts.append(f"bytes {_fmt_bytes(plan.predicted['bytes'])}")
        if "sensitivity" in plan.predicted:
            parts.append(f"sensitivity {plan.predicted['sensitivity']:.4g}")
        if "latency" in plan.predicted:
            unit = plan.meta.get("latency_unit", "call")
            parts.append(f"latency {_fmt_seconds(plan.predicted['latency'])} per {unit}")
        print("predicted: " + ", ".join(parts))
    if plan.objective is not None or plan.budget:
        goal = {None: "objective not recorded", "bytes": "fewest bytes"}.get(plan.objective, f"least {plan.objective}")
        within = ", ".join(_fmt_budget(k, v) for k, v in plan.budget.items())
        print(f"planned for: {goal}" + (f" within {within}" if within else ""))
    if plan.device is not None:
        print("device: " + (", ".join(f"{k}={_fmt_device(v)}" for k, v in plan.device.items()) or "(not recorded)"))
    width = max([len(r) for r in plan.assignments] + [4])
    print(f"\n{'rule':<{width}}  dtype  {'sensitivity':>11}  {'bytes':>14}  reason")
    for rule, dtype in plan.assignments.items():
        rec = plan.groups.get(rule)
        sens = f"{rec.sensitivity:.4g}" if rec is not None and rec.sensitivity is not None else "-"
        nb = _fmt_bytes(rec.bytes) if rec is not None and rec.bytes is not None else "-"
        print(f"{rule:<{width}}  {dtype:<5}  {sens:>11}  {nb:>14}  {rec.reason if rec else ''}")
    if args.model:
        model = load_meta_model(args.model)
        plan.check_model(model)
        print()
        explain_plan(model, plan, only_params=not args.all)
        unused = plan.unused_rules([n for n, _ in model.named_modules() if n])
        if unused:
            print(f"\nrules that set no module: {unused}")
    return 0


def _size_report(model: Any, plan: Any) -> dict[str, Any]:
    from kdq.quant import apply_plan, model_bytes, module_dtypes

    fp32_total = model_bytes(model)
    fp32_parts = {name: model_bytes(child) for name, child in model.named_children()}
    dtypes = module_dtypes(model, plan)
    counts: dict[str, int] = {}
    for name, mod in model.named_modules():
        if mod._parameters or mod._buffers:
            counts[dtypes[name]] = counts.get(dtypes[name], 0) + 1
    apply_plan(model, plan)
    total = model_bytes(model)
    parts = {name: model_bytes(child) for name, child in model.named_children()}
    return {
        "fp32_bytes": fp32_total,
        "plan_bytes": total,
        "predicted_bytes": plan.predicted.get("bytes"),
        "reduction": 1.0 - total / fp32_total if fp32_total else 0.0,
        "parts": {k: {"fp32_bytes": fp32_parts[k], "plan_bytes": parts[k]} for k in fp32_parts},
        "modules_per_dtype": counts,
    }


def _plan_size(args: argparse.Namespace) -> int:
    from kdq.quant import Plan

    plan = Plan.load(args.plan)
    model = load_meta_model(args.model)
    rep = _size_report(model, plan)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    width = max([len(k) for k in rep["parts"]] + [5])
    print(f"{'part':<{width}}  {'fp32':>14}  {'plan':>14}")
    for k, v in rep["parts"].items():
        print(f"{k:<{width}}  {_fmt_bytes(v['fp32_bytes']):>14}  {_fmt_bytes(v['plan_bytes']):>14}")
    print(f"{'total':<{width}}  {_fmt_bytes(rep['fp32_bytes']):>14}  {_fmt_bytes(rep['plan_bytes']):>14}"
          f"  ({100 * rep['reduction']:.1f}% smaller)")
    print("modules per dtype: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["modules_per_dtype"].items())))
    if rep["predicted_bytes"] is not None:
        same = "matches" if rep["predicted_bytes"] == rep["plan_bytes"] else "DIFFERS from"
        print(f"plan bytes {same} the plan's prediction ({rep['predicted_bytes']} B)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``kdq`` argument parser (subcommands register here)."""
    from kdq import __version__

    ap = argparse.ArgumentParser(prog="kdq", description="kdq: compress generative models for on-device use")
    ap.add_argument("--version", action="version", version=f"kdq {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="inspect mixed-precision plans")
    psub = plan.add_subparsers(dest="plan_command", required=True)
    show = psub.add_parser("show", help="print a plan's rules; with --model, which rule sets each module")
    show.add_argument("plan", help="plan JSON file")
    show.add_argument("--model", help="save_pretrained folder of the model (config only)")
    show.add_argument("--all", action="store_true", help="also list modules that hold no tensors themselves")
    show.set_defaults(func=_plan_show)
    size = psub.add_parser("size", help="bytes of a model under a plan, by part and dtype")
    size.add_argument("plan", help="plan JSON file")
    size.add_argument("--model", required=True, help="save_pretrained folder of the model (config only)")
    size.add_argument("--json", action="store_true", help="print the report as JSON")
    size.set_defaults(func=_plan_size)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kdq`` command line; returns the exit status (2 on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KdqError as e:
        print(f"kdq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
