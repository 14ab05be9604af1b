"""MusicGen fp32 bundle and the ONNX Runtime generation loop, against transformers' generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from musicgen.bundle.build import export_bundle  # noqa: E402
from musicgen.bundle.runtime import (  # noqa: E402
    BundleLoadError,
    GenerationArgError,
    MusicgenOnnx,
    apply_delay_pattern,
    build_delay_pattern,
    sample_next,
)
from musicgen.files import write_wav  # noqa: E402
from musicgen.models.tiny import save_tiny_musicgen  # noqa: E402

PROMPTS = ["a calm piano chorale", "lively folk dance with violin and flute"]


def _text_inputs(tok, prompts):
    """input_ids and attention_mask only (tokenizers saved by transformers 5 add token_type_ids in 4.5x)."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model_dir, _, _ = tiny_bundle
    model = MusicgenForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def test_bundle_layout_and_report(tiny_bundle):
    _, bundle, report = tiny_bundle
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "export_report.json",
            "onnx/text_encoder.onnx", "onnx/decoder_model_merged.onnx", "onnx/encodec_decode.onnx"} <= names
    assert not any(n.startswith("_graphs") or n.endswith(".tmp") for n in names)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["transformers.js_config"]["dtype"] == {"text_encoder": "fp32", "decoder_model_merged": "fp32", "encodec_decode": "fp32"}
    assert cfg["decoder"]["num_codebooks"] == 4
    on_disk = json.loads((bundle / "export_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    parts = report["parts"]
    assert parts["decoder_model_merged"]["bytes"] == (bundle / "onnx/decoder_model_merged.onnx").stat().st_size
    assert max(parts["decoder_model_merged"]["parity"]["cached_step"]["max_abs_diff"].values()) < 1e-4
    assert max(parts["decoder_model_merged"]["parity"]["first_step"]["max_abs_diff"].values()) < 1e-4
    assert parts["text_encoder"]["parity"]["max_abs_diff"]["last_hidden_state"] < 1e-4
    import onnx

    merged = onnx.load(str(bundle / "onnx/decoder_model_merged.onnx"))
    assert [i.name for i in merged.graph.input][-1] == "use_cache_branch"
    assert [n.op_type for n in merged.graph.node] == ["If"]


def test_greedy_cfg_matches_transformers_generate(tiny_bundle, reference):
    _, bundle, _ = tiny_bundle
    model, tok = reference
    n = 24
    inputs = _text_inputs(tok, PROMPTS)
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=n).numpy()
    rt = MusicgenOnnx(bundle, threads=1)
    ids, mask = rt.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, inputs["input_ids"].numpy())
    audio = rt.generate(PROMPTS, max_new_tokens=n, guidance_scale=3.0)
    assert audio.shape == ref.shape == (2, 1, (n - 3) * 640)
    np.testing.assert_allclose(audio, ref, atol=1e-4, rtol=0)
    # the check means something: prompts change the audio far beyond the tolerance
    assert np.abs(audio[0] - audio[1]).max() > 100 * 1e-4
    # with IO binding (the cache kept in OrtValues) the loop gives the same numbers
    bound = MusicgenOnnx(bundle, threads=1, io_binding=True).generate(PROMPTS, max_new_tokens=n, guidance_scale=3.0)
    np.testing.assert_array_equal(bound, audio)


def test_no_guidance_matches_generate(tiny_bundle, reference):
    _, bundle, _ = tiny_bundle
    model, tok = reference
    inputs = _text_inputs(tok, PROMPTS[:1])
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, guidance_scale=1.0, max_new_tokens=12).numpy()
    audio = MusicgenOnnx(bundle).generate(PROMPTS[:1], max_new_tokens=12, guidance_scale=1.0)
    np.testing.assert_allclose(audio, ref, atol=1e-4, rtol=0)


