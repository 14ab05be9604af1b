"""A plan for the device: measure what each part costs in ONNX Runtime on this machine, then ask the
planner for the fastest plan at no more bytes and no more measured sensitivity than the paper's.

    python benchmarks/bench_latency_plan.py --model examples/musicgen/hub/mini/student_base \\
        --tokens runs/mini/tokens/valid.safetensors --out benchmarks/results/latency_plan_mini.json

1. Sensitivity: ``MixedPrecisionPlanner`` at part granularity (text encoder, decoder, EnCodec) with
   the example's score (decoder-logit KL to fp32 + EnCodec's relative audio error) on valid clips.
2. Device costs (``kdq.quant.DeviceCosts``): for each part and candidate dtype, a bundle with that
   part in that dtype and the others in fp32 is exported and run by ``device_run.py`` in a fresh
   process (``--repeats`` times, the median kept); the part's cost in that dtype is its stage time
   there (text encoder; decoder first step + cached steps; EnCodec decode), casts at its borders
   included; the rest (tokenizing) is ``rest_seconds``. A (part, dtype) the export refuses costs
   ``inf`` (never chosen). Unit: one clip of ``--seconds`` seconds. Nothing is assumed about which
   dtype is fast: it is measured.
3. Plans: the paper's (T5 int8, decoder fp16, EnCodec fp32), and kdq's latency plan
   ``planner.solve(table, costs=..., max_bytes=paper bytes, max_sensitivity=paper sensitivity,
   objective="latency")``; each exported and timed the same way, side by side in one run.
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "examples/musicgen/hub/mini/student_base"))
    ap.add_argument("--tokens", required=True, help="valid-split token file (calibration; never test)")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--workdir", default="/tmp/kdq-latency-plan")
    ap.add_argument("--candidates", default="fp32,fp16,int8")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration-clips", type=int, default=8)
    a = ap.parse_args(argv)

    import torch

    from kdq.quant import DeviceCosts, MixedPrecisionPlanner, Plan
    from musicgen.bundle.build import export_bundle
    from musicgen.models.musicgen import load_musicgen, load_tokenizer
    from musicgen.plan import calibration_from_tokens, musicgen_groups, musicgen_score, paper_plan

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    candidates = a.candidates.split(",")
    t0 = time.perf_counter()

    model = load_musicgen(a.model)
    score = musicgen_score(model, inputs=calibration_from_tokens(model, a.tokens, load_tokenizer(a.model), n=a.calibration_clips))
    groups = musicgen_groups(model, "part")
    planner = MixedPrecisionPlanner(model, groups=groups, candidates=candidates)
    table = planner.profile(score)

    from kdq.errors import KdqError

    runs: dict[str, dict] = {}
    b = work / "fp32"
    export_bundle(a.model, b, progress=False)
    runs["fp32"] = timed_runs(b, seconds=a.seconds, threads=a.threads, repeats=a.repeats, workdir=work)
    base = part_costs(runs["fp32"]["stages_s"])
    seconds = {g: {"fp32": base[g]} for g in groups}
    refused = {}
    for g in groups:
        for d in candidates:
            if d == "fp32":
                continue
            name = f"{g}_{d}"
            try:
                export_bundle(a.model, work / name, plan=Plan({g: d}), progress=False)
            except KdqError as e:
                refused[name] = str(e).splitlines()[0]
                seconds[g][d] = float("inf")
                continue
            runs[name] = timed_runs(work / name, seconds=a.seconds, threads=a.threads, repeats=a.repeats, workdir=work)
            seconds[g][d] = part_costs(runs[name]["stages_s"])[g]
            print(f"{name}: {seconds[g][d]:.4f} s (fp32 {base[g]:.4f} s)", flush=True)
    rest = runs["fp32"]["stages_s"].get("tokenize", 0.0)
    costs = DeviceCosts(seconds=seconds, device={**cpu_info(), "threads": a.threads}, rest_seconds=rest,
                        unit=f"clip of {a.seconds:g} s",
                        meta={"how": "device_run.py, one part in the dtype and the rest fp32, median of repeats",
                              "repeats": a.repeats, "refused": refused})
    costs.save(work / "costs.json")

    paper = paper_plan()
    pm = planner.measure(paper, score)
    fast = planner.solve(table, costs=costs, max_bytes=int(pm["measured_bytes"]),
                         max_sensitivity=pm["measured_sensitivity"], objective="latency")
    fm = planner.measure(fast, score)
    fast.save(work / "latency_plan.json")
    plans = {"paper_plan": paper, "kdq_latency_plan": fast}
    timed = {}
    for name, plan in plans.items():
        b = work / name
        export_bundle(a.model, b, plan=plan, progress=False)
        timed[name] = timed_runs(b, seconds=a.seconds, threads=a.threads, repeats=a.repeats, workdir=work)
    fp32 = runs["fp32"]
    result = {
        "model": a.model, "seconds_of_audio": a.seconds, "threads": a.threads, "device": costs.device,
        "costs_seconds": seconds, "rest_seconds": rest,
        "runs": runs, "refused": refused,
        "paper_plan": {"assignments": dict(paper.assignments), "bytes": int(pm["measured_bytes"]),
                       "sensitivity": pm["measured_sensitivity"], **timed["paper_plan"]},
        "kdq_latency_plan": {"assignments": dict(fast.assignments), "bytes": int(fm["measured_bytes"]),
                             "sensitivity": fm["measured_sensitivity"],
                             "predicted_latency_s": fast.predicted.get("latency"),
                             **timed["kdq_latency_plan"]},
        "speedup_over_paper_plan": timed["paper_plan"]["generation_s"] / timed["kdq_latency_plan"]["generation_s"],
        "fp32": {"rtf": fp32["rtf"], "generation_s": fp32["generation_s"], "bundle_bytes": fp32["bundle_bytes"]},
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/bench_latency_plan.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    for name in ("paper_plan", "kdq_latency_plan"):
        r = result[name]
        print(f"{name:17s} {r['assignments']} bytes {r['bytes']:,} sensitivity {r['sensitivity']:.3g} "
              f"generation {r['generation_s']:.3f} s RTF {r['rtf']:.4f} ({r['ms_per_cached_step']:.3f} ms/step)")
    print(f"speed-up over the paper plan: {result['speedup_over_paper_plan']:.2f}x (fp32 RTF {fp32['rtf']:.4f})")
    return result


if __name__ == "__main__":
    main()
