"""Benchmark the mixed-precision planner at the real MusicGen-small architecture (random weights).

Reports: bytes of fp32 vs TinyMusician's paper plan vs a planned plan at the paper plan's size
(with each plan's measured score), profiling time at layer granularity (measured tier and Fisher
tier), and solver time. Appends rows to ``benchmarks/results/planner.csv``.

Heavy (the model is ~2.35 GB fp32): run it under the shared lock, in the background::

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python \\
        benchmarks/bench_planner.py > benchmarks/results/tmp/bench_planner.log 2>&1 &
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kdq.quant import MixedPrecisionPlanner, model_bytes  # noqa: E402
from musicgen.plan import calibration_inputs, musicgen_groups, musicgen_score, paper_plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "planner.csv"
FIELDS = ["op", "impl", "shape", "metric", "median", "p20", "p80", "machine", "commit", "load"]


def musicgen_small_config():
    """MusicGen-small's architecture, written out by hand (no hub): T5-base encoder, a 1024 x 24
    decoder with 16 heads and ffn 4096 over 4 codebooks of 2048, EnCodec 32 kHz (64 filters,
    ratios [8, 5, 4, 4], 2 LSTM layers, 4 codebooks at 2.2 kbps)."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    t5 = T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
        relative_attention_num_buckets=32, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
    )
    codec = EncodecConfig(
        sampling_rate=32000, audio_channels=1, num_filters=64, hidden_size=128, upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048, codebook_dim=128, num_lstm_layers=2, target_bandwidths=[2.2], norm_type="weight_norm",
        use_causal_conv=False, pad_mode="reflect", compress=2, residual_kernel_size=3, dilation_growth_rate=2,
        kernel_size=7, last_kernel_size=7, num_residual_layers=1, use_conv_shortcut=False, normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
        num_codebooks=4, max_position_embeddings=2048, activation_function="gelu", pad_token_id=2048,
        bos_token_id=2048, dropout=0.0, tie_word_embeddings=False,
    )
    return MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())


