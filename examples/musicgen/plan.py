"""Precision plans for MusicGen, and the pipeline's plan stage; also a command that writes a plan.

- ``paper_plan()``: TinyMusician's hand-chosen plan as a kdq ``Plan`` (three rules).
- ``musicgen_groups(model, granularity)``: planner groups over the text encoder, the decoder's layers
  and EnCodec, at ``"part"`` (3 groups), ``"layer"`` or ``"sublayer"`` granularity.
- ``musicgen_score(model, inputs=...)``: the planner's score (decoder-logit KL to fp32 + EnCodec's
  relative audio error), on calibration inputs from real clips (``calibration_from_tokens``, held-in
  valid clips, never test) or random ones (``calibration_inputs``, for random-weight models).
- ``plan_stage``: profile the distilled student, measure the paper plan, solve kdq's plan within the
  paper plan's bytes, keep the Pareto frontier.

Command line::

    python examples/musicgen/plan.py --model DIR --out plan.json [--granularity layer]
        [--candidates fp32,fp16,bf16,int8] [--max-bytes N | --max-sensitivity S | --paper-size]
        [--tokens valid.safetensors] [--cache profile.json]

Default budget: the paper plan's size on this model (``--paper-size``), so the result is directly
comparable with the hand-chosen plan; both are measured and printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from kdq.quant.plan import Plan

PAPER_ASSIGNMENTS = {"text_encoder": "int8", "decoder": "fp16", "audio_encoder": "fp32"}
GRANULARITIES = ("part", "layer", "sublayer")


def paper_plan() -> Plan:
    """TinyMusician's plan: T5 text encoder int8, MusicGen decoder fp16, EnCodec fp32.

    Everything else (``enc_to_dec_proj`` when present) stays at the default fp32.
    """
    return Plan(
        dict(PAPER_ASSIGNMENTS),
        meta={"source": "TinyMusician (arXiv 2509.00914): hand-chosen precision per part"},
    )


def _has_tensors(mod: Any) -> bool:
    return any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())


def musicgen_groups(model: Any, granularity: str = "layer", *, include_codec_encoder: bool = False) -> list[str]:
    """Module names to profile as groups, in model order.

    Args:
        model: a ``MusicgenForConditionalGeneration``.
        granularity: ``"part"`` (text_encoder, decoder, audio_encoder), ``"layer"`` (T5 embedding and
            blocks; decoder token embeddings, each layer, heads; EnCodec quantizer and each decoder
            layer with weights) or ``"sublayer"`` (as ``"layer"`` but each decoder layer split into
            self-attention, cross-attention and MLP, each T5 block into attention and MLP).
        include_codec_encoder: also group EnCodec's encoder (generation never runs it).

    Returns:
        Disjoint module names; modules in no group keep fp32 in a planned plan.
    """
    from kdq.errors import bad_value
    from kdq.quant.errors import GroupError

    if granularity not in GRANULARITIES:
        raise bad_value(GroupError, "granularity", granularity, f"one of {GRANULARITIES}")
    if granularity == "part":
        return ["text_encoder", "decoder", "audio_encoder"]
    names: list[str] = ["text_encoder.shared"]
    for i, block in enumerate(model.text_encoder.encoder.block):
        base = f"text_encoder.encoder.block.{i}"
        if granularity == "layer":
            names.append(base)
        else:
            names += [f"{base}.layer.{j}" for j in range(len(block.layer))]
    dec = "decoder.model.decoder"
    names.append(f"{dec}.embed_tokens")
    for i, _ in enumerate(model.decoder.model.decoder.layers):
        base = f"{dec}.layers.{i}"
        if granularity == "layer":
            names.append(base)
        else:
            names += [
                f"{base}.self_attn",
                f"{base}.encoder_attn",
                f"re:{base.replace('.', chr(92) + '.')}\\.(fc1|fc2)",
            ]
    names.append("decoder.lm_heads")
    if getattr(model, "enc_to_dec_proj", None) is not None:
        names.append("enc_to_dec_proj")
    names.append("audio_encoder.quantizer")
    for i, layer in enumerate(model.audio_encoder.decoder.layers):
        if _has_tensors(layer) and any(p.is_floating_point() for p in layer.parameters()):
            names.append(f"audio_encoder.decoder.layers.{i}")
    if include_codec_encoder:
        names.append("audio_encoder.encoder")
    return names


def calibration_inputs(model: Any, *, batch: int = 2, frames: int = 16, text_len: int = 6, seed: int = 0) -> dict[str, Any]:
    """Fixed random calibration inputs for ``musicgen_score``: text ids, decoder codes, audio codes.

    Random codes are fine for random-weight models; for a trained model pass codes of real audio.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    k = model.decoder.config.num_codebooks
    vocab = model.decoder.config.vocab_size
    text_vocab = model.text_encoder.config.vocab_size
    ids = torch.randint(3, text_vocab, (batch, text_len), generator=g)
    ids[:, -1] = 1
    codes = torch.randint(0, vocab, (batch, k, frames), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": codes.reshape(batch * k, frames),
        "audio_codes": codes[None],
    }


