"""Generation speed: the ONNX Runtime loop over kdq bundles against transformers' ``generate``.

One run measures, on the same model and machine and at the same thread count:

- ``hf_fp32``: ``MusicgenForConditionalGeneration.generate`` in fp32; ``hf_bf16dec``: the same with
  the text encoder and decoder in bf16 (EnCodec fp32);
- ``ort_fp32``, ``ort_paper`` (T5 int8, decoder fp16, EnCodec fp32), ``ort_int8dec`` (T5 and decoder
  int8), ``ort_int4dec`` (T5 int8, decoder 4-bit ``MatMulNBits``): ``musicgen.bundle.runtime.MusicgenOnnx``
  over bundles written by ``musicgen.bundle.build``;

all greedy with guidance 3, batch 1, N new tokens. Each measurement runs in its own process (so that
its peak RSS is its own), implementations alternate within each repeat, and the reported figure is
the median. Also measured: this machine's read bandwidth at the same thread count (torch sum over
1 GiB) and, per bundle, the decoder weight bytes streamed per cached step, which give the floor per
step (bytes / bandwidth) that each run is compared with.

Heavy at ``--size small`` (MusicGen-small architecture, random weights; export peaks at several GB):

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python \\
        benchmarks/bench_generation.py --size small --tokens 128 --repeats 3 > bench_small.log 2>&1 &

Rows are appended to ``benchmarks/results/generation.csv`` (op, impl, shape, metric, median, p20,
p80, machine, commit, load).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "generation.csv"
FIELDS = ["op", "impl", "shape", "metric", "median", "p20", "p80", "machine", "commit", "load"]
ORT_IMPLS = {"ort_fp32": "fp32", "ort_paper": "paper", "ort_int8dec": "int8dec", "ort_int4dec": "int4dec"}
HF_IMPLS = ("hf_fp32", "hf_bf16dec")


def musicgen_config(size: str):
    """``small``: MusicGen-small's architecture (T5-base encoder; decoder 1024 x 24, 16 heads, ffn 4096,
    4 codebooks of 2048; EnCodec 32 kHz, 64 filters, 2 LSTM layers). ``mid``: T5 256 x 4, decoder
    512 x 8 (ffn 2048), EnCodec 32 filters. ``tiny``: the test model."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    if size == "tiny":
        from musicgen.models.tiny import tiny_musicgen_config

        return tiny_musicgen_config()
    from musicgen.models.tiny import TINY_WORDS

    small = size == "small"
    t5 = T5Config(
        vocab_size=32128 if small else len(TINY_WORDS) + 3, d_model=768 if small else 256, d_kv=64,
        d_ff=3072 if small else 1024, num_layers=12 if small else 4, num_heads=12 if small else 4,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
    )
    codec = EncodecConfig(
        sampling_rate=32000, num_filters=64 if small else 32, hidden_size=128, upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048, codebook_dim=128, num_lstm_layers=2 if small else 1, target_bandwidths=[2.2],
        use_causal_conv=False, pad_mode="reflect", compress=2, normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, hidden_size=1024 if small else 512, num_hidden_layers=24 if small else 8,
        num_attention_heads=16 if small else 8, ffn_dim=4096 if small else 2048, num_codebooks=4,
        max_position_embeddings=2048, activation_function="gelu", pad_token_id=2048, bos_token_id=2048,
        dropout=0.0, tie_word_embeddings=False,
    )
    return MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())


def build_model_dir(size: str, out: Path) -> Path:
    """Save a random (informative) model of ``size`` with the tiny word tokenizer."""
    import torch
    from transformers import MusicgenForConditionalGeneration

    from musicgen.models.tiny import build_word_tokenizer, make_informative

    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(musicgen_config(size)).eval()
    make_informative(model, seed=0)
    gc = model.generation_config
    gc.decoder_start_token_id = gc.pad_token_id = 2048
    gc.guidance_scale, gc.max_length = 3.0, 1500
    model.save_pretrained(out)
    build_word_tokenizer().save_pretrained(out)
    return out


