"""The tiny MusicGen used across the tests must have codes and prompts that matter."""

import torch

from musicgen.models.tiny import build_tiny_musicgen, build_word_tokenizer, save_tiny_musicgen


def test_audio_depends_on_codes_and_roundtrips(tmp_path):
    model = build_tiny_musicgen(0)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2048, (1, 2, 4, 20), generator=g)
    audio = model.audio_encoder.decode(codes, [None])[0]
    assert audio.shape == (2, 1, 20 * 640)
    assert (audio[0] - audio[1]).std() > 1e-3  # different codes, clearly different audio

    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    folder = save_tiny_musicgen(tmp_path / "tiny", seed=0)
    loaded = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("slow piano").input_ids == build_word_tokenizer()("slow piano").input_ids
    inputs = tok(["slow piano chorale", "fast folk dance with flute"], return_tensors="pt", padding=True)
    a = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    b = loaded.generate(**inputs, do_sample=False, max_new_tokens=12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