def calibration_from_tokens(model: Any, tokens: str | Path, tokenizer: Any, *, n: int) -> dict[str, Any]:
    """Calibration inputs from the first ``n`` clips of a token file (use held-in clips, never test)."""
    from musicgen.data.tokens import TokenDataset, delay_pattern

    data = TokenDataset.load(tokens)
    codes = data.codes[:n]
    dec = model.config.decoder
    inputs, _, _ = delay_pattern(codes, bos=dec.bos_token_id, pad=dec.pad_token_id)
    enc = tokenizer(data.captions[:n], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "decoder_input_ids": inputs.reshape(-1, inputs.shape[-1]), "audio_codes": codes[None]}


def musicgen_score(model: Any, *, inputs: dict[str, Any] | None = None, audio_weight: float = 1.0, **calibration: Any):
    """``score_fn`` for MusicGen: decoder logits KL to fp32 plus EnCodec's relative audio error.

    ``inputs``: calibration inputs (``calibration_from_tokens``); by default random ones
    (``calibration_inputs(model, **calibration)``). The KL (nats per codebook position) covers the text
    encoder and the decoder; the relative error of ``audio_encoder.decode`` on the calibration codes
    covers EnCodec, which the logits never see. Reference outputs are computed once, here, from
    ``model`` as it is (fp32). Each part is scoped (the KL to text encoder, decoder and projection; the
    audio error to EnCodec), so the planner skips the forward a converted group cannot change.
    """
    from kdq.quant.scores import OutputKL, RelativeError, SumOfScores

    x = inputs if inputs is not None else calibration_inputs(model, **calibration)

    def logits(m):
        return m(
            input_ids=x["input_ids"], attention_mask=x["attention_mask"], decoder_input_ids=x["decoder_input_ids"]
        ).logits

    def audio(m):
        return m.audio_encoder.decode(x["audio_codes"], [None]).audio_values

    lm_scope = ["text_encoder", "decoder", "enc_to_dec_proj"]
    return SumOfScores(
        [OutputKL(logits, model, scope=lm_scope), RelativeError(audio, model, scope=["audio_encoder"])],
        [1.0, audio_weight],
    )


