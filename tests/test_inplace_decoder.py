"""The in-place decoder (``musicgen.bundle.fast_decoder``): graphs against transformers' decoder, the
in-place loop against the merged-decoder loop, plans on the hand-written graphs, typed errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from kdq.export.onnx_export import validate_onnx  # noqa: E402
from kdq.export.precision import check_conformance, initializers, node_modules, weight_input  # noqa: E402
from kdq.quant import Plan  # noqa: E402
from musicgen.bundle import fast_decoder as fd  # noqa: E402
from musicgen.bundle.build import BundleError, export_bundle  # noqa: E402
from musicgen.bundle.device import device_run  # noqa: E402
from musicgen.bundle.runtime import BundleLoadError, GenerationArgError, MusicgenOnnx  # noqa: E402
from musicgen.models.tiny import build_tiny_musicgen, save_tiny_musicgen  # noqa: E402

PROMPTS = ["a calm piano chorale", "lively folk dance with violin and flute"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_musicgen(tmp_path_factory.mktemp("inplace") / "model")


@pytest.fixture(scope="module")
def both_bundle(tiny_model_dir, tmp_path_factory):
    """The tiny model exported with both decoders (fp32)."""
    out = tmp_path_factory.mktemp("inplace") / "both"
    return out, export_bundle(str(tiny_model_dir), out, progress=False, decoder="both")


@pytest.mark.parametrize("text_hidden", [32, 48])  # 48: the encoder states go through enc_to_dec_proj
def test_graphs_match_transformers_decoder(text_hidden, tmp_path):
    """Values of every output on first steps (S = 1 and 3) and pasts of 1, 5 and 8 positions, guidance
    batches of 1 and 2 prompts whose unconditional rows are fully masked."""
    import onnx

    model = build_tiny_musicgen(text_hidden=text_hidden)
    for name in fd.INPLACE_GRAPHS:
        path = tmp_path / f"{name}.onnx"
        onnx.save(fd.BUILDERS[name](model), str(path))
        sets = fd.cross_validation_sets(model) if name == "cross_kv" else fd.validation_sets(model)
        if name == "decoder_step":
            totals = sorted(int(f["total_sequence_length"]) - f["input_ids"].shape[1] for f in sets)
            assert totals == [0, 0, 1, 5, 8]
            assert all((f["encoder_attention_mask"][f["encoder_attention_mask"].shape[0] // 2:] == 0).all() for f in sets)
        report = validate_onnx(path, fd.reference(model, name), sets, output_names=fd.graph_outputs(model, name),
                               atol=1e-5, rtol=1e-5)
        assert max(report.max_diff.values()) < 1e-5


def test_fully_masked_row_gives_zero_cross_attention():
    """transformers' fully masked (unconditional) row: the cross keys and values are exactly zero."""
    model = build_tiny_musicgen()
    feed = fd.cross_feed(model, batch=1, text_len=4)
    feed["encoder_hidden_states"][1] = torch.randn(4, 32)  # even with non-zero states, the mask zeroes them
    with torch.no_grad():
        cross = fd.reference(model, "cross_kv")(*feed.values())
    assert all(float(t[1].abs().max()) == 0.0 for t in cross) and all(float(t[0].abs().max()) > 0 for t in cross)


def test_weighted_nodes_are_named_after_modules():
    model = build_tiny_musicgen(text_hidden=48)
    names = [n for n, _ in model.named_modules()]
    step = fd.build_decoder_step(model)
    cross = fd.build_cross_kv(model)
    counts = {}
    for g in (step, cross):
        inits = initializers(g.graph)
        mods = node_modules(g, names)
        weighted = [n for n in g.graph.node if weight_input(n, inits) is not None]
        assert all(mods[n.name] and mods[n.name] in names for n in weighted)
        counts[g.graph.name] = Counter(mods[n.name].rsplit(".", 1)[-1] for n in weighted)
    layers = model.decoder.config.num_hidden_layers
    assert counts["musicgen_decoder_step"] == Counter({"q_proj": 2 * layers, "k_proj": layers, "v_proj": layers,
                                                       "out_proj": 2 * layers, "fc1": layers, "fc2": layers,
                                                       **{str(k): 2 for k in range(4)}})  # embed_tokens.k, lm_heads.k
    assert counts["musicgen_cross_kv"] == Counter({"enc_to_dec_proj": 1, "k_proj": layers, "v_proj": layers})
    assert len(step.graph.node) < 20 * layers + 40  # the exported cached branch runs about 100 nodes per layer


def test_inplace_loop_equals_merged_loop(both_bundle):
    bundle, report = both_bundle
    assert report["decoder"] == "both" and {"cross_kv", "decoder_step", "decoder_model_merged"} <= set(report["parts"])
    assert max(report["parts"]["decoder_step"]["parity"]["max_abs_diff"].values()) < 1e-4
    merged, inplace = MusicgenOnnx(bundle, decoder="merged"), MusicgenOnnx(bundle)
    assert inplace.decoder_kind == "inplace" and "decoder_model_merged" not in inplace.sessions
    ids, mask = merged.tokenize(PROMPTS)
    hidden = merged.encode_text(ids, mask)
    for guidance in (3.0, None):
        a = merged.generate_codes(hidden, mask, max_new_tokens=40, guidance_scale=guidance)
        b = inplace.generate_codes(hidden, mask, max_new_tokens=40, guidance_scale=guidance)
        np.testing.assert_array_equal(a, b)
    a = merged.generate_codes(hidden[:1], mask[:1], max_new_tokens=30, do_sample=True, top_k=50, seed=3)
    b = inplace.generate_codes(hidden[:1], mask[:1], max_new_tokens=30, do_sample=True, top_k=50, seed=3)
    np.testing.assert_array_equal(a, b)
    frames = np.stack(list(inplace.code_frames(hidden, mask, max_new_tokens=40)), axis=-1)
    np.testing.assert_array_equal(frames, inplace.generate_codes(hidden, mask, max_new_tokens=40))


