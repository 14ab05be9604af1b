"""End to end on the device loop: ``device_run.py`` over bundles, one-shot and streamed, with the floor.

Each run is ``examples/musicgen/device_run.py`` in a fresh process (greedy, guidance 3, ``--threads``,
``--seconds`` of audio; streamed runs add ``--stream --window W --overlap O``); configurations
alternate within each repeat and the figures are medians. Also measured: this machine's read
bandwidth at the same thread count (``bench_generation.read_bandwidth``) and each decoder's weight
bytes per cached step (``bench_generation.streamed_bytes_per_step``), which give the floor per step.
Results go to a JSON file (every run's JSON from ``device_run.py`` plus the medians).

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python benchmarks/bench_e2e.py \\
        --workdir /tmp/kdq-bench14/small --bundles int4dec=bundle_int4dec --seconds 10 --repeats 3 \\
        --configs oneshot,stream:50:10,stream:20:5 --out benchmarks/results/e2e_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "lively folk dance with violin and flute"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--bundles", default="int4dec=bundle_int4dec", help="name=FOLDER,... (folders under --workdir)")
    ap.add_argument("--configs", default="oneshot,stream:50:10", help="oneshot and/or stream:WINDOW:OVERLAP")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra device_run.py arguments, space-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from bench_generation import _commit, read_bandwidth, streamed_bytes_per_step

    bundles = dict(s.split("=", 1) for s in args.bundles.split(","))
    configs = args.configs.split(",")
    result: dict = {"command": " ".join(["python", "benchmarks/bench_e2e.py", *sys.argv[1:]]), "commit": _commit(),
                    "machine": f"{platform.machine()}-{os.cpu_count()}cpu", "onnxruntime": ort.__version__,
                    "threads": args.threads, "seconds": args.seconds, "guidance_scale": 3.0, "greedy": True,
                    "load_before": _load(), "runs": {}, "summary": {}}
    bw = read_bandwidth(args.threads)
    result["read_bandwidth_GBps"] = round(bw / 1e9, 2)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s, load {_load()}", flush=True)
    floors = {}
    for name, folder in bundles.items():
        cfg = json.loads((Path(args.workdir) / folder / "config.json").read_text())
        from musicgen.bundle.parts import INPLACE_KEY, part_file

        if INPLACE_KEY in cfg:  # the in-place decoder (device_run.py runs it whenever the bundle has it)
            per_step = streamed_bytes_per_step(Path(args.workdir) / folder / cfg[INPLACE_KEY]["decoder_step"]["file"])
        else:
            dt = cfg["transformers.js_config"]["dtype"]["decoder_model_merged"]
            per_step = streamed_bytes_per_step(Path(args.workdir) / folder / part_file("decoder_model_merged", dt))
        floors[name] = {"weight_bytes_per_step": per_step, "floor_ms_per_step": round(1000 * per_step / bw, 3)}
    result["floors"] = floors
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}", "OMP_NUM_THREADS": str(args.threads)}
    script = ROOT / "examples" / "musicgen" / "device_run.py"
    with tempfile.TemporaryDirectory(prefix="kdq-e2e-") as tmp:
        for r in range(args.repeats):
            for name, folder in bundles.items():
                for c in configs:
                    cmd = [sys.executable, str(script), "--bundle", str(Path(args.workdir) / folder), "--prompt", PROMPT,
                           "--seconds", str(args.seconds), "--out", f"{tmp}/out.wav", "--threads", str(args.threads),
                           "--greedy", "--guidance", "3", *args.extra.split()]
                    if c.startswith("stream"):
                        _, w, o = c.split(":")
                        cmd += ["--stream", "--window", w, "--overlap", o]
                    load = _load()
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        print(f"{name} {c} failed:\n{proc.stderr[-3000:]}", flush=True)
                        continue
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    res["load"] = load
                    result["runs"].setdefault(f"{name} {c}", []).append(res)
                    print(f"  repeat {r} {name} {c}: {res['generation_s']:.2f} s  rtf {res['rtf']:.3f}  "
                          f"{res['ms_per_cached_step']:.2f} ms/step  ttfa {res['time_to_first_audio_s']:.3f} s  "
                          f"stages {res['stages_s']}  load {load}", flush=True)
    for key, runs in result["runs"].items():
        name = key.split()[0]

        def med(f):
            return round(statistics.median(f(x) for x in runs), 4)

        s = {"generation_s": med(lambda x: x["generation_s"]), "rtf": med(lambda x: x["rtf"]),
             "ms_per_cached_step": med(lambda x: x["ms_per_cached_step"]),
             "time_to_first_audio_s": med(lambda x: x["time_to_first_audio_s"]),
             "peak_rss_bytes": med(lambda x: x["peak_rss_bytes"]), "audio_s": runs[0]["audio_s"],
             "decoder_steps": runs[0]["decoder_steps"], "bundle_bytes": sum(runs[0]["bundle_bytes"].values()),
             "generation_s_each": [x["generation_s"] for x in runs], "loads": [x["load"] for x in runs]}
        s["step_over_floor"] = round(s["ms_per_cached_step"] / floors[name]["floor_ms_per_step"], 3)
        result["summary"][key] = s
        print(f"{key:<28} {s['generation_s']:.2f} s  RTF {s['rtf']:.3f}  {s['ms_per_cached_step']:.2f} ms/step "
              f"(floor {floors[name]['floor_ms_per_step']:.2f}, x{s['step_over_floor']:.2f})  "
              f"TTFA {s['time_to_first_audio_s']:.3f} s  RSS {s['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    result["load_after"] = _load()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
