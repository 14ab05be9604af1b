"""Streaming EnCodec decode: chunk boundaries, length, agreement with the one-shot decode away from
window edges (tiny random EnCodec), argument errors, and the ONNX runtime's generate_stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musicgen.bundle.streaming import StreamArgError, crossfade_weights, stream_decode

HOP = 6


def _local_decode(codes: np.ndarray) -> np.ndarray:
    """A decoder with no context at all (each frame -> HOP samples of its own): windows are exact."""
    x = codes[0].astype(np.float32)  # [K, t]
    wave = (x * np.arange(1, x.shape[0] + 1)[:, None]).sum(0)
    return np.repeat(wave, HOP)[None, None]


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 60), window=st.integers(1, 16), overlap=st.integers(0, 15),
       fade=st.sampled_from(["linear", "equal_power"]))
def test_chunk_boundaries_and_length(T, window, overlap, fade):
    if overlap >= window:
        return
    codes = np.random.default_rng(T).integers(0, 9, size=(1, 3, T))
    chunks = list(stream_decode(iter(codes[0].T), _local_decode, window=window, overlap=overlap, fade=fade))
    one = _local_decode(codes)
    out = np.concatenate(chunks, -1)
    assert out.shape == one.shape  # total length is the one-shot length
    step = window - overlap
    if T < window:  # one decode; at T == window the held-back overlap is the second chunk
        assert len(chunks) == 1
    else:  # every chunk but the last ends on a multiple of (window - overlap) frames
        ends = np.cumsum([c.shape[-1] for c in chunks])
        assert list(ends[:-1]) == [(i + 1) * step * HOP for i in range(len(chunks) - 1)]
        assert ends[-1] == T * HOP
    if fade == "linear":  # weights sum to 1: exact wherever the windows agree (here everywhere)
        np.testing.assert_allclose(out, one, rtol=1e-6, atol=1e-5)


def test_crossfade_weights():
    old, new = crossfade_weights(8, "linear")
    np.testing.assert_allclose(old + new, 1.0, atol=1e-7)
    assert np.all(np.diff(new) > 0)
    old, new = crossfade_weights(8, "equal_power")
    np.testing.assert_allclose(old**2 + new**2, 1.0, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window": 10, "overlap": 10}, r"overlap=10 is not allowed: 0 <= overlap < window=10"),
    ({"window": 10, "overlap": -1}, r"overlap=-1 is not allowed"),
    ({"window": 4, "overlap": 1, "min_frames": 7}, r"window=4 is not allowed: >= 7 code frames"),
    ({"window": 10.0, "overlap": 1}, r"window=10.0 is not allowed: an integer"),
    ({"window": 10, "overlap": 2, "fade": "cosine"}, r"fade='cosine' is not allowed"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(StreamArgError, match=match):
        next(stream_decode(iter([np.zeros(3, int)] * 20), _local_decode, **kwargs))


def test_bad_frames_and_too_short_clips():
    with pytest.raises(StreamArgError, match=r"every frame must be \[K\]"):
        list(stream_decode(iter([np.zeros(3, int), np.zeros(4, int)]), _local_decode, window=4, overlap=1))
    with pytest.raises(StreamArgError, match="needs at least 7"):
        list(stream_decode(iter([np.zeros(3, int)] * 5), _local_decode, window=10, overlap=2, min_frames=7))


# ---------------------------------------------------------------------------- a tiny random EnCodec
# Tolerance: outside the cross-fade regions every sample is decoded by one window that has at least
# `overlap` frames of codes on either side of it; the tiny codec's convolutions see fewer frames than
# that and its LSTM, started from zero at the window's first frame, has forgotten that start after
# `overlap` frames, so the windowed decode agrees with the one-shot decode to float rounding plus a
# decayed LSTM transient: measured at about 1e-4 to 2e-4 of the peak; asserted below 1e-3 of the peak. Inside the
# cross-fades both windows are near an edge (the old one lacks right context, the new one left
# context) and differ from the one-shot decode by a few percent of the peak (not asserted).
@pytest.fixture(scope="module")
def codec():
    from musicgen.models.tiny import build_tiny_musicgen

    model = build_tiny_musicgen(0).audio_encoder.eval()

    def decode(codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.decode(torch.from_numpy(codes)[None], [None]).audio_values.numpy()

    return model, decode


@pytest.mark.parametrize(("T", "window", "overlap"), [(120, 30, 10), (97, 40, 16), (61, 25, 12)])
def test_stream_matches_one_shot_away_from_window_edges(codec, T, window, overlap):
    model, decode = codec
    codes = np.random.default_rng(T).integers(0, model.config.codebook_size, size=(1, 4, T))
    one = decode(codes)
    chunks = list(stream_decode(iter(codes[0].T), decode, window=window, overlap=overlap, min_frames=7))
    out = np.concatenate(chunks, -1)
    assert out.shape == one.shape
    hop = one.shape[-1] // T
    err = np.abs(out - one)[0, 0].reshape(T, hop).max(1) / np.abs(one).max()
    faded = np.zeros(T, bool)  # frames inside a cross-fade
    end = window
    while end < T:
        faded[end - overlap : end] = True
        end += window - overlap
    assert err[~faded].max() < 1e-3, err[~faded].max()
    assert err[faded].max() > 1e-4  # the windows really are decoded apart (the test could fail)


# ---------------------------------------------------------------------------- the ONNX runtime
@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from musicgen.bundle.build import export_bundle
    from musicgen.bundle.runtime import MusicgenOnnx
    from musicgen.models.tiny import save_tiny_musicgen

    root = tmp_path_factory.mktemp("stream")
    export_bundle(str(save_tiny_musicgen(root / "model")), root / "bundle", progress=False)
    return MusicgenOnnx(root / "bundle", threads=1)


def test_generate_stream_equals_windowed_decode_of_the_same_codes(runtime):
    from musicgen.bundle.runtime import GenerationArgError, Timings

    kw = dict(max_new_tokens=40, guidance_scale=3.0, do_sample=False)
    ids, mask = runtime.tokenize(["gentle harp"])
    hidden = runtime.encode_text(ids, mask)
    codes = runtime.generate_codes(hidden, mask, **kw)
    frames = list(runtime.code_frames(hidden, mask, **kw))
    np.testing.assert_array_equal(np.stack(frames, -1), codes)  # frames as they complete == the whole codes
    timings = Timings()
    chunks = list(runtime.generate_stream("gentle harp", window=12, overlap=4, timings=timings, **kw))
    want = list(stream_decode(iter(codes[0].T), runtime.decode_audio, window=12, overlap=4, min_frames=7))
    assert [c.shape for c in chunks] == [w.shape for w in want]
    np.testing.assert_allclose(np.concatenate(chunks, -1), np.concatenate(want, -1), rtol=0, atol=1e-6)
    assert np.concatenate(chunks, -1).shape == runtime.decode_audio(codes).shape
    assert timings.first_audio_s is not None and timings.decoder_steps == 40
    with pytest.raises(StreamArgError, match="overlap=12 is not allowed"):
        next(runtime.generate_stream("x", window=12, overlap=12, **kw))
    with pytest.raises(GenerationArgError, match="one prompt"):
        next(runtime.generate_stream(["a", "b"], **kw))
