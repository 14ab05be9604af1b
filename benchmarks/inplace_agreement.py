"""How far the in-place decoder's logits are from the merged decoder's, on the same tokens.

Greedy codes of two decoders diverge after the first near-tie argmax that rounding flips, and then
every later step differs, so "same codes" says little at MusicGen-small size with random weights.
This feeds both loops the same tokens (teacher forcing: the merged decoder's greedy choices, guidance
3) and compares, per step, the guided logits: max |diff|, SNR against the merged decoder's, and
whether the argmax agrees; then both generate greedily on their own from the same encoder states
(the merged bundle's text encoder: bundles may hold different ones) and the fraction of equal codes
is reported. Results go to a JSON file.

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python benchmarks/inplace_agreement.py \\
        --pairs int4_b128=/tmp/kdq-bench14/small/bundle_int4_b128:/tmp/kdq-bench14e/small/bundle_inplace_int4_b128 \\
        --tokens 64 --out benchmarks/results/inplace_agreement_small.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

PROMPT = "lively folk dance with violin and flute"


def compare(merged_bundle: str, inplace_bundle: str, tokens: int, threads: int, guidance: float = 3.0) -> dict:
    import numpy as np

    from musicgen.bundle.runtime import MusicgenOnnx, apply_delay_pattern, build_delay_pattern

    a = MusicgenOnnx(merged_bundle, threads=threads, decoder="merged")
    b = MusicgenOnnx(inplace_bundle, threads=threads, decoder="inplace")
    ids, mask = a.tokenize([PROMPT])
    hidden = a.encode_text(ids, mask)
    hidden2 = np.concatenate([hidden, np.zeros_like(hidden)], 0)
    mask2 = np.concatenate([mask, np.zeros_like(mask)], 0)
    run_a, run_b = a._merged_decoder(hidden2, mask2), b._inplace_decoder(hidden2, mask2, max_new_tokens=tokens)
    k = a.num_codebooks
    seq = np.full((k, 1), a.start_token_id, dtype=np.int64)
    pattern = build_delay_pattern(k, k, a.pad_token_id, tokens + 1)
    diffs, snrs, agree = [], [], []
    for step in range(tokens):
        dec_in = apply_delay_pattern(seq, pattern)
        if step > 0:
            dec_in = dec_in[:, -1:]
        dec_in = np.concatenate([dec_in, dec_in], 0)
        la, lb = (r(dec_in, step).astype(np.float64) for r in (run_a, run_b))
        ga = la[k:] + (la[:k] - la[k:]) * guidance
        gb = lb[k:] + (lb[:k] - lb[k:]) * guidance
        diffs.append(float(np.abs(ga - gb).max()))
        snrs.append(float(10 * np.log10((ga**2).sum() / max(((ga - gb) ** 2).sum(), 1e-30))))
        agree.append(float((ga.argmax(-1) == gb.argmax(-1)).mean()))
        seq = np.concatenate([seq, ga.argmax(-1)[:, None]], 1)
    free_a = a.generate_codes(hidden, mask, max_new_tokens=tokens, guidance_scale=guidance)
    free_b = b.generate_codes(hidden, mask, max_new_tokens=tokens, guidance_scale=guidance)
    return {"tokens": tokens, "free_running_greedy_codes_equal_fraction": float((free_a == free_b).mean()),
            "max_abs_diff_max": max(diffs), "max_abs_diff_median": float(np.median(diffs)),
            "snr_db_min": min(snrs), "snr_db_median": float(np.median(snrs)), "argmax_agreement": float(np.mean(agree)),
            "steps_all_argmax_equal": int(sum(x == 1.0 for x in agree))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", required=True, help="NAME=MERGED_BUNDLE:INPLACE_BUNDLE,...")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"command": " ".join(["python", "benchmarks/inplace_agreement.py", *sys.argv[1:]]), "pairs": {}}
    for spec in args.pairs.split(","):
        name, _, rest = spec.partition("=")
        merged, _, inplace = rest.partition(":")
        result["pairs"][name] = res = compare(merged, inplace, args.tokens, args.threads)
        print(name, json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