def plans():
    from kdq.quant import Plan
    from musicgen.plan import paper_plan

    return {
        "fp32": "fp32",
        "paper": paper_plan(),
        "int8dec": Plan({"text_encoder": "int8", "decoder": "int8", "audio_encoder": "fp32"}),
        # 4-bit weight-only MatMulNBits in the decoder (its embedding tables int8), T5 int8
        "int4dec": Plan({"text_encoder": "int8", "decoder": "int4", "audio_encoder": "fp32"}),
    }


def streamed_bytes_per_step(decoder_file: Path) -> int:
    """Weight bytes read by one cached decoder step: every weighted node of the cached branch (the merged
    decoder's ``If``; the whole graph of the in-place ``decoder_step``) except embedding gathers (which
    read a few rows)."""
    import onnx

    from kdq.export.precision import initializers, tensor_bytes, weight_input

    m = onnx.load(str(decoder_file))
    inits = initializers(m.graph)
    if_node = next((n for n in m.graph.node if n.op_type == "If"), None)
    cached = next(a.g for a in if_node.attribute if a.name == "then_branch") if if_node is not None else m.graph
    total = 0
    for node in cached.node:
        w = weight_input(node, inits)
        if w is not None and not node.op_type.startswith("Gather"):
            total += tensor_bytes(w)
    return total


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second of a torch sum over ``gib`` GiB of float32 with ``threads`` threads (median)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