def build_small(seed: int = 0):
    from transformers import MusicgenForConditionalGeneration

    from musicgen.models.tiny import make_informative

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(musicgen_small_config()).eval()
    make_informative(model, seed=seed)
    return model


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def _machine() -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu-{torch.get_num_threads()}thr"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _row(op, impl, shape, metric, values, rows):
    vals = sorted(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    q = statistics.quantiles(vals, n=5) if len(vals) >= 2 else [vals[0]] * 4
    row = {"op": op, "impl": impl, "shape": shape, "metric": metric, "median": statistics.median(vals),
           "p20": q[0], "p80": q[3], "machine": _machine(), "commit": _commit(), "load": _load()}
    rows.append(row)
    print(f"{op:<28} {impl:<22} {shape:<26} {metric:<22} {row['median']:.6g}", flush=True)


def render(path: Path) -> str:
    """The rows of the last run in ``path`` (same commit and machine as its last row) as markdown."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "(no rows)"
    last = rows[-1]
    run = [r for r in rows if r["commit"] == last["commit"] and r["machine"] == last["machine"]]
    out = ["| op | impl | shape | metric | median | p20 | p80 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in run:
        out.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {r['metric']} | {float(r['median']):.6g} | "
                   f"{float(r['p20']):.6g} | {float(r['p80']):.6g} |")
    out.append(f"\nmachine {last['machine']}, commit {last['commit']}, load {last['load']}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", default="fp32,fp16,bf16,int8,int4")
    ap.add_argument("--granularity", default="layer", choices=["part", "layer", "sublayer"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--cache", default=None, help="profile cache JSON (resumable)")
    ap.add_argument("--no-fisher", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tiny", action="store_true", help="smoke test on the tiny random MusicGen")
    ap.add_argument("--render", action="store_true", help="print the last run in --out as markdown and exit")
    ap.add_argument("--meta", action="store_true", help="light mode: exact bytes and solver time, no weights")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.out)))
        return
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    print(f"load before: {_load()}", flush=True)

    t = time.perf_counter()
    if args.meta:
        meta_run(args, rows)
        _append(Path(args.out), rows)
        return
    if args.tiny:
        from musicgen.models.tiny import build_tiny_musicgen

        model = build_tiny_musicgen(0)
    else:
        model = build_small()
    print(f"built the model in {time.perf_counter() - t:.1f}s", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    shape = f"musicgen-{'tiny' if args.tiny else 'small'} {n_params / 1e6:.1f}M"
    fp32 = model_bytes(model)
    _row("bytes", "fp32", shape, "bytes", fp32, rows)

    cal = {"batch": args.batch, "frames": args.frames}
    t = time.perf_counter()
    score = musicgen_score(model, **cal)
    ref_s = time.perf_counter() - t
    _row("score_fn", "musicgen_kl+audio", f"b{args.batch}x{args.frames}", "seconds_reference_outputs", ref_s, rows)

    groups = musicgen_groups(model, args.granularity)
    cands = args.candidates.split(",")
    planner = MixedPrecisionPlanner(model, groups, candidates=cands)
    t = time.perf_counter()
    table = planner.profile(score, cache=args.cache, progress=True)
    prof_s = time.perf_counter() - t
    tag = f"{len(groups)}groups x{len(cands) - 1}dtypes"
    _row("profile", f"measured-{args.granularity}", tag, "seconds", prof_s, rows)
    _row("profile", f"measured-{args.granularity}", tag, "evaluations", table.meta.get("evaluations", 0), rows)

    # Paper plan, measured (applied in place, scored, restored).
    paper = planner.measure(paper_plan(), score)
    _row("bytes", "paper_plan", shape, "bytes", paper["measured_bytes"], rows)
    _row("score", "paper_plan", shape, "measured_sensitivity", paper["measured_sensitivity"], rows)

    budget = int(paper["measured_bytes"])
    times = []
    for _ in range(5):
        t = time.perf_counter()
        plan = planner.solve(table, max_bytes=budget)
        times.append(time.perf_counter() - t)
    _row("solve", "milp max_bytes", tag, "seconds", times, rows)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        planner.solve(table, max_sensitivity=plan.predicted["sensitivity"])
        times.append(time.perf_counter() - t)
    _row("solve", "milp max_sensitivity", tag, "seconds", times, rows)
    t = time.perf_counter()
    front = planner.frontier(table, points=32)
    _row("frontier", "milp x32 budgets", tag, "seconds", time.perf_counter() - t, rows)
    _row("frontier", "milp x32 budgets", tag, "points", len(front), rows)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([f["bytes"] / 1e6 for f in front], [max(f["sensitivity"], 1e-12) for f in front], "o-", ms=3,
                label="planned (Pareto front, predicted)")
        ax.plot([paper["measured_bytes"] / 1e6], [max(paper["measured_sensitivity"], 1e-12)], "r*", ms=10,
                label="paper plan (measured)")
        ax.set_xlabel("model bytes (MB)")
        ax.set_ylabel("sensitivity (KL nats/position + audio rel. error)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"{shape}, {args.granularity} groups")
        fig.tight_layout()
        fig.savefig(Path(args.out).parent / "planner_frontier.png", dpi=120)
    except Exception as e:  # the plot is a convenience; the CSV rows are the result
        print(f"frontier plot skipped: {e}", flush=True)
    planned = planner.measure(plan, score)
    _row("bytes", "planned@paper_size", shape, "bytes", planned["measured_bytes"], rows)
    _row("bytes", "planned@paper_size", shape, "predicted_bytes", planned["predicted_bytes"], rows)
    _row("score", "planned@paper_size", shape, "predicted_sensitivity", planned["predicted_sensitivity"], rows)
    _row("score", "planned@paper_size", shape, "measured_sensitivity", planned["measured_sensitivity"], rows)
    plan_path = Path(args.out).parent / "planner_musicgen_small_plan.json"
    plan.save(plan_path)
    print(f"planned plan written to {plan_path}", flush=True)
    counts: dict[str, int] = {}
    for d in plan.assignments.values():
        counts[d] = counts.get(d, 0) + 1
    print(f"planned dtypes per group: {counts}", flush=True)
    int8_all = planner.solve(table, max_bytes=table.total_bytes("int8"))
    m8 = planner.measure(int8_all, score)
    _row("bytes", "planned@all-int8_size", shape, "bytes", m8["measured_bytes"], rows)
    _row("score", "planned@all-int8_size", shape, "measured_sensitivity", m8["measured_sensitivity"], rows)

    if not args.no_fisher:
        x = calibration_inputs(model, **cal)

        def logits_fn(m):
            return m(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                     decoder_input_ids=x["decoder_input_ids"]).logits

        t = time.perf_counter()
        ft = planner.profile_fisher(logits_fn, samples=2, progress=True)
        _row("profile", f"fisher-{args.granularity}", tag, "seconds", time.perf_counter() - t, rows)
        # Rank agreement with the measured tier on groups the logits see (decoder and text encoder).
        pairs = [(table.sensitivity[g][d], ft.sensitivity[g][d]) for g in table.groups
                 if not g.startswith("audio_encoder") for d in table.candidates[1:]]
        from scipy.stats import spearmanr

        rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
        _row("profile", f"fisher-{args.granularity}", tag, "spearman_vs_measured", rho, rows)

    _append(Path(args.out), rows)


def _append(out: Path, rows: list[dict]) -> None:
    from bench_generation import append_rows

    append_rows(out, FIELDS, rows)
    print(f"appended {len(rows)} rows to {out}; load after: {_load()}", flush=True)


def meta_run(args, rows: list[dict]) -> None:
    """Light mode (no weights, no lock needed): exact bytes on the meta device, and solver time on a
    table of MusicGen-small's exact bytes with synthetic sensitivities (seeded, log-normal, growing
    as bits shrink). Measures the solver and the byte accounting, not plan quality."""
    import numpy as np
    from transformers import MusicgenForConditionalGeneration

    from kdq.quant import apply_plan

    with torch.device("meta"):
        model = MusicgenForConditionalGeneration(musicgen_small_config()).eval()
    shape = f"musicgen-small {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M (meta)"
    _row("bytes", "fp32", shape, "bytes", model_bytes(model), rows)
    groups = musicgen_groups(model, args.granularity)
    cands = args.candidates.split(",")
    planner = MixedPrecisionPlanner(model, groups, candidates=cands)
    t = time.perf_counter()
    table = planner.profile(lambda m: 0.0, progress=False, log=None)
    tag = f"{len(groups)}groups x{len(cands) - 1}dtypes"
    _row("profile", "bytes-only (meta)", tag, "seconds", time.perf_counter() - t, rows)
    rng = np.random.default_rng(0)
    noise = {"fp32": 0.0, "fp16": 1e-8, "bf16": 5e-7, "int8": 3e-6, "int4": 5e-4}
    for g in table.groups:
        for d in table.candidates:
            table.sensitivity[g][d] = noise[d] * float(rng.lognormal(0.0, 1.0))
    import copy

    paper_model = apply_plan(copy.deepcopy(model), paper_plan())
    budget = model_bytes(paper_model)
    _row("bytes", "paper_plan", shape, "bytes", budget, rows)
    _row("bytes", "paper_plan minus codec encoder", shape, "bytes", budget - model_bytes(paper_model.audio_encoder.encoder), rows)
    for d in table.candidates:
        _row("bytes", f"all groups {d}", shape, "predicted_bytes", table.total_bytes(d), rows)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        plan = planner.solve(table, max_bytes=budget)
        times.append(time.perf_counter() - t)
    _row("solve", "milp max_bytes (synthetic s)", tag, "seconds", times, rows)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        planner.solve(table, max_sensitivity=plan.predicted["sensitivity"])
        times.append(time.perf_counter() - t)
    _row("solve", "milp max_sensitivity (synthetic s)", tag, "seconds", times, rows)
    t = time.perf_counter()
    front = planner.frontier(table, points=32)
    _row("frontier", "milp x32 budgets (synthetic s)", tag, "seconds", time.perf_counter() - t, rows)
    _row("frontier", "milp x32 budgets (synthetic s)", tag, "points", len(front), rows)
    applied = apply_plan(model, plan)
    _row("bytes", "planned@paper_size (synthetic s)", shape, "bytes", model_bytes(applied), rows)
    _row("bytes", "planned@paper_size (synthetic s)", shape, "predicted_bytes", plan.predicted["bytes"], rows)


if __name__ == "__main__":
    main()
