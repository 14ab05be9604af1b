"""Benchmark StageMixedKL forward+backward against the naive composition and cross-entropy.

What is timed (fp32 logits ``[B, K, T, V]``, teacher without gradient, MusicGen delay-pattern mask,
mid-run step so that every weight is non-zero):

- ``stage_mixed_kl``: ``kdq.StageMixedKL`` with its defaults (``compile="auto"``: the fused kernel
  is compiled with ``torch.compile`` at this size; the one-off compilation is reported apart).
- ``stage_mixed_kl_eager``: the same with ``compile=False`` (the fallback path).
- ``naive``: :func:`kdq.losses.reference.naive_composition`, each term on its own (the reference
  the tests compare against).
- ``cross_entropy``: ``torch.nn.functional.cross_entropy`` on the same student logits.

Timing: one process, implementations alternating every repeat, medians (p20/p80 too). Peak memory:
each implementation in a FRESH subprocess (glibc's mmap threshold fixed at 128 KiB so that freed
buffers leave the process); after the inputs are allocated and one warm-up pass is done, the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and the extra peak RSS of one
forward+backward is ``VmHWM - VmRSS(before)``. The student's gradient (the size of the logits)
is part of every implementation's extra memory.

Targets (issue 2): time <= 0.4x naive and <= 2.5x cross-entropy; extra peak memory <= 0.3x naive.

Run it under the shared lock, e.g.::

    flock /tmp/kdq-heavy.lock python benchmarks/bench_losses.py
    python benchmarks/bench_losses.py --table        # render the rows already in the CSV

Rows are appended to ``benchmarks/results/losses.csv``
(op, impl, shape, metric, median, p20, p80, machine, commit).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kdq.losses import StageMixedKL, reference  # noqa: E402

IMPLS = ("stage_mixed_kl", "stage_mixed_kl_eager", "naive", "cross_entropy")
CSV_PATH = ROOT / "benchmarks" / "results" / "losses.csv"
FIELDS = ("op", "impl", "shape", "metric", "median", "p20", "p80", "machine", "commit")
TOTAL_STEPS = 1000
STEP = 500  # mid-run: every stage weight is non-zero


def make_inputs(shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, k, t, v = shape
    student = (torch.randn(shape, generator=g) * 3).requires_grad_()
    teacher = torch.randn(shape, generator=g) * 3
    labels = torch.randint(0, v, shape[:-1], generator=g)
    frames = torch.arange(t)[None, :]
    mask = (frames >= torch.arange(k)[:, None]).expand(b, k, t).contiguous()  # delay pattern
    return student, teacher, labels, mask


def make_step(impl: str, student, teacher, labels, mask):
    """A closure running one forward+backward of ``impl``."""
    if impl in ("stage_mixed_kl", "stage_mixed_kl_eager"):
        kd = StageMixedKL(TOTAL_STEPS, compile="auto" if impl == "stage_mixed_kl" else False)

        def run():
            kd(student, teacher, step=STEP, mask=mask).backward()
    elif impl == "naive":
        kd = StageMixedKL(TOTAL_STEPS)
        weights, temp = kd.weights_at(STEP), kd.temperature_at(STEP)

        def run():
            reference.naive_composition(student, teacher, weights, temp, kd.alpha, mask).backward()
    elif impl == "cross_entropy":
        flat, lab = student.reshape(-1, student.shape[-1]), labels.reshape(-1)

        def run():
            F.cross_entropy(flat, lab).backward()
    else:
        raise SystemExit(f"unknown impl {impl!r}; one of {IMPLS}")
    return run


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(impl: str, shape: tuple[int, ...], threads: int) -> None:
    """Runs in a fresh process: print the extra peak RSS (bytes) of one forward+backward."""
    torch.set_num_threads(threads)
    student, teacher, labels, mask = make_inputs(shape)
    run = make_step(impl, student, teacher, labels, mask)
    run()  # warm-up: kernels loaded, compiled kernels built, allocator settled
    student.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    run()
    peak = _status("VmHWM")
    print(json.dumps({"impl": impl, "extra_peak_bytes": peak - before, "rss_before": before}))


def measure_memory(impl: str, shape, threads: int) -> int:
    cmd = [sys.executable, __file__, "--memory-child", impl, "--shape", ",".join(map(str, shape)),
           "--threads", str(threads)]
    # A fixed mmap threshold makes glibc return every large buffer to the OS on free (its default
    # dynamic threshold would keep the warm-up's buffers in the heap and hide the peak).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return statistics.median(xs), q[1], q[7]


def machine(threads: int) -> str:
    load = os.getloadavg()[0]
    return f"{platform.machine()} {os.cpu_count()}cpu torch{torch.__version__} threads={threads} load={load:.2f}"


def commit() -> str:
    if os.environ.get("KDQ_BENCH_COMMIT"):  # set when running from an exported snapshot
        return os.environ["KDQ_BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kdq", "benchmarks/bench_losses.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render_table(path: Path = CSV_PATH) -> str:
    """A markdown table of the newest run in the CSV (rows sharing the last commit+machine)."""
    rows = [r for r in csv.DictReader(path.open()) if r["op"] == "stage_mixed_kl_fwd_bwd"]
    if not rows:
        return "(no rows)"
    last = (rows[-1]["commit"], rows[-1]["machine"])
    rows = [r for r in rows if (r["commit"], r["machine"]) == last]
    out = [f"shape {rows[0]['shape']}, {last[1]}, commit {last[0]}", "",
           "| impl | metric | median | p20 | p80 |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {r['impl']} | {r['metric']} | {float(r['median']):.4g} | {float(r['p20']):.4g} | "
            f"{float(r['p80']):.4g} |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,4,250,2048", help="B,K,T,V of the logits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    ap.add_argument("--memory-only", action="store_true", help="only the fresh-process peak memory")
    ap.add_argument("--table", action="store_true", help="render the newest rows of the CSV and exit")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.table:
        print(render_table())
        return
    if args.memory_child:
        memory_child(args.memory_child, shape, args.threads)
        return

    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    if args.memory_only:
        for impl in impls:
            print(f"{impl:>22} extra peak {measure_memory(impl, shape, args.threads) / 2**20:8.1f} MB")
        return
    student, teacher, labels, mask = make_inputs(shape)
    runs = {i: make_step(i, student, teacher, labels, mask) for i in impls}
    extra: dict[str, float] = {}
    for impl, run in runs.items():  # warm-up (and, for the compiled path, compilation)
        t0 = time.perf_counter()
        run()
        student.grad = None
        if impl == "stage_mixed_kl":
            extra["compile_s"] = time.perf_counter() - t0
    times: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(args.repeats):
        for impl, run in runs.items():  # alternate implementations every repeat
            t0 = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - t0)
            student.grad = None
    mach, sha, shp = machine(args.threads), commit(), "x".join(map(str, shape))
    rows = []
    med = {}
    for impl in impls:
        m, p20, p80 = quantiles([x * 1e3 for x in times[impl]])
        med[impl] = m
        rows.append(dict(op="stage_mixed_kl_fwd_bwd", impl=impl, shape=shp, metric="time_ms",
                         median=f"{m:.3f}", p20=f"{p20:.3f}", p80=f"{p80:.3f}", machine=mach, commit=sha))
    mem = {}
    for impl in impls:
        mb = measure_memory(impl, shape, args.threads) / 2**20
        mem[impl] = mb
        rows.append(dict(op="stage_mixed_kl_fwd_bwd", impl=impl, shape=shp, metric="extra_peak_mb",
                         median=f"{mb:.1f}", p20=f"{mb:.1f}", p80=f"{mb:.1f}", machine=mach, commit=sha))
    if "compile_s" in extra:
        c = extra["compile_s"]
        rows.append(dict(op="stage_mixed_kl_fwd_bwd", impl="stage_mixed_kl", shape=shp, metric="first_call_s",
                         median=f"{c:.2f}", p20=f"{c:.2f}", p80=f"{c:.2f}", machine=mach, commit=sha))
    for r in rows:
        print(f"{r['impl']:>22} {r['metric']:>14} median {r['median']:>9}  p20 {r['p20']:>9}  p80 {r['p80']:>9}")
    for fast in ("stage_mixed_kl", "stage_mixed_kl_eager"):
        if fast in med and "naive" in med and "cross_entropy" in med:
            print(f"{fast}: time {med[fast] / med['naive']:.3f}x naive (target <= 0.4), "
                  f"{med[fast] / med['cross_entropy']:.2f}x cross-entropy (target <= 2.5), "
                  f"extra peak memory {mem[fast] / mem['naive']:.3f}x naive (target <= 0.3)")
    print(f"machine: {mach}; uptime: {os.popen('uptime').read().strip()}")
    if not args.no_csv:
        from bench_generation import append_rows

        append_rows(CSV_PATH, FIELDS, rows)
        print(f"appended {len(rows)} rows to {CSV_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
