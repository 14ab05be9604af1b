"""A plan for the device: measure what each part costs in ONNX Runtime on this machine, then ask the
planner for the fastest plan at no more bytes and no more measured sensitivity than the paper's.

    python benchmarks/bench_latency_plan.py --model examples/musicgen/hub/mini/student_base \\
        --tokens runs/mini/tokens/valid.safetensors --out benchmarks/results/latency_plan_mini.json
    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples python benchmarks/bench_latency_plan.py \\
        --model /tmp/kdq-bench14/small/model --bundles uniform --candidates fp32,fp16,int8,int4 \\
        --seconds 10 --workdir /tmp/kdq-latency-small --out benchmarks/results/latency_plan_small.json

1. Sensitivity: ``MixedPrecisionPlanner`` at part granularity (text encoder, decoder, EnCodec) with
   the example's score (decoder-logit KL to fp32 + EnCodec's relative audio error) on valid clips
   (``--tokens``), or on fixed random inputs without it (random-weight models).
2. Device costs (``kdq.quant.DeviceCosts``), one of two ways (``--bundles``):
   - ``per-part``: for each part and candidate dtype, a bundle with that part in that dtype and the
     others in fp32;
   - ``uniform``: one bundle per candidate dtype with every part in it (a part the export refuses in
     that dtype falls back to per-part bundles for that dtype); 4 exports instead of 10, which matters
     at MusicGen-small's size. Parts exchange fp32 or fp16 tensors through the runtime, so a part's
     stage time does not depend on its neighbours' dtypes beyond a cast.
   Each bundle is run by ``device_run.py`` in a fresh process (``--repeats`` times, the median kept);
   a part's cost in a dtype is its stage time there (text encoder; decoder first step + cached steps;
   EnCodec decode), casts at its borders included; the rest (tokenizing) is ``rest_seconds``. A
   (part, dtype) the export refuses costs ``inf`` (never chosen). Unit: one clip of ``--seconds``
   seconds. Nothing is assumed about which dtype is fast: it is measured.
3. Plans: the paper's (T5 int8, decoder fp16, EnCodec fp32); kdq's latency plan
   ``planner.solve(table, costs=..., max_bytes=paper bytes, max_sensitivity=paper sensitivity,
   objective="latency")``; and the fastest plan within the paper's bytes alone (sensitivity
   reported, not bounded; with random weights the sensitivities measure the machinery, not music).
   Each is exported and timed the same way, side by side in one run. A budget no plan meets is
   recorded with the planner's message.

``--reuse`` keeps bundles already in ``--workdir`` (a killed run resumes where it stopped; delete the
folder when the model or the code changed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

PROMPT = "A moderate Bach chorale in G major played on piano, four-part harmony."


def cpu_info() -> dict:
    """CPU model, the SIMD flags that matter for ONNX Runtime's kernels, and the runtime version."""
    import onnxruntime

    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(have & {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile"})
                break
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def timed_runs(bundle: Path, *, seconds: float, threads: int, repeats: int, workdir: Path) -> dict:
    """``device_run.py`` in a fresh process ``repeats`` times (greedy, same prompt): median stage times."""
    runs = []
    for r in range(repeats):
        cmd = [sys.executable, str(ROOT / "examples" / "musicgen" / "device_run.py"), "--bundle", str(bundle),
               "--prompt", PROMPT, "--seconds", str(seconds), "--threads", str(threads), "--greedy", "--ort-format",
               "--out", str(workdir / f"{bundle.name}_{r}.wav")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r["stages_s"][k] for r in runs) for k in runs[0]["stages_s"]}
    return {"stages_s": med, "generation_s": statistics.median(r["generation_s"] for r in runs),
            "rtf": statistics.median(r["rtf"] for r in runs),
            "ms_per_cached_step": statistics.median(r["ms_per_cached_step"] for r in runs),
            "bundle_bytes": sum(runs[0]["bundle_bytes"].values()), "repeats": repeats}


def part_costs(stages: dict) -> dict[str, float]:
    """Seconds per planner part from one run's stage times."""
    return {"text_encoder": stages["text_encoder"],
            "decoder": stages["decoder_first_step"] + stages["decoder_cached_steps"],
            "audio_encoder": stages["encodec_decode"]}


def frontier_rows(planner, table, costs) -> list[dict]:
    """The exact latency/sensitivity Pareto frontier (``planner.frontier``, ``points=None``), as JSON rows."""
    return [{"latency_s": r["latency"], "sensitivity": r["sensitivity"], "bytes": int(r["bytes"]),
             "assignments": dict(r["plan"].assignments)}
            for r in planner.frontier(table, axes=("latency", "sensitivity"), costs=costs, points=None)]


def plot_frontier(result: dict, png: Path) -> None:
    """Seconds per clip against measured sensitivity: the frontier (predicted) and the timed plans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"fp32": "32", "fp16": "16", "int8": "i8", "int4": "i4"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    front = result["frontier"]
    ax.step([r["latency_s"] for r in front], [r["sensitivity"] for r in front], where="post", color="0.6",
            label="frontier (additive prediction)")
    for r in front:
        ax.plot(r["latency_s"], r["sensitivity"], "o", color="0.6", ms=4)
        ax.annotate("/".join(short.get(d, d) for d in r["assignments"].values()), (r["latency_s"], r["sensitivity"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.35")
    marks = {"paper_plan": ("s", "C3"), "kdq_latency_plan": ("D", "C0"), "kdq_latency_plan_bytes_only": ("^", "C2")}
    for name, (m, c) in marks.items():
        if name in result:
            r = result[name]
            ax.plot(r["generation_s"], r["sensitivity"], m, color=c, ms=8,
                    label=f"{name} (measured): {r['generation_s']:.1f} s, {r['bytes'] / 1e6:,.0f} MB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds per {result['seconds_of_audio']:g} s clip ({result['threads']} threads)")
    ax.set_ylabel("sensitivity (logit KL + EnCodec rel. error)")
    ax.set_title("text encoder / decoder / EnCodec dtypes", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def export_once(model: str, bundle: Path, plan, *, reuse: bool) -> None:
    """``export_bundle`` unless ``reuse`` and ``bundle`` already holds a finished export."""
    from musicgen.bundle.build import export_bundle

    if reuse and (bundle / "export_report.json").is_file():
        print(f"{bundle.name}: reused", flush=True)
        return
    t = time.perf_counter()
    export_bundle(model, bundle, plan=plan, progress=False)
    print(f"{bundle.name}: exported in {time.perf_counter() - t:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "examples/musicgen/hub/mini/student_base"))
    ap.add_argument("--tokens", help="valid-split token file (calibration; never test); without it fixed random inputs")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--workdir", default="/tmp/kdq-latency-plan")
    ap.add_argument("--candidates", default="fp32,fp16,int8")
    ap.add_argument("--bundles", choices=("per-part", "uniform"), default="per-part",
                    help="how device costs are measured (see the module docstring)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration-clips", type=int, default=8)
    ap.add_argument("--reuse", action="store_true", help="keep finished bundles already in --workdir")
    ap.add_argument("--frontier-only", action="store_true",
                    help="re-measure the sensitivities, then add the frontier and the figure to the finished --out "
                         "(its costs as measured; no export, no timing)")
    a = ap.parse_args(argv)

    import torch

    from kdq.errors import KdqError
    from kdq.quant import DeviceCosts, MixedPrecisionPlanner, Plan
    from musicgen.models.musicgen import load_musicgen, load_tokenizer
    from musicgen.plan import calibration_from_tokens, calibration_inputs, musicgen_groups, musicgen_score, paper_plan

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    candidates = a.candidates.split(",")
    t0 = time.perf_counter()

    model = load_musicgen(a.model)
    inputs = (calibration_from_tokens(model, a.tokens, load_tokenizer(a.model), n=a.calibration_clips) if a.tokens
              else calibration_inputs(model, batch=2, frames=32))
    score = musicgen_score(model, inputs=inputs)
    groups = musicgen_groups(model, "part")
    planner = MixedPrecisionPlanner(model, groups=groups, candidates=candidates)
    table = planner.profile(score)
    print(f"sensitivity table in {time.perf_counter() - t0:.0f} s", flush=True)
    png = Path(a.out).with_suffix(".png")
    if a.frontier_only:
        result = json.loads(Path(a.out).read_text())
        costs = DeviceCosts(seconds=result["costs_seconds"], device=result["device"], rest_seconds=result["rest_seconds"],
                            unit=f"clip of {result['seconds_of_audio']:g} s")
        result["frontier"] = frontier_rows(planner, table, costs)
        Path(a.out).write_text(json.dumps(result, indent=1, default=str))
        plot_frontier(result, png)
        print(f"frontier: {len(result['frontier'])} plans; figure {png}")
        return result

    def timed(name: str, plan) -> dict:
        export_once(a.model, work / name, plan, reuse=a.reuse)
        r = timed_runs(work / name, seconds=a.seconds, threads=a.threads, repeats=a.repeats, workdir=work)
        print(f"{name}: generation {r['generation_s']:.3f} s, {r['ms_per_cached_step']:.2f} ms/step", flush=True)
        return r

    runs: dict[str, dict] = {"fp32": timed("fp32", "fp32")}
    base = part_costs(runs["fp32"]["stages_s"])
    seconds = {g: {"fp32": base[g]} for g in groups}
    refused = {}
    for d in candidates:
        if d == "fp32":
            continue
        if a.bundles == "uniform":
            try:
                runs[d] = timed(d, Plan({g: d for g in groups}))
                got = part_costs(runs[d]["stages_s"])
                for g in groups:
                    seconds[g][d] = got[g]
                print(f"{d}: " + ", ".join(f"{g} {seconds[g][d]:.4f} s (fp32 {base[g]:.4f} s)" for g in groups), flush=True)
                continue
            except KdqError as e:
                refused[d] = str(e).splitlines()[0]
                print(f"{d}: uniform bundle refused ({refused[d][:200]}); one part at a time", flush=True)
        for g in groups:
            name = f"{g}_{d}"
            try:
                runs[name] = timed(name, Plan({g: d}))
            except KdqError as e:
                refused[name] = str(e).splitlines()[0]
                seconds[g][d] = float("inf")
                continue
            seconds[g][d] = part_costs(runs[name]["stages_s"])[g]
            print(f"{name}: {seconds[g][d]:.4f} s (fp32 {base[g]:.4f} s)", flush=True)
    rest = runs["fp32"]["stages_s"].get("tokenize", 0.0)
    costs = DeviceCosts(seconds=seconds, device={**cpu_info(), "threads": a.threads}, rest_seconds=rest,
                        unit=f"clip of {a.seconds:g} s",
                        meta={"how": f"device_run.py, {a.bundles} bundles, median of repeats",
                              "repeats": a.repeats, "refused": refused})
    costs.save(work / "costs.json")

    paper = paper_plan()
    pm = planner.measure(paper, score)
    plans, solved, infeasible = {"paper_plan": paper}, {}, {}
    budgets = {"kdq_latency_plan": {"max_bytes": int(pm["measured_bytes"]), "max_sensitivity": pm["measured_sensitivity"]},
               "kdq_latency_plan_bytes_only": {"max_bytes": int(pm["measured_bytes"])}}
    for name, budget in budgets.items():
        try:
            plans[name] = planner.solve(table, costs=costs, objective="latency", **budget)
            plans[name].save(work / f"{name}.json")
        except KdqError as e:
            infeasible[name] = {"budget": budget, "error": str(e).splitlines()[0]}
            print(f"{name}: {infeasible[name]['error']}", flush=True)
    timed_plans = {}
    for name, plan in plans.items():
        same = next((k for k, p in plans.items() if k in timed_plans and dict(p.assignments) == dict(plan.assignments)), None)
        timed_plans[name] = timed_plans[same] if same else timed(name, plan)
    fp32 = runs["fp32"]
    result = {
        "model": a.model, "seconds_of_audio": a.seconds, "threads": a.threads, "device": costs.device,
        "bundles": a.bundles, "calibration": a.tokens or "fixed random inputs (calibration_inputs, batch 2, 32 frames)",
        "costs_seconds": seconds, "rest_seconds": rest, "runs": runs, "refused": refused, "infeasible": infeasible,
        "fp32": {"rtf": fp32["rtf"], "generation_s": fp32["generation_s"], "bundle_bytes": fp32["bundle_bytes"]},
        "frontier": frontier_rows(planner, table, costs),
    }
    for name, plan in plans.items():
        m = pm if name == "paper_plan" else planner.measure(plan, score)
        result[name] = {"assignments": dict(plan.assignments), "bytes": int(m["measured_bytes"]),
                        "sensitivity": m["measured_sensitivity"], "budget": budgets.get(name),
                        "predicted_latency_s": plan.predicted.get("latency") if name != "paper_plan" else None,
                        **timed_plans[name]}
        if name != "paper_plan":
            result[name]["speedup_over_paper_plan"] = timed_plans["paper_plan"]["generation_s"] / timed_plans[name]["generation_s"]
    if "kdq_latency_plan" in result:
        result["speedup_over_paper_plan"] = result["kdq_latency_plan"]["speedup_over_paper_plan"]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["command"] = "python benchmarks/bench_latency_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    plot_frontier(result, png)
    for name in plans:
        r = result[name]
        extra = f" {r['speedup_over_paper_plan']:.2f}x the paper plan" if "speedup_over_paper_plan" in r else ""
        print(f"{name:28s} {r['assignments']} bytes {r['bytes']:,} sensitivity {r['sensitivity']:.3g} "
              f"generation {r['generation_s']:.3f} s RTF {r['rtf']:.4f} ({r['ms_per_cached_step']:.3f} ms/step){extra}")
    print(f"fp32: RTF {fp32['rtf']:.4f}; wall {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
