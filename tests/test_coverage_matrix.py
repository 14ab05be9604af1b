"""Issue 23 item 4: kdq on the architectures users bring, one test per (architecture, cell).

Architectures (tiny random configs from transformers' config classes; no hub): Llama, Qwen2, GPT-2,
T5 (seq2seq), Whisper (speech seq2seq), ViT (image classification), BERT (masked LM), MusicGen
(text encoder + decoder + EnCodec, ``MusicgenForConditionalGeneration``). Hidden <= 64, 1-2 layers,
vocab <= 128.

Cells:

- ``kd``: ``StageMixedKL`` on the logits, teacher a second random model of the same config: finite
  loss, finite gradient reaching the student's parameters (none reaching the teacher).
- ``plan``: ``MixedPrecisionPlanner`` profiled with ``OutputKL`` on two calibration batches, solved
  under half the fp32 bytes; the applied plan has exactly the predicted bytes and runs.
- ``apply-<dtype>``: ``apply_plan(Plan(default=dtype))`` for every kdq dtype; the model runs and its
  logits keep an SNR over the fp32 logits of at least ``LOGIT_SNR_FLOOR_DB[dtype]`` (fp32: equal).
- ``save``: ``save_pretrained`` of a mixed plan (int8 default, int4, fp16, bf16 groups), then
  ``load_quantized``: the same tensors and the same logits, exactly; plain ``from_pretrained`` refuses.
- ``onnx``: the teacher-forced forward (logits) exported by ``kdq.export.export_onnx`` and validated
  by ``validate_onnx`` on other shapes (fp32, atol 1e-4); the mixed plan without bf16 applied by
  ``apply_plan_onnx`` (conformance checked there) and measured by ``compare_onnx`` against fp32
  PyTorch (SNR floor ``ONNX_PLAN_SNR_FLOOR_DB``); a bf16 plan is refused with ``PlanExportError``.

The table of results is docs/coverage.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from kdq import StageMixedKL
from kdq.dtypes import DTYPES
from kdq.quant import (
    MixedPrecisionPlanner,
    ModelFolderError,
    OutputKL,
    Plan,
    apply_plan,
    default_groups,
    load_quantized,
    model_bytes,
    model_fingerprint,
)
from kdq.quant.dtypes import sqnr_db

transformers = pytest.importorskip("transformers")

#: Logit SNR floors (dB) of a whole model converted to one dtype, against its fp32 logits: about 10 dB
#: under the lowest measured over the eight tiny models (docs/coverage.md has the measured range).
LOGIT_SNR_FLOOR_DB = {"fp32": math.inf, "fp16": 45.0, "bf16": 25.0, "int8": 22.0, "int4": 5.0}
#: The ONNX mixed plan (int8 default, one int4 and one fp16 group; ONNX Runtime also quantizes the
#: int8 MatMuls' inputs per call) against fp32 PyTorch.
ONNX_PLAN_SNR_FLOOR_DB = 8.0


# ---------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """A tiny architecture: how to build it, feed it and export its logits.

    ``feed(seed, batch, length)`` returns the forward's keyword arguments in the order the ONNX graph
    takes them; ``dynamic`` names their dynamic axes.
    """

    name: str
    build: Callable[[], nn.Module]
    feed: Callable[[int, int, int], dict[str, torch.Tensor]]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    export_shapes: tuple[int, int] = (2, 5)
    validate_shapes: tuple[tuple[int, int], ...] = ((1, 7), (3, 4))
    onnx_int4: bool = True  # False: the layers export as Gemm, which has no 4-bit form in ONNX Runtime


def _ids(seed: int, batch: int, length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _mask(batch: int, length: int) -> torch.Tensor:
    m = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 2:
        m[-1, -2:] = 0  # a padded row
    return m


V = 128
BATCH_SEQ = {0: "batch", 1: "seq"}


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, use_cache=False))


def _qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, use_cache=False))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False))


def _bert() -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))


def _t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False))


WHISPER_FRAMES = 32  # 2 x max_source_positions: Whisper's encoder takes exactly this many frames


def _whisper() -> nn.Module:
    return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=V, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=WHISPER_FRAMES // 2,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
        suppress_tokens=None, begin_suppress_tokens=None, use_cache=False))


def _vit() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10))


MG_CODEBOOKS, MG_VOCAB = 4, 64


def _musicgen() -> nn.Module:
    t5 = transformers.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    enc = transformers.EncodecConfig(sampling_rate=8000, num_filters=4, hidden_size=16, codebook_size=MG_VOCAB,
                                     upsampling_ratios=[5, 4, 4, 2], target_bandwidths=[1.6], num_lstm_layers=1,
                                     codebook_dim=16)
    dec = transformers.MusicgenDecoderConfig(vocab_size=MG_VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, ffn_dim=64, num_codebooks=MG_CODEBOOKS,
                                             max_position_embeddings=64, pad_token_id=MG_VOCAB,
                                             bos_token_id=MG_VOCAB, use_cache=False)
    cfg = transformers.MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict())
    cfg.decoder_start_token_id = MG_VOCAB
    cfg.pad_token_id = MG_VOCAB
    return transformers.MusicgenForConditionalGeneration(cfg)


def _lm_feed(seed, b, t):
    return {"input_ids": _ids(seed, b, t, V), "attention_mask": _mask(b, t)}


def _bert_feed(seed, b, t):
    return {"input_ids": _ids(seed, b, t, V), "attention_mask": _mask(b, t),
            "token_type_ids": torch.zeros(b, t, dtype=torch.long)}


def _t5_feed(seed, b, t):
    return {"input_ids": _ids(seed, b, t, V), "attention_mask": _mask(b, t),
            "decoder_input_ids": _ids(seed + 1, b, t + 1, V)}


def _whisper_feed(seed, b, t):
    g = torch.Generator().manual_seed(seed)
    # decoder_attention_mask given: without it, transformers' mask code looks for packed sequences
    # with torch.diff, which the TorchScript ONNX exporter cannot export (docs/coverage.md)
    return {"input_features": torch.randn(b, 16, WHISPER_FRAMES, generator=g),
            "decoder_input_ids": _ids(seed + 1, b, t, V), "decoder_attention_mask": torch.ones(b, t, dtype=torch.long)}


def _vit_feed(seed, b, t):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(b, 3, 16, 16, generator=g)}


def _musicgen_feed(seed, b, t):
    return {"input_ids": _ids(seed, b, t, V), "attention_mask": _mask(b, t),
            "decoder_input_ids": _ids(seed + 1, b * MG_CODEBOOKS, t + 2, MG_VOCAB)}


ARCHS = {a.name: a for a in [
    Arch("llama", _llama, _lm_feed, {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ}),
    Arch("qwen2", _qwen2, _lm_feed, {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ}),
    Arch("gpt2", _gpt2, _lm_feed, {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ}, onnx_int4=False),
    Arch("bert", _bert, _bert_feed, {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ, "token_type_ids": BATCH_SEQ}),
    Arch("t5", _t5, _t5_feed, {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ,
                               "decoder_input_ids": {0: "batch", 1: "dec_seq"}}),
    Arch("whisper", _whisper, _whisper_feed, {"input_features": {0: "batch"},
                                              "decoder_input_ids": {0: "batch", 1: "dec_seq"},
                                              "decoder_attention_mask": {0: "batch", 1: "dec_seq"}}),
    Arch("vit", _vit, _vit_feed, {"pixel_values": {0: "batch"}}),
    Arch("musicgen", _musicgen, _musicgen_feed, {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ,
                                                 "decoder_input_ids": {0: "batch_x_codebooks", 1: "dec_seq"}}),
]}


def built(arch: Arch, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return arch.build().eval()


def logits(model: nn.Module, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**feed).logits


def mixed_plan(model: nn.Module, *, bf16: bool = True, int4: str = "int4") -> Plan:
    """int8 by default; of the default groups holding a Linear, the first ``int4`` and the last fp16;
    the first group without one (an embedding) bf16 if asked."""
    groups = default_groups(model)
    modules = dict(model.named_modules())

    def has_linear(g: str) -> bool:
        return any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in modules[g].modules())

    linear = [g for g in groups if has_linear(g)]
    rules = {linear[0]: int4, linear[-1]: "fp16"}
    other = [g for g in groups if g not in rules]
    if bf16:
        rules[other[0]] = "bf16"
    return Plan(rules, default="int8", model={"fingerprint": model_fingerprint(model)})


@contextlib.contextmanager
def positional_logits(model: nn.Module, names: list[str]) -> Iterator[nn.Module]:
    """``model`` itself, called with positional tensors in ``names`` order, returning only the logits.

    The forward is replaced on the instance rather than wrapped, so the exporter's node scopes are the
    model's own module names (``/model/layers.0/self_attn/q_proj/MatMul``) and the plan's rules select
    them without a prefix.
    """
    cls_forward = type(model).forward

    def forward(*args: torch.Tensor) -> torch.Tensor:
        return cls_forward(model, **dict(zip(names, args))).logits

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


# ---------------------------------------------------------------------------- cells
def cell_kd(arch: Arch) -> None:
    student, teacher = built(arch, 0), built(arch, 1)
    feed = arch.feed(0, 2, 5)
    with torch.no_grad():
        t = logits(teacher, feed)
    s = logits(student, feed)
    assert s.shape == t.shape and s.shape[-1] >= 10
    kd = StageMixedKL(total_steps=10, compile=False)
    loss = kd(s, t, step=0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the student"
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def cell_plan(arch: Arch) -> None:
    model = built(arch)
    batches = [arch.feed(10, 2, 6), arch.feed(11, 2, 4)]

    def calib(m: nn.Module) -> torch.Tensor:  # both calibration batches, positions flattened
        return torch.cat([logits(m, b).reshape(-1, logits(m, b).shape[-1]) for b in batches])

    with torch.no_grad():
        ref = logits(model, batches[0])
        planner = MixedPrecisionPlanner(model, candidates=list(DTYPES))
        table = planner.profile(OutputKL(calib, model), progress=False, log=None)
        budget = model_bytes(model) // 2
        plan = planner.solve(table, max_bytes=budget)
    assert plan.predicted["bytes"] <= budget
    assert set(plan.groups) == set(planner.groups)
    fresh = built(arch)
    apply_plan(fresh, Plan.from_json(plan.to_json()))
    assert model_bytes(fresh) == plan.predicted["bytes"]
    with torch.no_grad():
        out = logits(fresh, batches[0])
    assert out.shape == ref.shape and torch.isfinite(out).all()


def cell_apply(arch: Arch, dtype: str) -> None:
    feed = arch.feed(3, 2, 6)
    model = built(arch)
    with torch.no_grad():
        ref = logits(model, feed)
        apply_plan(model, Plan(default=dtype))
        out = logits(model, feed)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if dtype == "fp32":
        assert torch.equal(out, ref)
    else:
        snr = sqnr_db(ref.float(), out.float())
        print(f"{arch.name} {dtype} logits SNR {snr:.1f} dB")
        assert snr >= LOGIT_SNR_FLOOR_DB[dtype], f"{arch.name} {dtype}: logits SNR {snr:.1f} dB"


def cell_save(arch: Arch, tmp_path) -> None:
    feed = arch.feed(4, 2, 6)
    model = built(arch)
    apply_plan(model, mixed_plan(model))
    with torch.no_grad():
        want = logits(model, feed)
    model.save_pretrained(tmp_path / "m")
    back = load_quantized(tmp_path / "m")
    assert type(back) is type(model)
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(logits(back, feed), want)
    auto = getattr(transformers, type(model).__name__)
    with pytest.raises(ModelFolderError, match="load_quantized"):
        auto.from_pretrained(tmp_path / "m")


def cell_onnx(arch: Arch, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from kdq.export import PlanConformanceError, PlanExportError, apply_plan_onnx, compare_onnx, export_onnx, validate_onnx

    model = built(arch)
    names = list(arch.feed(0, 1, 2))
    module_names = [n for n, _ in model.named_modules()]
    b, t = arch.export_shapes
    checks = [arch.feed(20 + i, bb, tt) for i, (bb, tt) in enumerate(arch.validate_shapes)]
    dynamic = dict(arch.dynamic, logits={0: "batch"})
    with positional_logits(model, names) as view:
        path = export_onnx(view, arch.feed(0, b, t), tmp_path / f"{arch.name}.onnx", output_names=["logits"],
                           dynamic_axes=dynamic)
        validate_onnx(path, view, checks, output_names=["logits"], atol=1e-4, rtol=1e-4)
        graph = onnx.load(str(path))
        if not arch.onnx_int4:  # transformers' Conv1D exports as Gemm: refused, naming the modules
            with pytest.raises(PlanConformanceError, match=r"c_attn.*wants int4, carries fp32"):
                apply_plan_onnx(graph, mixed_plan(model, bf16=False), module_names)
        plan = mixed_plan(model, bf16=False, int4="int4" if arch.onnx_int4 else "int8")
        planned, report = apply_plan_onnx(graph, plan, module_names)
        assert not report.violations
        assert {"int8", "fp16"} | ({"int4"} if arch.onnx_int4 else set()) <= set(report.nodes), report.nodes
        print(f"{arch.name} onnx nodes {report.nodes}")
        onnx.save_model(planned, str(tmp_path / "planned.onnx"))
        snr = compare_onnx(tmp_path / "planned.onnx", view, checks, output_names=["logits"])["logits"]["snr_db"]
        print(f"{arch.name} planned onnx SNR {snr} dB")
        assert snr >= ONNX_PLAN_SNR_FLOOR_DB, f"{arch.name}: planned ONNX logits SNR {snr} dB"
    with pytest.raises(PlanExportError, match="bf16"):
        apply_plan_onnx(graph, Plan(default="bf16"), module_names)


CELLS = ["kd", "plan", *(f"apply-{d}" for d in DTYPES), "save", "onnx"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cell(arch, cell, tmp_path):
    spec = ARCHS[arch]
    if cell.startswith("apply-"):
        cell_apply(spec, cell.removeprefix("apply-"))
    elif cell in ("save", "onnx"):
        {"save": cell_save, "onnx": cell_onnx}[cell](spec, tmp_path)
    else:
        {"kd": cell_kd, "plan": cell_plan}[cell](spec)
