"""FAD and CLAP score of a folder of generated clips against real ones, with every embedder available.

    python examples/musicgen/evaluate.py --generated out/gen --reference data --reference-split test \\
        --codec path/to/musicgen --clap-mini cache/clap-mini --train-clap-mini data --out result.json \\
        [--baseline baseline_result.json] [--clap laion/larger_clap_music] [--vggish vggish.safetensors]

Datasets in the audiofolder layout; generated clips carry their prompt in ``text``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musicgen.eval.embedders import ClapMiniEmbedder, train_clap_mini
from musicgen.eval.metrics import evaluate, format_table, load_clips, offline_embedders
from musicgen.files import write_json


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", required=True, help="audiofolder root of generated clips (text = prompt)")
    p.add_argument("--generated-split", default="test")
    p.add_argument("--reference", required=True, help="audiofolder root of real reference clips")
    p.add_argument("--reference-split", default="test")
    p.add_argument("--clap", help="CLAP folder or hub id (e.g. laion/larger_clap_music)")
    p.add_argument("--vggish", help="VGGish weights converted to safetensors")
    p.add_argument("--codec", help="EnCodec or MusicGen folder whose encoder gives the codec latents")
    p.add_argument("--clap-mini", help="clap-mini (proxy) cache folder")
    p.add_argument("--train-clap-mini", metavar="ROOT", help="train clap-mini on ROOT/train into --clap-mini if absent")
    p.add_argument("--clap-mini-steps", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for FAD intervals")
    p.add_argument("--baseline", help="result JSON of the uncompressed model, for retention")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)

    if args.train_clap_mini:
        if not args.clap_mini:
            p.error("--train-clap-mini needs --clap-mini (the cache folder)")
        # The settings documented in docs/metrics.md (and used by metrics_demo.py).
        train_clap_mini(args.train_clap_mini, out_dir=args.clap_mini, steps=args.clap_mini_steps,
                        weight_decay=0.05, spec_augment=True)
    embedders, missing = offline_embedders(clap=args.clap, vggish=args.vggish, codec=args.codec, clap_mini=args.clap_mini)
    if not embedders:
        p.error("no embedder is available: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    rate = 32000
    gen, prompts = load_clips(args.generated, args.generated_split, rate)
    ref, _ = load_clips(args.reference, args.reference_split, rate)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    result = evaluate(gen, prompts, ref, sample_rate=rate, embedders=embedders, bootstrap=args.bootstrap, baseline=baseline)
    result["unavailable"] = {k: v for k, v in missing.items() if v != "not requested"}
    for emb in embedders:
        if isinstance(emb, ClapMiniEmbedder):
            result["clap-mini-proxy_retrieval"] = emb.info.get("retrieval")
    print(format_table({"generated": result}))
    for name, why in result["unavailable"].items():
        print(f"{name}: unavailable: {why}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
