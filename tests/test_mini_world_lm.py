"""Mini-world MusicGen pieces: delay pattern vs transformers, loss, no leakage, CFG dropout, resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musicgen.codec import CodecConfig, build_codec, kmeans_init
from musicgen.lm import (
    DecoderConfig,
    TokenDataset,
    TrainConfig,
    build_musicgen,
    codebook_ce,
    decoder_logits,
    delay_pattern,
    delayed_batch,
    evaluate_nll,
    train_loop,
    unigram_nll,
)
from musicgen.text import TextConfig, build_text_encoder, load_text

K, V = 4, 16
CAPTIONS = ["A slow Bach chorale in G minor played on piano, four-part harmony.",
            "Flute plays a fast folk reel in D major, a single melody line."]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    info = build_text_encoder(TextConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, pretrain_steps=3, batch_size=2),
                              CAPTIONS * 3, root / "text", progress=False)
    codec = build_codec(CodecConfig(num_filters=2, hidden_size=8, codebook_size=V))
    kmeans_init(codec, torch.randn(100, 8))
    codec.save_pretrained(root / "codec")
    return root, info


def tiny_model(root, seed=0):
    return build_musicgen(root / "text", root / "codec", DecoderConfig(hidden=16, layers=1, heads=2, ffn=32), seed=seed)


def toy_data(root, n=6, frames=12, seed=0) -> TokenDataset:
    tok, _ = load_text(root / "text")
    g = torch.Generator().manual_seed(seed)
    caps = [CAPTIONS[i % 2] for i in range(n)]
    enc = tok(caps, padding="max_length", max_length=24, return_tensors="pt")
    # Codes that depend on the caption: learnable, so training must lower the loss.
    base = torch.randint(V, (2, K, frames), generator=g)
    codes = torch.stack([base[i % 2] for i in range(n)])
    return TokenDataset(enc["input_ids"], enc["attention_mask"], codes, caps)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(K - 1, 12), seed=st.integers(0, 100))
def test_delay_pattern_matches_transformers(b, t, seed):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    # transformers applies the pattern only when max_length >= 2K - 1, i.e. t >= K - 1.
    pad = V
    codes = torch.randint(V, (b, K, t), generator=torch.Generator().manual_seed(seed))
    ours = delay_pattern(codes, pad_id=pad)
    lm = MusicgenForCausalLM(MusicgenDecoderConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   ffn_dim=8, num_codebooks=K, pad_token_id=pad, bos_token_id=pad))
    prompt = torch.cat([torch.full((b, K, 1), pad), codes], -1).reshape(b * K, t + 1)
    _, pattern = lm.build_delay_pattern_mask(prompt, pad_token_id=pad, max_length=t + K)
    assert torch.equal(ours.reshape(b * K, t + K), pattern)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 9), seed=st.integers(0, 100))
def test_delayed_labels_hold_every_code_once(b, t, seed):
    codes = torch.randint(V, (b, K, t), generator=torch.Generator().manual_seed(seed))
    dec_in, labels, mask = delayed_batch(codes, pad_id=V)
    assert dec_in.shape == (b * K, t + K - 1) and int(mask.sum()) == b * K * t
    assert torch.equal(labels[mask].view(b, K, t), codes)
    assert (labels[~mask] == -100).all()
    # The decoder input is the label sequence shifted right by one (teacher forcing).
    assert torch.equal(dec_in.view(b, K, -1)[..., 1:][mask[..., :-1]], labels[..., :-1][mask[..., :-1]])


def test_codebook_ce_matches_plain_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, K, 7, V, generator=g)
    labels = torch.randint(V, (3, K, 7), generator=g)
    mask = torch.rand(3, K, 7, generator=g) > 0.3
    ref = []
    for k in range(K):
        sel = mask[:, k]
        ref.append(torch.nn.functional.cross_entropy(logits[:, k][sel], labels[:, k][sel]))
    assert torch.allclose(codebook_ce(logits, labels.masked_fill(~mask, -100), mask), torch.stack(ref).mean(), atol=1e-6)


def test_no_label_leaks_into_its_own_logits(parts):
    root, _ = parts
    model = tiny_model(root).eval()
    data = toy_data(root, n=2, frames=6)
    batch = data.batch(torch.arange(2))
    logits, labels, mask = decoder_logits(model, batch)
    k, t = 2, 3  # change one code: it is label position k + t of codebook k
    changed = dict(batch, codes=batch["codes"].clone())
    changed["codes"][:, k, t] = (changed["codes"][:, k, t] + 1) % V
    logits2, labels2, _ = decoder_logits(model, changed)
    pos = k + t
    assert not torch.equal(labels[:, k, pos], labels2[:, k, pos])
    assert torch.allclose(logits[:, :, : pos + 1], logits2[:, :, : pos + 1], atol=1e-6)
    assert not torch.allclose(logits[:, :, pos + 1 :], logits2[:, :, pos + 1 :], atol=1e-6)


def test_cfg_dropout_removes_the_condition(parts):
    root, _ = parts
    model = tiny_model(root).eval()
    data = toy_data(root, n=2)
    a = decoder_logits(model, data.batch(torch.tensor([0, 0])), cfg_dropout=1.0)[0]
    b = decoder_logits(model, dict(data.batch(torch.tensor([0, 0])), input_ids=data.input_ids[[1, 1]],
                                   attention_mask=data.attention_mask[[1, 1]]), cfg_dropout=1.0)[0]
    kept = decoder_logits(model, data.batch(torch.tensor([0, 1])))[0]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(kept[0], kept[1], atol=1e-4)


def test_training_learns_keeps_text_frozen_and_resumes_exactly(parts, tmp_path):
    root, _ = parts
    data = toy_data(root)
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup=2, checkpoint_every=4, log_every=2)
    model = tiny_model(root)
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    before = evaluate_nll(model, data)["nll"]
    log = train_loop(model, data, cfg, tmp_path / "a", progress=False)
    assert evaluate_nll(model, data)["nll"] < before
    assert log["steps_done"] == 8 and len(log["curve"]) == 4
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, text_before[k]), k
    killed = tiny_model(root)
    log1 = train_loop(killed, data, cfg, tmp_path / "b", progress=False, max_seconds=0.0)
    assert log1["stopped_early"] and log1["steps_done"] == 1
    resumed = tiny_model(root)
    train_loop(resumed, data, cfg, tmp_path / "b", progress=False)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_token_dataset_roundtrip_and_unigram(parts, tmp_path):
    root, _ = parts
    data = toy_data(root)
    data.save(tmp_path / "t.safetensors")
    back = TokenDataset.load(tmp_path / "t.safetensors")
    assert torch.equal(back.codes, data.codes) and back.captions == data.captions
    assert torch.equal(back.input_ids, data.input_ids)
    uni = unigram_nll(data, data, vocab=V, alpha=0.0)
    c0 = data.codes[:, 0].flatten()
    p = torch.bincount(c0, minlength=V).double() / len(c0)
    assert uni["nll_first"] == pytest.approx(float(-(p[c0].log()).mean()), abs=1e-4)


def test_saved_model_loads_and_generates(parts, tmp_path):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    root, info = parts
    model = tiny_model(root).eval()
    model.save_pretrained(tmp_path / "m")
    back = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    tok = AutoTokenizer.from_pretrained(root / "text")
    assert len(tok) == info["vocab_size"]
    ids = tok(CAPTIONS, padding=True, return_tensors="pt")
    assert (ids["input_ids"] != tok.unk_token_id).all() and (ids["input_ids"][:, 0] > 2).all()
    data = toy_data(root, n=2)
    a = decoder_logits(model, data.batch(torch.arange(2)))[0]
    b = decoder_logits(back, data.batch(torch.arange(2)))[0]
    assert torch.allclose(a, b, atol=1e-6)
    audio = back.generate(**ids, max_new_tokens=10 + K - 1, do_sample=False, guidance_scale=3.0)
    assert audio.shape[0] == 2 and audio.shape[-1] == 10 * back.config.audio_encoder.sampling_rate // 50