def test_int8_bundle_codes_equal_merged_and_plans_conform(tiny_model_dir, tmp_path):
    plan = Plan({"text_encoder": "int8", "decoder": "int8"})
    report = export_bundle(str(tiny_model_dir), tmp_path / "b", plan=plan, progress=False, decoder="both")
    for name in fd.INPLACE_GRAPHS:
        entry = report["parts"][name]
        assert entry["conformance"]["conforms"] and entry["dtype"] == "int8"
        assert entry["file"].endswith("_quantized.onnx")
    snr = report["parts"]["decoder_step"]["parity"]["snr_db_and_max_abs_diff"]["logits"]["snr_db"]
    assert snr > 30
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["kdq_inplace_decoder"]["decoder_step"] == {"file": "onnx/decoder_step_quantized.onnx", "dtype": "q8"}
    merged, inplace = MusicgenOnnx(tmp_path / "b", decoder="merged"), MusicgenOnnx(tmp_path / "b")
    ids, mask = merged.tokenize(PROMPTS[:1])
    hidden = merged.encode_text(ids, mask)
    np.testing.assert_array_equal(merged.generate_codes(hidden, mask, max_new_tokens=40),
                                  inplace.generate_codes(hidden, mask, max_new_tokens=40))


@pytest.mark.parametrize("block", [16, 32])
def test_int4_plan_conforms_on_the_graphs(block, tmp_path):
    model = build_tiny_musicgen(text_hidden=48)
    names = [n for n, _ in model.named_modules()]
    plan = Plan({"decoder": "int4", "enc_to_dec_proj": "int8",
                 "decoder.model.decoder.layers.0.self_attn.k_proj": "fp32"})
    (tmp_path / "onnx").mkdir()
    report = fd.export_inplace(model, tmp_path / "onnx", plan, int4_block_size=block)
    import onnx

    for name, entry in report.items():
        assert entry["conformance"]["conforms"] and entry["dtype"] == "int4"
        g = onnx.load(str(tmp_path / entry["file"]))
        assert check_conformance(g, plan, names).violations == []
        nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(next(a.i for a in n.attribute if a.name == "block_size") == block for n in nbits)
    step = onnx.load(str(tmp_path / report["decoder_step"]["file"]))
    def ops(scope):
        return {n.op_type for n in step.graph.node if n.name.startswith(scope + "/")}

    assert ops("/decoder/model/decoder/layers.0/self_attn/k_proj") == {"MatMul"}  # fp32 by its own rule
    assert ops("/decoder/model/decoder/layers.0/self_attn/q_proj") == {"MatMulNBits"}
    assert report["decoder_step"]["parity"]["snr_db_and_max_abs_diff"]["logits"]["snr_db"] > 15


def test_device_run_on_an_inplace_bundle(tiny_model_dir, tmp_path):
    export_bundle(str(tiny_model_dir), tmp_path / "b", progress=False, decoder="inplace")
    files = {p.name for p in (tmp_path / "b" / "onnx").iterdir()}
    assert "decoder_model_merged.onnx" not in files and {"cross_kv.onnx", "decoder_step.onnx"} <= files
    for ort_format, stream in ((False, True), (True, False)):
        res = device_run(tmp_path / "b", "gentle harp solo", seconds=0.4, out=tmp_path / "a.wav", threads=1, greedy=True,
                         ort_format=ort_format, stream=stream, window=10, overlap=2)
        assert set(res["bundle_bytes"]) == {"text_encoder", "cross_kv", "decoder_step", "encodec_decode"}
        assert res["decoder_steps"] == 20 + 3 and res["rtf"] > 0


def test_bad_options_are_typed(tiny_bundle, both_bundle, tiny_model_dir, tmp_path):
    with pytest.raises(BundleError, match="decoder='fast'"):
        export_bundle(str(tiny_model_dir), tmp_path / "x", progress=False, decoder="fast")
    with pytest.raises(fd.InplaceDecoderError, match="plan=.*fp16"):
        export_bundle(str(tiny_model_dir), tmp_path / "y", plan=Plan({"decoder": "fp16"}), progress=False, decoder="inplace")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(fd.InplaceDecoderError, match="multiple of 8"):
        fd.build_decoder_step(build_tiny_musicgen(decoder_hidden=24, decoder_heads=4))
    with pytest.raises(BundleLoadError, match="decoder='inplace'"):
        MusicgenOnnx(tiny_bundle[1], decoder="inplace")
    with pytest.raises(BundleLoadError, match="decoder='fast'"):
        MusicgenOnnx(both_bundle[0], decoder="fast")
    rt = MusicgenOnnx(both_bundle[0])
    ids, mask = rt.tokenize(PROMPTS[:1])
    with pytest.raises(GenerationArgError, match="max_new_tokens"):
        rt.generate_codes(rt.encode_text(ids, mask), mask, max_new_tokens=rt.max_positions + 1)