def plan_stage(cfg: Any, model_dir: str, tokens: dict, folder: Path, *, progress: bool = True) -> dict:
    """Profile ``model_dir`` (the distilled student) on valid clips; the paper plan and kdq's plan at
    no more bytes, both measured; the frontier. Plans go to ``folder/{paper,kdq}_plan.json``."""
    from kdq.quant import MixedPrecisionPlanner
    from musicgen.files import plain
    from musicgen.models.musicgen import load_musicgen, load_tokenizer

    model = load_musicgen(model_dir)
    split = "valid" if "valid" in tokens["paths"] else "train"
    x = calibration_from_tokens(model, tokens["paths"][split], load_tokenizer(model_dir), n=cfg.calibration_clips)
    score = musicgen_score(model, inputs=x)
    groups = musicgen_groups(model, cfg.granularity)
    planner = MixedPrecisionPlanner(model, groups=groups, candidates=list(cfg.candidates))
    table = planner.profile(score, cache=folder / "profile_cache.json", progress=progress,
                            log=print if progress else None)
    table.save(folder / "sensitivity.json")
    paper = paper_plan()
    paper_measured = planner.measure(paper, score)
    kdq_plan = planner.solve(table, max_bytes=int(paper_measured["measured_bytes"]))
    kdq_measured = planner.measure(kdq_plan, score)
    paper.save(folder / "paper_plan.json")
    kdq_plan.save(folder / "kdq_plan.json")
    return {
        "paper_plan_file": str(folder / "paper_plan.json"), "kdq_plan_file": str(folder / "kdq_plan.json"),
        "calibration_split": split, "budget_bytes": int(paper_measured["measured_bytes"]), "groups": len(groups),
        "evaluations": planner.evaluations(),
        "fp32": {"bytes": int(table.total_bytes("fp32")), "sensitivity": 0.0},
        "paper_plan": {"bytes": int(paper_measured["measured_bytes"]),
                       "sensitivity": paper_measured["measured_sensitivity"], "measured": paper_measured},
        "kdq_plan": {"bytes": int(kdq_measured["measured_bytes"]), "sensitivity": kdq_measured["measured_sensitivity"],
                     "predicted_sensitivity": kdq_measured["predicted_sensitivity"], "measured": kdq_measured,
                     "assignments": dict(kdq_plan.assignments)},
        "frontier": [{"bytes": int(p["bytes"]), "sensitivity": float(p["sensitivity"])} for p in planner.frontier(table)],
        "sensitivity": plain(table.to_dict()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Profile a MusicGen and write a measured mixed-precision plan.")
    ap.add_argument("--model", required=True, help="MusicGen save_pretrained folder")
    ap.add_argument("--out", required=True, help="plan JSON to write")
    ap.add_argument("--granularity", default="layer", choices=GRANULARITIES)
    ap.add_argument("--candidates", default="fp32,fp16,bf16,int8")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--max-bytes", type=int)
    budget.add_argument("--max-sensitivity", type=float)
    budget.add_argument("--paper-size", action="store_true", help="budget = the paper plan's size (default)")
    ap.add_argument("--tokens", help="token file of held-in clips for calibration (default: random codes)")
    ap.add_argument("--clips", type=int, default=8, help="calibration clips taken from --tokens")
    ap.add_argument("--cache", help="profile cache JSON (resumable)")
    ap.add_argument("--batch", type=int, default=2, help="random calibration: prompts")
    ap.add_argument("--frames", type=int, default=16, help="random calibration: frames")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)

    import torch

    from kdq.quant import MixedPrecisionPlanner
    from musicgen.models.musicgen import load_musicgen, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_musicgen(args.model)
    if args.tokens:
        x = calibration_from_tokens(model, args.tokens, load_tokenizer(args.model), n=args.clips)
        score = musicgen_score(model, inputs=x)
    else:
        score = musicgen_score(model, batch=args.batch, frames=args.frames)
    planner = MixedPrecisionPlanner(model, musicgen_groups(model, args.granularity), candidates=args.candidates.split(","))
    table = planner.profile(score, cache=args.cache)
    paper = planner.measure(paper_plan(), score)
    if args.max_sensitivity is not None:
        plan = planner.solve(table, max_sensitivity=args.max_sensitivity)
    else:
        plan = planner.solve(table, max_bytes=args.max_bytes if args.max_bytes is not None else int(paper["measured_bytes"]))
    mine = planner.measure(plan, score)
    plan.meta["measured"] = {"bytes": mine["measured_bytes"], "sensitivity": mine["measured_sensitivity"]}
    plan.meta["paper_plan"] = {"bytes": paper["measured_bytes"], "sensitivity": paper["measured_sensitivity"]}
    plan.save(args.out)
    fp32 = table.total_bytes("fp32")
    print(f"fp32        {fp32 / 1e6:10.2f} MB")
    print(f"paper plan  {paper['measured_bytes'] / 1e6:10.2f} MB  sensitivity {paper['measured_sensitivity']:.4g}")
    print(f"planned     {mine['measured_bytes'] / 1e6:10.2f} MB  sensitivity {mine['measured_sensitivity']:.4g}"
          f" (predicted {mine['predicted_sensitivity']:.4g})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
