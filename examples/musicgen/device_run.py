"""Run a MusicGen ONNX bundle the way a phone would, and report what it cost.

    python examples/musicgen/device_run.py --bundle OUT --prompt TEXT --seconds S --out out.wav \\
        [--threads 2] [--ort-format] [--greedy] [--seed 0] [--stream [--window 50 --overlap 10]]

Prints, as the last line of stdout, one JSON object (``musicgen.bundle.device.device_run``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musicgen.bundle.device import device_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", required=True, help="WAV file to write")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ort-format", action="store_true", help="convert to and run ONNX Runtime's mobile .ort format")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of top-k sampling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: generation_config)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--progress", action="store_true", help="progress bar over decoder steps (stderr)")
    ap.add_argument("--stream", action="store_true", help="decode audio in cross-faded windows while generating")
    ap.add_argument("--window", type=int, default=50, help="code frames per streamed decode (50 = 1 s)")
    ap.add_argument("--overlap", type=int, default=10, help="frames each window re-decodes from the previous one")
    args = ap.parse_args(argv)
    result = device_run(args.bundle, args.prompt, seconds=args.seconds, out=args.out, threads=args.threads,
                        ort_format=args.ort_format, greedy=args.greedy, seed=args.seed,
                        guidance_scale=args.guidance, top_k=args.top_k, progress=args.progress,
                        stream=args.stream, window=args.window, overlap=args.overlap)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