def test_sampling_is_seeded(tiny_bundle):
    _, bundle, _ = tiny_bundle
    rt = MusicgenOnnx(bundle)
    ids, mask = rt.tokenize(PROMPTS[:1])
    hidden = rt.encode_text(ids, mask)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, top_p=0.95)
    a = rt.generate_codes(hidden, mask, seed=1, **kw)
    b = rt.generate_codes(hidden, mask, seed=1, **kw)
    c = rt.generate_codes(hidden, mask, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = rt.generate_codes(hidden, mask, max_new_tokens=16)
    top1 = rt.generate_codes(hidden, mask, max_new_tokens=16, do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(greedy, top1)
    assert a.shape == (1, 4, 13)


def test_delay_pattern_matches_transformers(reference):
    model, _ = reference
    for max_length in (7, 8, 13):
        bos = torch.full((2 * 4, 1), 2048)
        _, ref = model.decoder.build_delay_pattern_mask(bos, pad_token_id=2048, max_length=max_length)
        np.testing.assert_array_equal(build_delay_pattern(8, 4, 2048, max_length), ref.numpy())
    pattern = build_delay_pattern(4, 4, 9, 8)
    ids = np.arange(4 * 8).reshape(4, 8)
    out = apply_delay_pattern(ids, pattern)
    assert out[3, 3] == 9 and out[3, 4] == ids[3, 4] and out[0, 7] == 9 and out[0, 4] == ids[0, 4]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(2, 40), k=st.integers(1, 40), p=st.floats(0.05, 1.0), seed=st.integers(0, 10**6))
def test_sample_next_respects_top_k_and_top_p(rows, vocab, k, p, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    tok = sample_next(logits, rng=np.random.default_rng(seed), top_k=k, top_p=p)
    assert tok.shape == (rows,) and ((0 <= tok) & (tok < vocab)).all()
    order = np.argsort(-logits, axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for r in range(rows):
        rank = int(np.where(order[r] == tok[r])[0][0])
        assert rank < k  # inside the top-k
        before = probs[r, order[r, :rank]].sum()
        assert rank == 0 or before < p + 1e-6  # inside the top-p nucleus
    np.testing.assert_array_equal(sample_next(logits, rng=None), logits.argmax(-1))
    np.testing.assert_array_equal(sample_next(logits, rng=np.random.default_rng(seed), top_k=1), logits.argmax(-1))


def test_bad_arguments_are_typed(tiny_bundle, tmp_path):
    _, bundle, _ = tiny_bundle
    with pytest.raises(BundleLoadError, match="config.json"):
        MusicgenOnnx(tmp_path)
    with pytest.raises(BundleLoadError, match="decoder_model_merged_fp16.onnx"):
        MusicgenOnnx(bundle, dtypes={"decoder_model_merged": "fp16"})
    rt = MusicgenOnnx(bundle)
    with pytest.raises(GenerationArgError, match="max_new_tokens"):
        rt.generate("piano", max_new_tokens=5)
    with pytest.raises(GenerationArgError, match="temperature"):
        rt.generate("piano", max_new_tokens=12, do_sample=True, temperature=0.0)
    # each of these used to run (NaN guidance gave NaN logits and argmax 0; top_k -5 sliced the
    # vocabulary from the end; [] reached the text encoder with a batch of 0)
    for kwargs, arg in (({"do_sample": True, "temperature": float("nan")}, "temperature"),
                        ({"guidance_scale": float("nan")}, "guidance_scale"),
                        ({"guidance_scale": -1.0}, "guidance_scale"),
                        ({"top_k": -5}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_p": float("nan")}, "top_p")):
        with pytest.raises(GenerationArgError, match=arg):
            rt.generate("piano", max_new_tokens=12, **kwargs)
    with pytest.raises(GenerationArgError, match="prompts"):
        rt.generate([], max_new_tokens=12)


def test_write_wav_roundtrip(tmp_path):
    import soundfile as sf

    audio = np.sin(np.linspace(0, 100, 3200, dtype=np.float32))[None] * 0.5
    path = write_wav(tmp_path / "a.wav", audio, 32000)
    data, sr = sf.read(path, dtype="float32")
    assert sr == 32000 and data.shape == (3200,)
    np.testing.assert_allclose(data, audio[0], atol=1 / 2**15 + 1e-6)


def test_failed_export_leaves_previous_bundle(tiny_bundle, tmp_path, monkeypatch):
    import musicgen.bundle.build as build
    from kdq.export import OnnxParityError

    model_dir, bundle, _ = tiny_bundle
    out = tmp_path / "bundle"
    export_bundle(str(model_dir), out, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def failing(*args, **kwargs):
        raise OnnxParityError("forced", output="logits", max_diff=1.0, atol=1e-4, rtol=0.0)

    monkeypatch.setattr(build, "validate_onnx", failing)
    with pytest.raises(OnnxParityError):
        export_bundle(str(model_dir), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_export_never_deletes_files_it_did_not_write(tiny_bundle, tmp_path):
    """Regression: exporting into an existing folder removed every file the user had there."""
    from musicgen.bundle.build import BundleError

    model_dir, _, _ = tiny_bundle
    user = tmp_path / "my_folder"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(BundleError, match="kdq never deletes files it did not write"):
        export_bundle(str(model_dir), user, progress=False)
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    # over an earlier bundle, only that bundle's own files are replaced; a file added since is kept
    out = tmp_path / "bundle"
    export_bundle(str(model_dir), out, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "onnx" / "text_encoder.onnx").write_bytes(b"stale")
    report = export_bundle(str(model_dir), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "onnx" / "text_encoder.onnx").stat().st_size > 100
    assert "notes.txt" not in report["files"] and "onnx/text_encoder.onnx" in report["files"]


def test_plan_rules_that_match_nothing_are_refused_by_export(tiny_bundle, tmp_path):
    """Regression: Plan({"text_encoderr": "int8"}) exported an all-fp32 bundle without a word."""
    from kdq.quant import Plan, PlanError

    model_dir, _, _ = tiny_bundle
    with pytest.raises(PlanError, match="did you mean 'text_encoder'"):
        export_bundle(str(model_dir), tmp_path / "b", plan=Plan({"text_encoderr": "int8"}), progress=False)
    assert not (tmp_path / "b").exists()


def test_staging_folders_of_killed_exports_are_swept(tiny_bundle, tmp_path):
    """Regression: a SIGKILL during export left a bundle-sized staging folder forever."""
    import os

    model_dir, _, _ = tiny_bundle
    dead, alive = tmp_path / ".b.export-dead", tmp_path / ".b.export-alive"
    for folder, pid in ((dead, 2**22 + 12345), (alive, os.getpid())):
        folder.mkdir()
        (folder / "pid").write_text(str(pid))
        (folder / "big.onnx").write_bytes(b"0" * 1000)
    export_bundle(str(model_dir), tmp_path / "b", progress=False)
    assert not dead.exists() and alive.exists()  # an export still running (its process lives) is left alone


def test_projected_encoder_states_match_generate(tmp_path):
    """T5 width != decoder width: the decoder graph carries enc_to_dec_proj and the mask product."""
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model_dir = save_tiny_musicgen(tmp_path / "model", seed=1, text_hidden=48)
    export_bundle(str(model_dir), tmp_path / "bundle", progress=False)
    model = MusicgenForConditionalGeneration.from_pretrained(model_dir).eval()
    assert model.enc_to_dec_proj is not None
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = _text_inputs(tok, PROMPTS)
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=12).numpy()
    audio = MusicgenOnnx(tmp_path / "bundle").generate(PROMPTS, max_new_tokens=12, guidance_scale=3.0)
    np.testing.assert_allclose(audio, ref, atol=1e-4, rtol=0)
