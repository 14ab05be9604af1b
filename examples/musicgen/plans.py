"""Precision plans and planner groups for MusicGen (``MusicgenForConditionalGeneration``).

- ``paper_plan()``: TinyMusician's hand-chosen plan as a kdq ``Plan`` (three rules).
- ``musicgen_groups(model, granularity)``: planner groups over the text encoder, the decoder's layers
  and EnCodec, at ``"part"`` (3 groups), ``"layer"`` or ``"sublayer"`` granularity.
"""

from __future__ import annotations

from typing import Any

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


def musicgen_score(model: Any, *, audio_weight: float = 1.0, **calibration: Any):
    """``score_fn`` for MusicGen: decoder logits KL to fp32 plus EnCodec's relative audio error.

    The KL (nats per codebook position) covers the text encoder and the decoder; the relative error
    of ``audio_encoder.decode`` on fixed codes covers EnCodec, which the logits never see.
    Reference outputs are computed once, here, from ``model`` as it is (fp32). Each part is scoped
    (the KL to text encoder, decoder and projection; the audio error to EnCodec), so the planner
    skips the forward a converted group cannot change.
    """
    from kdq.quant.scores import OutputKL, RelativeError, SumOfScores

    x = calibration_inputs(model, **calibration)

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
