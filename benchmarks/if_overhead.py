"""What the merged decoder's ``If`` costs: the same cached step through the merged graph and through
the unmerged ``decoder_with_past`` graph it was built from, without the profiler.

Both sessions get the same feeds (a cache of ``--past`` positions, text of 12 tokens, guidance batch
2, 4 codebooks, random values); runs alternate, and the figure is the median of ``--runs`` runs each.
The outputs are compared too (they must be equal: the merged graph's cached branch is that graph).

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python benchmarks/if_overhead.py \\
        --merged /tmp/kdq-bench14/small/bundle_fp32dec/onnx/decoder_model_merged.onnx \\
        --with-past /tmp/kdq-bench14/small/graphs/decoder_with_past_model.onnx --past 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--merged", required=True)
    ap.add_argument("--with-past", required=True)
    ap.add_argument("--past", type=int, default=32)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    merged = ort.InferenceSession(args.merged, opts, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(args.with_past, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in plain.get_inputs():
        shape = i.shape
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 2048, (8, 1), dtype=np.int64)
        elif i.name == "encoder_hidden_states":
            feeds[i.name] = rng.standard_normal((2, 12, shape[-1])).astype(np.float32)
        elif i.name == "encoder_attention_mask":
            feeds[i.name] = np.ones((2, 12), dtype=np.int64)
        else:  # past_key_values.{i}.{decoder,encoder}.{key,value}: (2, heads, len, head_dim)
            length = args.past if ".decoder." in i.name else 12
            feeds[i.name] = rng.standard_normal((2, shape[1], length, shape[3])).astype(np.float32)
    merged_feeds = {**feeds, "use_cache_branch": np.array([True])}
    a, b = merged.run(None, merged_feeds), plain.run(None, feeds)
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    times = {"merged": [], "with_past": []}
    for _ in range(args.runs):
        for name, sess, f in (("merged", merged, merged_feeds), ("with_past", plain, feeds)):
            t = time.perf_counter()
            sess.run(None, f)
            times[name].append(1000 * (time.perf_counter() - t))
    out = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out.update({"if_ms": round(out["merged"] - out["with_past"], 3), "past": args.past, "threads": args.threads,
                "same_outputs": same, "load": [round(x, 2) for x in os.getloadavg()]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
