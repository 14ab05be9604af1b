"""Export a MusicGen checkpoint to an ONNX bundle that honours a precision plan.

    python examples/musicgen/export.py --model DIR_OR_HUB_ID --out OUT --plan fp32|paper|PLAN.json

``OUT/`` holds ``config.json`` (with the dtype chosen per part under ``transformers.js_config``),
``generation_config.json``, the tokenizer files and ``OUT/onnx/`` with ``text_encoder``,
``decoder_model_merged`` and ``encodec_decode``, each named the way transformers.js expects for its
dtype (``NAME.onnx`` fp32, ``NAME_fp16.onnx``, ``NAME_quantized.onnx`` int8, ``NAME_q4.onnx`` 4-bit).
``OUT/export_report.json`` lists per part the dtype, bytes, plan conformance and parity against
PyTorch. See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from kdq.errors import KdqError, bad_value
from kdq.export.atomic import atomic_path, save_onnx_atomic, write_text_atomic
from kdq.export.merge import merge_decoders
from kdq.export.onnx_export import compare_onnx, export_onnx, validate_onnx
from musicgen.onnx_parts import DecoderStep, EncodecDecode, TextEncoder, kv_names

PARTS = ("text_encoder", "decoder_model_merged", "encodec_decode")
# transformers.js file-name suffix and its dtype key per ONNX dtype
SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_quantized", "int4": "_q4"}
TJS_DTYPE = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}


class BundleError(KdqError):
    """Bad arguments to the bundle export."""


def load_musicgen(model: str):
    """Load ``MusicgenForConditionalGeneration`` and its tokenizer from a folder or hub id (eval mode)."""
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    m = MusicgenForConditionalGeneration.from_pretrained(model).eval()
    tok = AutoTokenizer.from_pretrained(model)
    return m, tok


def _decoder_example(model, *, batch: int, text_len: int, past_len: int, seq: int, with_past: bool, seed: int = 0):
    """Decoder inputs for export/validation: CFG batch ``2*batch``; ``past_len`` ignored without past."""
    g = torch.Generator().manual_seed(seed)
    dec = model.decoder.config
    k = dec.num_codebooks
    b2 = 2 * batch
    text_hidden = model.text_encoder.config.hidden_size
    heads = dec.num_attention_heads
    head_dim = dec.hidden_size // heads
    feed: dict[str, torch.Tensor] = {
        "input_ids": torch.randint(0, dec.vocab_size, (b2 * k, seq), generator=g),
        "encoder_hidden_states": torch.randn(b2, text_len, text_hidden, generator=g),
        "encoder_attention_mask": torch.ones(b2, text_len, dtype=torch.long),
    }
    feed["encoder_attention_mask"][batch:] = 0  # the unconditional half, as under guidance
    feed["encoder_attention_mask"][0, -1] = 0  # one padded text position
    if with_past:
        for name in kv_names(dec.num_hidden_layers, "past_key_values"):
            length = past_len if ".decoder." in name else text_len
            feed[name] = torch.randn(b2, heads, length, head_dim, generator=g)
    return feed


def export_parts(model, workdir: Path, *, atol: float = 1e-4) -> dict[str, Any]:
    """Export the four fp32 graphs (text encoder, decoder first/cached step, EnCodec) and validate each.

    Each graph is validated in ONNX Runtime against its PyTorch module on shapes other than the
    export shapes. Returns ``{graph name: {"path", "parity"}}``.
    """
    dec = model.decoder.config
    n_layers = dec.num_hidden_layers
    out: dict[str, Any] = {}

    te = TextEncoder(model)
    te_axes = {"input_ids": {0: "batch_size", 1: "encoder_sequence_length"},
               "attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
               "last_hidden_state": {0: "batch_size", 1: "encoder_sequence_length"}}
    ids = torch.randint(3, model.text_encoder.config.vocab_size, (2, 5))
    path = export_onnx(te, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, workdir / "text_encoder.onnx",
                       output_names=["last_hidden_state"], dynamic_axes=te_axes)
    vids = torch.randint(3, model.text_encoder.config.vocab_size, (3, 7))
    vmask = torch.ones_like(vids)
    vmask[1, 5:] = 0
    check = {"input_ids": vids, "attention_mask": vmask}
    rep = validate_onnx(path, te, [check], output_names=["last_hidden_state"], atol=atol)
    out["text_encoder"] = {"path": path, "parity": rep.to_json(), "check": check}

    present = kv_names(n_layers, "present")
    outputs = ["logits", *present]
    axes = {"input_ids": {0: "batch_size_x_codebooks", 1: "decoder_sequence_length"},
            "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
            "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
            "logits": {0: "batch_size_x_codebooks", 1: "decoder_sequence_length"}}
    for name in present:
        axes[name] = {0: "batch_size", 2: "present_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length_out"}
    first = DecoderStep(model, with_past=False)
    path = export_onnx(first, _decoder_example(model, batch=1, text_len=5, past_len=0, seq=2, with_past=False),
                       workdir / "decoder_model.onnx", output_names=outputs, dynamic_axes=axes)
    checks = [_decoder_example(model, batch=2, text_len=6, past_len=0, seq=3, with_past=False, seed=1),
              _decoder_example(model, batch=1, text_len=4, past_len=0, seq=1, with_past=False, seed=2)]
    rep = validate_onnx(path, first, checks, output_names=outputs, atol=atol)
    out["decoder_model"] = {"path": path, "parity": rep.to_json()}

    axes_p = dict(axes)
    for name in kv_names(n_layers, "past_key_values"):
        axes_p[name] = {0: "batch_size", 2: "past_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length_out"}
    cached = DecoderStep(model, with_past=True)
    path = export_onnx(cached, _decoder_example(model, batch=1, text_len=5, past_len=3, seq=1, with_past=True),
                       workdir / "decoder_with_past_model.onnx", output_names=outputs, dynamic_axes=axes_p)
    checks = [_decoder_example(model, batch=2, text_len=6, past_len=7, seq=1, with_past=True, seed=3),
              _decoder_example(model, batch=1, text_len=4, past_len=1, seq=1, with_past=True, seed=4)]
    rep = validate_onnx(path, cached, checks, output_names=outputs, atol=atol)
    out["decoder_with_past_model"] = {"path": path, "parity": rep.to_json()}

    codec = EncodecDecode(model)
    k = dec.num_codebooks
    size = model.audio_encoder.config.codebook_size
    ax = {"audio_codes": {1: "batch_size", 3: "chunk_length"}, "audio_values": {0: "batch_size", 2: "num_samples"}}
    path = export_onnx(codec, {"audio_codes": torch.randint(0, size, (1, 1, k, 12))}, workdir / "encodec_decode.onnx",
                       output_names=["audio_values"], dynamic_axes=ax)
    check = {"audio_codes": torch.randint(0, size, (1, 2, k, 9))}
    rep = validate_onnx(path, codec, [check], output_names=["audio_values"], atol=atol)
    out["encodec_decode"] = {"path": path, "parity": rep.to_json(), "check": check}
    return out


def _merged_checks(model, *, seed: int = 10) -> tuple[list[dict], list[dict]]:
    """Validation feeds for the merged decoder: first steps (empty cache) and cached steps."""
    n = model.decoder.config.num_hidden_layers
    first, cached = [], []
    for j, (batch, text_len, past_len, seq) in enumerate([(2, 6, 0, 3), (1, 3, 0, 1)]):
        feed = _decoder_example(model, batch=batch, text_len=text_len, past_len=past_len, seq=seq, with_past=True, seed=seed + j)
        for name in kv_names(n, "past_key_values"):
            feed[name] = feed[name][:, :, :0]
        feed["use_cache_branch"] = torch.tensor([False])
        first.append(feed)
    for j, (batch, text_len, past_len) in enumerate([(2, 6, 5), (1, 3, 1)]):
        feed = _decoder_example(model, batch=batch, text_len=text_len, past_len=past_len, seq=1, with_past=True, seed=seed + 5 + j)
        feed["use_cache_branch"] = torch.tensor([True])
        cached.append(feed)
    return first, cached


def _bundle_config(model, dtypes: dict[str, str], kv_cache_dtype: str = "float32") -> dict[str, Any]:
    """``config.json``: the model config plus the per-file dtypes (and the KV cache dtype of the
    decoder's variant) where transformers.js reads them."""
    cfg = model.config.to_dict()
    tjs: dict[str, Any] = {"dtype": {part: TJS_DTYPE[d] for part, d in dtypes.items()}}
    if kv_cache_dtype != "float32":
        tjs["kv_cache_dtype"] = {TJS_DTYPE[dtypes["decoder_model_merged"]]: kv_cache_dtype}
    cfg["transformers.js_config"] = tjs
    return cfg


def _replace_dir(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` folder onto ``out`` (the old ``out``, if any, is removed after)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    model: str | Path | Any,
    out: str | Path,
    *,
    plan: Any = "fp32",
    tokenizer: Any = None,
    atol: float = 1e-4,
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``model`` (a folder/hub id or a loaded ``MusicgenForConditionalGeneration``) to ``out``.

    Args:
        model: a folder or hub id (its tokenizer is saved too), or a loaded model.
        out: the bundle folder.
        plan: ``"fp32"`` or a ``kdq.quant.Plan`` (read, never changed).
        tokenizer: the tokenizer to save with a loaded model (a folder brings its own).
        atol: parity tolerance against PyTorch for parts whose weights are all fp32.
        progress: show a progress bar.

    The whole bundle is built in a temporary folder next to ``out`` and moved into place only when
    every graph exported, validated and (for a plan) conformed: a failed export leaves ``out`` as it
    was. Returns the export report (also written to ``out/export_report.json``).
    """
    from tqdm.auto import tqdm

    if isinstance(model, (str, Path)):
        model_obj, tok = load_musicgen(str(model))
        source = str(model)
    else:
        model_obj, tok, source = model, tokenizer, type(model).__name__
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bar = tqdm(total=4, desc="export", disable=not progress)
        work = stage / "_graphs"
        work.mkdir()
        parts = export_parts(model_obj, work, atol=atol)
        bar.update(1)
        plan_report = None
        dtypes = {p: "fp32" for p in PARTS}
        graphs = {name: Path(v["path"]) for name, v in parts.items()}
        if plan != "fp32":
            from musicgen.bundle_plan import apply_bundle_plan

            graphs, dtypes, plan_report = apply_bundle_plan(model_obj, graphs, plan, work)
        bar.update(1)
        import onnx

        onnx_dir = stage / "onnx"
        merged = merge_decoders(onnx.load(str(graphs["decoder_model"])), onnx.load(str(graphs["decoder_with_past_model"])))
        files = {part: onnx_dir / f"{part}{SUFFIX[dtypes[part]]}.onnx" for part in PARTS}
        save_onnx_atomic(merged, files["decoder_model_merged"])
        del merged
        for part in ("text_encoder", "encodec_decode"):
            with atomic_path(files[part]) as tmp:
                shutil.copyfile(graphs[part], tmp)
        bar.update(1)
        # parity of the files as shipped: strict for all-fp32 parts, SNR against fp32 PyTorch otherwise
        report: dict[str, Any] = {"source": source, "plan": plan_report["plan"] if plan_report else "fp32", "parts": {}}
        first, cached = _merged_checks(model_obj)
        names = ["logits", *kv_names(model_obj.decoder.config.num_hidden_layers, "present")]
        checks = {
            "text_encoder": [(TextEncoder(model_obj), [parts["text_encoder"]["check"]], ["last_hidden_state"], "")],
            "encodec_decode": [(EncodecDecode(model_obj), [parts["encodec_decode"]["check"]], ["audio_values"], "")],
            "decoder_model_merged": [(DecoderStep(model_obj, with_past=False), first, names, "first_step"),
                                     (DecoderStep(model_obj, with_past=True), cached, names, "cached_step")],
        }
        for part, path in files.items():
            entry: dict[str, Any] = {"file": str(path.relative_to(stage)), "dtype": dtypes[part], "bytes": path.stat().st_size}
            strict = plan_report is None or set(plan_report["parts"][part]["planned_weight_bytes_fp32"]) <= {"fp32"}
            parity: dict[str, Any] = {}
            for module, feeds, outs, label in checks[part]:
                if strict:
                    res = validate_onnx(path, module, feeds, output_names=outs, atol=atol).to_json()
                else:
                    res = {"snr_db_and_max_abs_diff": compare_onnx(path, module, feeds, output_names=outs)}
                parity.update({label: res} if label else res)
            entry["parity"] = parity
            entry["parity_kind"] = f"strict atol={atol:g}" if strict else "measured against PyTorch fp32"
            if plan_report:
                entry.update({k: v for k, v in plan_report["parts"][part].items() if k not in entry})
            report["parts"][part] = entry
        report["bundle_bytes"] = sum(e["bytes"] for e in report["parts"].values())
        shutil.rmtree(work)
        kv = plan_report["parts"]["decoder_model_merged"]["kv_cache_dtype"] if plan_report else "float32"
        write_text_atomic(stage / "config.json", json.dumps(_bundle_config(model_obj, dtypes, kv), indent=2))
        write_text_atomic(stage / "generation_config.json", json.dumps(model_obj.generation_config.to_dict(), indent=2))
        if tok is not None:
            tok.save_pretrained(stage)
        write_text_atomic(stage / "export_report.json", json.dumps(report, indent=2))
        bar.update(1)
        bar.close()
        _replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def resolve_plan_arg(plan: str) -> Any:
    """``fp32``, ``paper`` (TinyMusician's plan) or a path to a plan JSON file."""
    if plan == "fp32":
        return "fp32"
    if plan == "paper":
        from musicgen.plans import paper_plan

        return paper_plan()
    path = Path(plan)
    if path.suffix == ".json" and path.is_file():
        from kdq.quant import Plan

        return Plan.load(path)
    raise bad_value(BundleError, "--plan", plan, "'fp32', 'paper' or an existing PLAN.json file")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="MusicGen folder or hub id")
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--plan", default="fp32", help="fp32 | paper | PLAN.json")
    ap.add_argument("--atol", type=float, default=1e-4, help="fp32 parity tolerance against PyTorch")
    args = ap.parse_args(argv)
    report = export_bundle(args.model, args.out, plan=resolve_plan_arg(args.plan), atol=args.atol)
    print(json.dumps({p: {"dtype": e["dtype"], "bytes": e["bytes"]} for p, e in report["parts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
