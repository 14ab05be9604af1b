"""Logit SNR of decoder variants against a reference decoder on the same cached step.

Every merged decoder gets the same feeds (a cache of ``--past`` positions, 12 text positions, guidance
batch 2, 4 codebooks; random values, ``--seeds`` draws) and the SNR of its logits against the
reference's is ``10 log10(sum(ref^2) / sum((x - ref)^2))``, with the share of rows whose argmax agrees.

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python benchmarks/decoder_snr.py \\
        --reference /tmp/kdq-bench14/small/bundle_fp32dec/onnx/decoder_model_merged.onnx \\
        --variants b32=/tmp/kdq-bench14/small/bundle_int4dec/onnx/decoder_model_merged_q4.onnx
"""

from __future__ import annotations

import argparse
import json


def feeds_for(sess, past: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 2048, (8, 1), dtype=np.int64)
        elif i.name == "encoder_hidden_states":
            feeds[i.name] = rng.standard_normal((2, 12, i.shape[-1])).astype(np.float32)
        elif i.name == "encoder_attention_mask":
            feeds[i.name] = np.ones((2, 12), dtype=np.int64)
        elif i.name == "use_cache_branch":
            feeds[i.name] = np.array([True])
        else:
            length = past if ".decoder." in i.name else 12
            feeds[i.name] = rng.standard_normal((2, i.shape[1], length, i.shape[3])).astype(np.float32)
    return feeds


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--variants", required=True, help="name=PATH,...")
    ap.add_argument("--past", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    ref = ort.InferenceSession(args.reference, opts, providers=["CPUExecutionProvider"])
    feeds = [feeds_for(ref, args.past, s) for s in range(args.seeds)]
    want = [ref.run(["logits"], f)[0] for f in feeds]
    del ref
    out = {}
    for spec in args.variants.split(","):
        name, path = spec.split("=", 1)
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        got = [sess.run(["logits"], f)[0] for f in feeds]
        sig = sum(float((w.astype(np.float64) ** 2).sum()) for w in want)
        err = sum(float(((g.astype(np.float64) - w) ** 2).sum()) for g, w in zip(got, want))
        agree = float(np.mean([(g.argmax(-1) == w.argmax(-1)).mean() for g, w in zip(got, want)]))
        out[name] = {"snr_db": round(10 * np.log10(sig / err), 2), "argmax_agreement": round(agree, 4)}
        print(name, json.dumps(out[name]), flush=True)
        del sess
    print(json.dumps({"past": args.past, "seeds": args.seeds, "variants": out}))


if __name__ == "__main__":
    main()
