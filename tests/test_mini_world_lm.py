"""Mini-world MusicGen pieces: delay pattern vs transformers, loss, no leakage, CFG dropout, resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musicgen.config import CodecConfig, DecoderConfig, TextConfig, TrainConfig
from musicgen.data.tokens import TokenDataset, delay_pattern
from musicgen.eval.heldout import heldout, unigram_nll
from musicgen.models.codec import build_codec, kmeans_init
from musicgen.models.musicgen import build_musicgen
from musicgen.models.text import build_text_encoder, load_text, train_tokenizer
from musicgen.train.loop import train
from musicgen.train.objectives import LMObjective, codebook_ce, conditioned_logits

K, V = 4, 16
CAPTIONS = ["A slow Bach chorale in G minor played on piano, four-part harmony.",
            "Flute plays a fast folk reel in D major, a single melody line."]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tok = train_tokenizer(CAPTIONS * 3)
    build_text_encoder(TextConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32), len(tok)).save_pretrained(root / "text")
    tok.save_pretrained(root / "text")
    info = {"vocab_size": len(tok)}
    codec = build_codec(CodecConfig(num_filters=2, hidden_size=8, codebook_size=V))
    kmeans_init(codec, torch.randn(100, 8))
    codec.save_pretrained(root / "codec")
    return root, info


def tiny_model(root, seed=0):
    return build_musicgen(root / "text", root / "codec", DecoderConfig(hidden=16, layers=1, heads=2, ffn=32), seed=seed)


def toy_data(root, n=6, frames=12, seed=0) -> TokenDataset:
    g = torch.Generator().manual_seed(seed)
    caps = [CAPTIONS[i % 2] for i in range(n)]
    # Codes that depend on the caption: learnable, so training must lower the loss.
    base = torch.randint(V, (2, K, frames), generator=g)
    return TokenDataset(torch.stack([base[i % 2] for i in range(n)]), caps)


def logits_of(model, root, data: TokenDataset, drop: bool = False):
    tok, _ = load_text(root / "text")
    return conditioned_logits(model, tok, data.codes, data.captions, torch.full((len(data),), drop))


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(K - 1, 12), seed=st.integers(0, 100))
def test_delay_pattern_matches_transformers(b, t, seed):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    # transformers applies the pattern only when max_length >= 2K - 1, i.e. t >= K - 1.
    pad = V
    codes = torch.randint(V, (b, K, t), generator=torch.Generator().manual_seed(seed))
    inputs, labels, mask = delay_pattern(codes, bos=pad, pad=pad)
    ours = torch.cat([inputs, labels[..., -1:]], -1)  # the delayed sequence: BOS, then the labels
    lm = MusicgenForCausalLM(MusicgenDecoderConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   ffn_dim=8, num_codebooks=K, pad_token_id=pad, bos_token_id=pad))
    prompt = torch.cat([torch.full((b, K, 1), pad), codes], -1).reshape(b * K, t + 1)
    _, pattern = lm.build_delay_pattern_mask(prompt, pad_token_id=pad, max_length=t + K)
    assert torch.equal(ours.reshape(b * K, t + K), pattern)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 9), seed=st.integers(0, 100))
def test_delayed_labels_hold_every_code_once(b, t, seed):
    codes = torch.randint(V, (b, K, t), generator=torch.Generator().manual_seed(seed))
    dec_in, labels, mask = delay_pattern(codes, bos=V, pad=V)
    assert dec_in.shape == (b, K, t + K - 1) and int(mask.sum()) == b * K * t
    assert torch.equal(labels[mask].view(b, K, t), codes)
    assert (labels[~mask] == V).all()
    # The decoder input is the label sequence shifted right by one (teacher forcing).
    assert torch.equal(dec_in[..., 1:][mask[..., :-1]], labels[..., :-1][mask[..., :-1]])


def test_codebook_ce_matches_plain_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, K, 7, V, generator=g)
    labels = torch.randint(V, (3, K, 7), generator=g)
    mask = torch.rand(3, K, 7, generator=g) > 0.3
    ref = []
    for k in range(K):
        sel = mask[:, k]
        ref.append(torch.nn.functional.cross_entropy(logits[:, k][sel], labels[:, k][sel]))
    assert torch.allclose(codebook_ce(logits, labels, mask), torch.stack(ref).mean(), atol=1e-6)


def test_no_label_leaks_into_its_own_logits(parts):
    root, _ = parts
    model = tiny_model(root).eval()
    data = toy_data(root, n=2, frames=6)
    logits, labels, mask = logits_of(model, root, data)
    k, t = 2, 3  # change one code: it is label position k + t of codebook k
    changed = TokenDataset(data.codes.clone(), data.captions)
    changed.codes[:, k, t] = (changed.codes[:, k, t] + 1) % V
    logits2, labels2, _ = logits_of(model, root, changed)
    pos = k + t
    assert not torch.equal(labels[:, k, pos], labels2[:, k, pos])
    assert torch.allclose(logits[:, :, : pos + 1], logits2[:, :, : pos + 1], atol=1e-6)
    assert not torch.allclose(logits[:, :, pos + 1 :], logits2[:, :, pos + 1 :], atol=1e-6)


def test_cfg_dropout_removes_the_condition(parts):
    root, _ = parts
    model = tiny_model(root).eval()
    data = toy_data(root, n=2)
    same_codes = TokenDataset(data.codes[[0, 0]], data.captions)  # two captions, one piece of music
    a, b = logits_of(model, root, same_codes, drop=True)[0]
    kept = logits_of(model, root, same_codes)[0]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(kept[0], kept[1], atol=1e-4)


def test_training_learns_keeps_text_frozen_and_resumes_exactly(parts, tmp_path):
    root, _ = parts
    from musicgen.train.loop import read_curve

    data = toy_data(root)
    tok, _ = load_text(root / "text")
    cfg = TrainConfig(steps=8, micro_batch=4, lr=1e-2, warmup_steps=2, checkpoint_every=4)
    model = tiny_model(root)
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    before = heldout(model, tok, data)["nll"]
    log = train(model, LMObjective(data, tok, cfg_dropout=0.1), cfg, tmp_path / "a", progress=False)
    assert heldout(model, tok, data)["nll"] < before
    assert log["steps_done"] == 8 and len(read_curve(tmp_path / "a" / "curve.jsonl")) == 8
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, text_before[k]), k
    killed = tiny_model(root)
    log1 = train(killed, LMObjective(data, tok, cfg_dropout=0.1), cfg, tmp_path / "b", progress=False, max_seconds=0.0)
    assert log1["stopped_early"] and log1["steps_done"] == 1
    resumed = tiny_model(root)
    train(resumed, LMObjective(data, tok, cfg_dropout=0.1), cfg, tmp_path / "b", progress=False)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_token_dataset_roundtrip_and_unigram(parts, tmp_path):
    root, _ = parts
    data = toy_data(root)
    data.save(tmp_path / "t.safetensors")
    back = TokenDataset.load(tmp_path / "t.safetensors")
    assert torch.equal(back.codes, data.codes) and back.captions == data.captions
    uni = unigram_nll(data, data, vocab=V, alpha=0.0)
    c0 = data.codes[:, 0].flatten()
    p = torch.bincount(c0, minlength=V).double() / len(c0)
    assert uni["nll_cb0"] == pytest.approx(float(-(p[c0].log()).mean()), abs=1e-4)


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
    a, b = logits_of(model, root, data)[0], logits_of(back, root, data)[0]
    assert torch.allclose(a, b, atol=1e-6)
    audio = back.generate(**ids, max_new_tokens=10 + K - 1, do_sample=False, guidance_scale=3.0)
    assert audio.shape[0] == 2 and audio.shape[-1] == 10 * back.config.audio_encoder.sampling_rate // 50
