"""Export a MusicGen checkpoint to an ONNX bundle that honours a precision plan.

    python examples/musicgen/export.py --model DIR_OR_HUB_ID --out OUT --plan fp32|paper|PLAN.json \
        [--decoder merged|inplace|both]

The bundle layout, what is validated and what the export refuses to overwrite: ``musicgen.bundle.build``
and docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musicgen.bundle.build import DECODERS, export_bundle, resolve_plan_arg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="MusicGen folder or hub id")
    ap.add_argument("--out", required=True, help="bundle folder to write (empty, new, or an earlier bundle)")
    ap.add_argument("--plan", default="fp32", help="fp32 | paper | PLAN.json")
    ap.add_argument("--atol", type=float, default=1e-4, help="fp32 parity tolerance against PyTorch")
    ap.add_argument("--decoder", default="merged", choices=DECODERS,
                    help="merged: decoder_model_merged (transformers.js); inplace: kdq's in-place decoder graphs; both")
    args = ap.parse_args(argv)
    report = export_bundle(args.model, args.out, plan=resolve_plan_arg(args.plan), atol=args.atol, decoder=args.decoder)
    print(json.dumps({p: {"dtype": e["dtype"], "bytes": e["bytes"]} for p, e in report["parts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
