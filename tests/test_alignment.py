"""musicgen.eval.alignment: caption edits that change one attribute, and the caption gain they measure."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from musicgen.eval.alignment import AlignmentError, attribute_values, caption_gain, swap_attribute
from musicgen.eval.instrument import instrument_from_caption
from musicgen.eval.music import key_from_caption

pytest.importorskip("music21")
from musicgen.data.render import INSTRUMENTS, make_caption  # noqa: E402

NAMES = [n for _, n in INSTRUMENTS]


def _meta(rng):
    return {"instrument": NAMES[int(rng.integers(len(NAMES)))], "key": ["G sharp minor", "E flat major", "C major"][int(rng.integers(3))],
            "tempo": ["slow", "moderate", "lively", "fast"][int(rng.integers(4))]}


@pytest.mark.parametrize("seed", range(12))
def test_each_swap_changes_its_attribute_and_nothing_else(seed):
    rng = np.random.default_rng(seed)
    meta = _meta(rng)
    style = ["Bach chorale", "folk reel", "Monteverdi madrigal"][seed % 3]
    caption = make_caption(rng=rng, style=style, tempo=meta["tempo"], key=meta["key"], instrument=meta["instrument"],
                           texture="four-part harmony")
    metas = [meta, {"instrument": "flute", "key": "D major", "tempo": "slow"}]
    values = attribute_values(metas, [caption, "A slow folk jig in D major played on flute, a single melody line."])
    for attr, (own, pools) in values.items():
        new = swap_attribute(caption, own[0], pools[0], np.random.default_rng(seed))
        assert new != caption
        same_inst = instrument_from_caption(new, NAMES) == meta["instrument"]
        same_key = key_from_caption(new) == key_from_caption(caption)
        same_tempo = re.search(rf"\b{meta['tempo']}\b", new, flags=re.IGNORECASE) is not None
        assert (same_inst, same_key, same_tempo) == (attr != "instrument", attr != "key", attr != "tempo"), (attr, new)
        if attr == "key":
            assert key_from_caption(new).tonic != key_from_caption(caption).tonic
        if attr == "style":
            assert style.lower() not in new.lower()
        assert new[0].isupper()  # a swapped first word keeps its capital


def test_bad_input_is_named():
    with pytest.raises(AlignmentError, match="names 'oboe'"):
        swap_attribute("A slow chorale played on flute.", "oboe", ["harp"], np.random.default_rng(0))
    with pytest.raises(AlignmentError, match="pool"):
        swap_attribute("A slow chorale played on flute.", "flute", ["flute"], np.random.default_rng(0))



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MusicGen trained on codes that depend on the caption."""
    from test_mini_world_lm import CAPTIONS, tiny_model, toy_data

    from musicgen.config import CodecConfig, TextConfig, TrainConfig
    from musicgen.models.codec import build_codec, kmeans_init
    from musicgen.models.text import build_text_encoder, load_text, train_tokenizer
    from musicgen.train.loop import train
    from musicgen.train.objectives import LMObjective

    root = tmp_path_factory.mktemp("align")
    tok = train_tokenizer(CAPTIONS * 3)
    build_text_encoder(TextConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32), len(tok)).save_pretrained(root / "text")
    tok.save_pretrained(root / "text")
    codec = build_codec(CodecConfig(num_filters=2, hidden_size=8, codebook_size=16))
    kmeans_init(codec, torch.randn(100, 8))
    codec.save_pretrained(root / "codec")
    tok, _ = load_text(root / "text")
    data = toy_data(root, n=8)
    model = tiny_model(root)
    train(model, LMObjective(data, tok, cfg_dropout=0.0), TrainConfig(steps=60, micro_batch=4, lr=2e-2, warmup_steps=2,
                                                                     checkpoint_every=1000), root / "run", progress=False)
    return model.eval(), tok, data


def test_caption_gain_is_zero_for_own_captions_positive_for_the_other_and_zero_without_text(trained):
    from musicgen.eval.heldout import heldout

    model, tok, data = trained
    other = [data.captions[(i + 1) % len(data)] for i in range(len(data))]  # toy data alternates two captions
    g = caption_gain(model, tok, data, {"own": data.captions, "other": other}, n_boot=200)
    assert g["own"]["gain"] == 0.0 and g["own"]["within_noise"]
    assert g["other"]["gain"] > 0.1 and g["other"]["gain_ci"][0] > 0  # the trained model reads its caption
    ref = heldout(model, tok, type(data)(data.codes, other))["nll"] - heldout(model, tok, data)["nll"]
    assert g["other"]["gain"] == pytest.approx(ref, abs=1e-9)  # equal clips: the mean of items is the token mean
    with torch.no_grad():  # cut the text off: the caption cannot matter any more
        for name, m in model.decoder.named_modules():
            if name.endswith("encoder_attn.out_proj"):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
    blind = caption_gain(model, tok, data, {"other": other}, n_boot=50)["other"]
    assert abs(blind["gain"]) < 1e-6
    with pytest.raises(AlignmentError, match="one per clip"):
        caption_gain(model, tok, data, {"short": other[:2]})
