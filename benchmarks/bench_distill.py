"""One distillation step (teacher forward, student forward + backward, StageMixedKL, AdamW) in fp32
against bf16 autocast, at the mini preset's sizes, on this CPU.

Decides ``TrainConfig.bf16="auto"``'s expectation here; ``auto`` itself measures at run time.
Alternating implementations in one process, medians over repeats, 2 threads.

    flock /tmp/kdq-heavy.lock .venv/bin/python benchmarks/bench_distill.py [--repeats 7]

Rows are appended to ``benchmarks/results/distill.csv`` (op, impl, shape, metric, median, p20, p80,
machine, commit) with the load average in ``machine``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from kdq.losses import StageMixedKL  # noqa: E402
from musicgen.data.tokens import delay_pattern  # noqa: E402
from musicgen.train.objectives import decoder_logits, encode_text  # noqa: E402
from musicgen.models.tiny import build_tiny_musicgen, build_word_tokenizer  # noqa: E402

CSV_PATH = ROOT / "benchmarks" / "results" / "distill.csv"
FIELDS = ("op", "impl", "shape", "metric", "median", "p20", "p80", "machine", "commit")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = dict(codebook_size=args.vocab, text_hidden=128)
    teacher = build_tiny_musicgen(1, decoder_hidden=256, decoder_layers=4, decoder_heads=8, **sizes)
    student = build_tiny_musicgen(2, decoder_hidden=128, decoder_layers=2, decoder_heads=4, **sizes).train()
    params = [p for n, p in student.named_parameters() if n.startswith("decoder.")]
    opt = torch.optim.AdamW(params, lr=1e-4)
    kd = StageMixedKL(total_steps=100)
    tok = build_word_tokenizer()
    enc = tok(["a slow chorale on organ"] * args.batch, return_tensors="pt", padding=True)
    codes = torch.randint(0, args.vocab, (args.batch, 4, args.frames))
    inputs, labels, mask = delay_pattern(codes, bos=args.vocab, pad=args.vocab)
    no = torch.zeros(args.batch, dtype=torch.bool)

    def step(bf16: bool) -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            s = decoder_logits(student, inputs, *encode_text(student, enc["input_ids"], enc["attention_mask"], drop=no))
            with torch.no_grad():
                t = decoder_logits(teacher, inputs, *encode_text(teacher, enc["input_ids"], enc["attention_mask"], drop=no))
        kd(s, t, step=10, mask=mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"fp32": [], "bf16_autocast": []}
    step(False), step(True)  # warm-up
    for _ in range(args.repeats):
        for impl in times:
            t0 = time.perf_counter()
            step(impl != "fp32")
            times[impl].append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    machine = f"{platform.machine()} {os.cpu_count()}cpu threads={args.threads} load={load:.2f}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    shape = f"B{args.batch}xK4xT{args.frames}xV{args.vocab} teacher256x4 student128x2"
    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV_PATH.exists()
    with CSV_PATH.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for impl, ts in times.items():
            a = np.array(ts)
            row = ("distill_step", impl, shape, "seconds", *(f"{np.percentile(a, q):.4f}" for q in (50, 20, 80)), machine, commit)
            w.writerow(row)
            print(" | ".join(map(str, row)))
    print(f"bf16 / fp32 median: {np.median(times['bf16_autocast']) / np.median(times['fp32']):.2f}")


if __name__ == "__main__":
    main()