# -- one measurement per process ---------------------------------------------------------------------
def worker(args) -> None:
    prompt = "lively folk dance with violin and flute"
    t0 = time.perf_counter()
    if args.impl in HF_IMPLS:
        import torch
        from transformers import AutoTokenizer, MusicgenForConditionalGeneration

        torch.set_num_threads(args.threads)
        model = MusicgenForConditionalGeneration.from_pretrained(args.model_dir).eval()
        if args.impl == "hf_bf16dec":
            model.text_encoder.to(torch.bfloat16)
            model.decoder.to(torch.bfloat16)
            if getattr(model, "enc_to_dec_proj", None) is not None:
                model.enc_to_dec_proj.to(torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        inputs = tok([prompt], return_tensors="pt")
        load_s = time.perf_counter() - t0
        t = time.perf_counter()
        with torch.no_grad():
            audio = model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=args.tokens)
        gen_s = time.perf_counter() - t
        samples = audio.shape[-1]
        steps_s = None
    else:
        from musicgen.bundle.runtime import MusicgenOnnx, Timings

        rt = MusicgenOnnx(args.bundle, threads=args.threads)
        load_s = time.perf_counter() - t0
        timings = Timings()
        t = time.perf_counter()
        audio = rt.generate([prompt], max_new_tokens=args.tokens, guidance_scale=3.0, timings=timings)
        gen_s = time.perf_counter() - t
        samples = audio.shape[-1]
        steps_s = timings.stages["decoder_cached_steps"] / (timings.decoder_steps - 1)
    from musicgen.bundle.device import peak_rss_bytes

    rss = peak_rss_bytes()
    print(json.dumps({"load_s": load_s, "gen_s": gen_s, "audio_s": samples / 32000, "peak_rss": rss, "step_s": steps_s}))


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _row(rows, impl, shape, metric, values, threads):
    vals = sorted(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    q = statistics.quantiles(vals, n=5, method="inclusive") if len(vals) >= 2 else [vals[0]] * 4
    row = {"op": "musicgen_generate", "impl": impl, "shape": shape, "metric": metric, "median": statistics.median(vals),
           "p20": q[0], "p80": q[3], "machine": f"{platform.machine()}-{os.cpu_count()}cpu-{threads}thr",
           "commit": _commit(), "load": _load()}
    rows.append(row)
    print(f"{impl:<12} {shape:<22} {metric:<26} {row['median']:.6g}  (p20 {row['p20']:.4g}, p80 {row['p80']:.4g})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="mid", choices=["tiny", "mid", "small"])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens (50 per second of audio, 3 fewer frames)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="hf_fp32,hf_bf16dec,ort_fp32,ort_paper,ort_int8dec,ort_int4dec")
    ap.add_argument("--workdir", default=None, help="keep model and bundles here (default: a temporary folder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    impls = args.impls.split(",")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kdq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = f"{args.size} N={args.tokens} B=1 cfg=3"
    rows: list[dict] = []
    print(f"load before: {_load()}  workdir {work}", flush=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        build_model_dir(args.size, model_dir)
        print(f"model built in {time.perf_counter() - t:.1f}s", flush=True)
    from musicgen.bundle.build import export_bundle

    bundles: dict[str, Path] = {}
    all_plans = plans()
    for impl in impls:
        if impl in ORT_IMPLS:
            name = ORT_IMPLS[impl]
            bundle = work / f"bundle_{name}"
            if not (bundle / "export_report.json").is_file():
                t = time.perf_counter()
                try:
                    export_bundle(str(model_dir), bundle, plan=all_plans[name], progress=False)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other bundles
                    print(f"export {name} failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                    continue
                print(f"exported {name} in {time.perf_counter() - t:.1f}s", flush=True)
            bundles[impl] = bundle
            report = json.loads((bundle / "export_report.json").read_text())
            _row(rows, impl, shape, "bundle_bytes", report["bundle_bytes"], args.threads)

    bw = read_bandwidth(args.threads)
    _row(rows, "torch_sum", f"1GiB fp32 {args.threads}thr", "read_bandwidth_GBps", bw / 1e9, args.threads)
    floors = {}
    for impl, bundle in bundles.items():
        dec = next((bundle / "onnx").glob("decoder_model_merged*.onnx"))
        per_step = streamed_bytes_per_step(dec)
        floors[impl] = per_step / bw
        _row(rows, impl, shape, "weight_bytes_per_step", per_step, args.threads)
        _row(rows, impl, shape, "floor_ms_per_step", 1000 * floors[impl], args.threads)

    results: dict[str, list[dict]] = {i: [] for i in impls}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}", "OMP_NUM_THREADS": str(args.threads)}
    for r in range(args.repeats):
        for impl in impls:  # alternate implementations within each repeat
            cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--tokens", str(args.tokens),
                   "--threads", str(args.threads), "--model-dir", str(model_dir)]
            if impl in bundles:
                cmd += ["--bundle", str(bundles[impl])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{impl} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[impl].append(res)
            print(f"  repeat {r} {impl}: {res['gen_s']:.2f}s  rss {res['peak_rss'] / 1e9:.2f} GB  load {_load()}", flush=True)

    for impl, runs in results.items():
        if not runs:
            continue
        _row(rows, impl, shape, "seconds", [x["gen_s"] for x in runs], args.threads)
        _row(rows, impl, shape, "rtf", [x["gen_s"] / x["audio_s"] for x in runs], args.threads)
        _row(rows, impl, shape, "peak_rss_bytes", [x["peak_rss"] for x in runs], args.threads)
        _row(rows, impl, shape, "load_s", [x["load_s"] for x in runs], args.threads)
        if impl in floors:
            steps = [x["step_s"] * 1000 for x in runs]
            _row(rows, impl, shape, "ms_per_cached_step", steps, args.threads)
            _row(rows, impl, shape, "step_over_floor", [s / (1000 * floors[impl]) for s in steps], args.threads)
    for impl in ORT_IMPLS:
        for base in HF_IMPLS:
            if results.get(impl) and results.get(base):
                a = statistics.median(x["gen_s"] for x in results[base])
                b = statistics.median(x["gen_s"] for x in results[impl])
                _row(rows, impl, shape, f"speedup_vs_{base}", a / b, args.threads)

    append_rows(RESULTS, FIELDS, rows)
    print(f"load after: {_load()}; {len(rows)} rows appended to {RESULTS}", flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
