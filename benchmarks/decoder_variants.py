"""Decoder variants for the loop experiments: the same model and graphs, another decoder file.

Reads ``WORKDIR/model`` (bench_generation.py's random model) and ``WORKDIR/graphs`` (its fp32 graphs,
``musicgen.bundle.build.export_graphs``), converts the two unmerged decoder graphs, merges them
(``kdq.export.merge.merge_decoders``) and writes ``WORKDIR/bundle_NAME``: links to the int8 text
encoder, EnCodec and tokenizer of ``WORKDIR/bundle_int8dec`` (``musicgen.bundle.build.export_bundle``
with bench_generation.py's ``int8dec`` plan), its config with the decoder's dtype changed, and the new
decoder file. With the default block size and accuracy level, ``--plan int4dec`` gives the decoder
``export_bundle`` writes for bench_generation.py's ``int4dec`` plan (the same ``apply_plan_onnx`` call).

- ``--plan fp32|int8dec|int4dec``: no conversion, or ``kdq.export.precision.apply_plan_onnx`` with
  bench_generation.py's plan (4-bit: ``--block-size``, ``--accuracy-level``);
- ``--fuse``: ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``,
  ``model_type="bart"``, python fusions only) on each graph after the plan. It must run on the
  unmerged graphs: the merged decoder is a single ``If`` node and the optimizer's pattern matching
  does not look into subgraphs. It runs after quantization because the fused ``com.microsoft`` ops
  are unknown to ONNX shape inference, which ``quantize_dynamic`` relies on to type the MatMul inputs
  (it fails with "Unable to find data type for weight_name"); the fusions that match (GELU,
  SkipLayerNormalization) do not touch the matrix products.

    flock /tmp/kdq-heavy.lock env PYTHONPATH=.:examples /work/main/.venv/bin/python \\
        benchmarks/decoder_variants.py --workdir /tmp/kdq-bench14/small --name int4_b64 --plan int4dec --block-size 64
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PLANS = ("fp32", "int8dec", "int4dec")
DECODERS = ("decoder_model", "decoder_with_past_model")


def fuse(path: Path, num_heads: int, hidden_size: int):
    """The transformer optimizer's python fusions on one fp32 graph; returns (model, fused op counts)."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(path), model_type="bart", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    m = opt.model
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        import onnx

        m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return m, stats


def build_variant(workdir: Path, name: str, plan_name: str, *, block_size: int = 32, accuracy_level: int = 4,
                  fused: bool = False) -> dict:
    import onnx

    from bench_generation import plans
    from kdq.export.atomic import save_onnx_atomic
    from kdq.export.merge import merge_decoders
    from kdq.export.precision import apply_plan_onnx
    from musicgen.bundle.parts import GRAPHS, TJS_DTYPE, part_file
    from musicgen.models.musicgen import load_musicgen

    base = workdir / "bundle_int8dec"
    cfg = json.loads((base / "config.json").read_text())
    dec_dtype = {"fp32": "fp32", "int8dec": "int8", "int4dec": "int4"}[plan_name]
    cfg["transformers.js_config"]["dtype"]["decoder_model_merged"] = TJS_DTYPE[dec_dtype]
    out = workdir / f"bundle_{name}"
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name not in ("config.json", "export_report.json") and not (out / f.name).exists():
            os.symlink(f, out / f.name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in (base / "onnx").glob("*.onnx"):
        if not f.name.startswith("decoder_model_merged") and not (out / "onnx" / f.name).exists():
            os.symlink(f, out / "onnx" / f.name)
    model = load_musicgen(str(workdir / "model"))
    module_names = [n for n, _ in model.named_modules()]
    dec = model.config.decoder
    specs = {g.name: g for g in GRAPHS}
    info: dict = {"name": name, "plan": plan_name, "block_size": block_size, "accuracy_level": accuracy_level,
                  "fused": fused, "fusions": {}, "ops": {}}
    converted = {}
    for g in DECODERS:
        path = workdir / "graphs" / f"{g}.onnx"
        m = onnx.load(str(path))
        if plan_name != "fp32":
            m, _ = apply_plan_onnx(m, plans()[plan_name], module_names, prefix=specs[g].scope, int4_block_size=block_size,
                                   int4_accuracy_level=accuracy_level)
        if fused:
            with tempfile.TemporaryDirectory() as tmp:
                onnx.save_model(m, f"{tmp}/q.onnx")
                m, info["fusions"][g] = fuse(Path(f"{tmp}/q.onnx"), dec.num_attention_heads, dec.hidden_size)
        info["ops"][g] = dict(collections.Counter(n.op_type for n in m.graph.node).most_common())
        converted[g] = m
    merged = merge_decoders(converted["decoder_model"], converted["decoder_with_past_model"])
    target = out / part_file("decoder_model_merged", dec_dtype)
    save_onnx_atomic(merged, target)
    info["decoder_file"] = str(target)
    info["decoder_bytes"] = target.stat().st_size
    (out / "variant.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--plan", required=True, choices=PLANS)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--fuse", action="store_true")
    args = ap.parse_args()
    t = time.perf_counter()
    info = build_variant(Path(args.workdir), args.name, args.plan, block_size=args.block_size,
                         accuracy_level=args.accuracy_level, fused=args.fuse)
    print(json.dumps({k: v for k, v in info.items() if k != "ops"}), f"({time.perf_counter() - t:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
