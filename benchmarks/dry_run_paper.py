"""The paper preset at the real sizes, on this CPU: a dry run with random weights.

A MusicGen-medium-sized teacher (1.5 B decoder parameters: 1536 wide, 48 layers) and a
MusicGen-small-sized student (T5-base, decoder 1024 x 24, EnCodec 32 kHz), sharing text encoder and
codec, go through ``reproduce.py --preset paper`` with the documented small recipe: two distillation
steps at micro-batch 1, the planner at part granularity, three ONNX bundles with their device runs,
and the seven-variant evaluation on a few clips. Random weights make every quality figure
meaningless; what is measured is that each stage works at these sizes, its time and the peak memory.

    python benchmarks/dry_run_paper.py --data runs/world/render/data --work /tmp/kdq-dry-run \\
        --out benchmarks/results/dry_run_paper.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_pair(work: Path) -> tuple[Path, Path, dict]:
    """Student (MusicGen-small architecture) and teacher (medium decoder, the student's text encoder and
    codec), random weights, saved as ``from_pretrained`` folders with the tiny word tokenizer."""
    import torch
    from transformers import MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    from bench_generation import build_model_dir

    student = build_model_dir("small", work / "student")
    s = MusicgenForConditionalGeneration.from_pretrained(student, use_safetensors=True)
    cfg = s.config.to_dict()
    dec = MusicgenDecoderConfig(**{**s.config.decoder.to_dict(), "hidden_size": 1536, "num_hidden_layers": 48,
                                   "num_attention_heads": 24, "ffn_dim": 6144})
    torch.manual_seed(1)
    teacher = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=cfg["text_encoder"], audio_encoder=cfg["audio_encoder"],
                                                              decoder=dec.to_dict())).eval()
    teacher.text_encoder.load_state_dict(s.text_encoder.state_dict())
    teacher.audio_encoder.load_state_dict(s.audio_encoder.state_dict())
    teacher.generation_config = s.generation_config
    teacher.save_pretrained(work / "teacher")
    shutil.copy(student / "tokenizer.json", work / "teacher" / "tokenizer.json")
    shutil.copy(student / "tokenizer_config.json", work / "teacher" / "tokenizer_config.json")
    sizes = {"teacher_decoder_params": sum(p.numel() for p in teacher.decoder.parameters()),
             "student_decoder_params": sum(p.numel() for p in s.decoder.parameters()),
             "student_params": sum(p.numel() for p in s.parameters())}
    return work / "teacher", student, sizes


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an audiofolder dataset (train/valid/test)")
    ap.add_argument("--work", default="/tmp/kdq-dry-run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "teacher" / "config.json").is_file():
        teacher, student, sizes = build_pair(work)
    else:
        teacher, student = work / "teacher", work / "student"
        sizes = json.loads((work / "sizes.json").read_text())
    (work / "sizes.json").write_text(json.dumps(sizes))
    build_s = time.perf_counter() - t0
    cmd = [sys.executable, str(ROOT / "examples/musicgen/reproduce.py"), "--preset", "paper",
           "--teacher", str(teacher), "--student", str(student), "--dataset", a.data, "--out", str(work / "run"),
           "--clips", "4", "--clip-seconds", "1", "--steps", "2", "--micro-batch", "1", "--grad-accum", "1",
           "--warmup", "0.5", "--no-progress",
           "--set", "plan.granularity=part", "plan.calibration_clips=1", "eval.prompts=2", "eval.seconds=0.5",
           "eval.clap_mini_steps=0", "export.device_seconds=0.5"]
    t1 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    run_s = time.perf_counter() - t1
    peak_kb = next((int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line), None)
    result = {"sizes": sizes, "build_s": round(build_s, 1), "run_s": round(run_s, 1), "returncode": proc.returncode,
              "peak_rss_gb": round(peak_kb / 2**20, 2) if peak_kb else None, "command": " ".join(cmd[1:]),
              "stderr_tail": proc.stderr[-3000:] if proc.returncode else ""}
    res_path = work / "run" / "results.json"
    if proc.returncode == 0 and res_path.is_file():
        r = json.loads(res_path.read_text())
        result["stages_s"] = {k: v.get("wall_s") for k, v in r["stages"].items()}
        result["bytes"] = {k: v.get("bytes") for k, v in r["variants"].items()}
        result["device_runs"] = {k: {m: v.get(m) for m in ("rtf", "ms_per_cached_step", "peak_rss_bytes", "bundle_bytes")}
                                 for k, v in (r["ort"].get("device_runs") or {}).items()}
        result["parity_max_abs"] = r["ort"].get("parity_max_abs")
        result["planner"] = {k: r["planner"][k] for k in ("paper_plan", "kdq_plan") if k in r["planner"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}, indent=1, default=str))
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
