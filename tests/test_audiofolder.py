import json

import numpy as np
import pytest
import soundfile as sf

from musicgen.data.audiofolder import DatasetError, load_audio, read_split, write_metadata


def test_roundtrip_and_resampling(tmp_path):
    sr = 16000
    t = np.arange(sr) / sr
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    (tmp_path / "train").mkdir()
    sf.write(tmp_path / "train" / "a.wav", stereo, sr)
    write_metadata(tmp_path, "train", [{"file_name": "a.wav", "text": "a sine", "tempo": 90}])
    (clip,) = read_split(tmp_path, "train")
    assert clip.text == "a sine" and clip.meta == {"tempo": 90}
    audio = load_audio(clip.path, 8000)
    assert audio.shape == (8000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second


def test_missing_metadata_and_columns(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl"):
        read_split(tmp_path, "test")
    write_metadata(tmp_path, "test", [{"file_name": "a.wav", "caption": "x"}])
    with pytest.raises(DatasetError, match="'text'"):
        read_split(tmp_path, "test")
    assert read_split(tmp_path, "test", text_column="caption")[0].text == "x"


def _wav(folder, name, data, sr=8000):
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / name, np.asarray(data, dtype=np.float32), sr, subtype="FLOAT")


def test_bad_items_are_skipped_counted_and_explained(tmp_path):
    """Regression: one bad item stopped the dataset with a raw error, or became a training clip."""
    from musicgen.data.audiofolder import Skipped, check_bad_share, load_clips

    split = tmp_path / "train"
    for i in range(3):
        _wav(split, f"ok{i}.wav", 0.1 * np.sin(np.arange(800) / 5))
    _wav(split, "empty.wav", np.zeros(0))
    _wav(split, "nan.wav", np.full(800, np.nan))
    (split / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    (tmp_path / "outside.wav").write_bytes(b"secret")
    lines = [
        *(json.dumps({"file_name": f"ok{i}.wav", "text": f"clip {i}"}) for i in range(3)),
        json.dumps({"file_name": "empty.wav", "text": "empty"}),
        json.dumps({"file_name": "nan.wav", "text": "nan"}),
        json.dumps({"file_name": "corrupt.wav", "text": "corrupt"}),
        json.dumps({"file_name": "missing.wav", "text": "missing"}),
        json.dumps({"file_name": "ok0.wav", "text": None}),
        json.dumps({"file_name": "../outside.wav", "text": "escape"}),
        json.dumps({"file_name": "/etc/hostname", "text": "absolute"}),
        '{"file_name": "ok1.wav", "text": "broken',
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"file_name": "ok2.wav", "text": "caf\xe9"}\n'
    (split / "metadata.jsonl").write_bytes(raw)
    skipped = Skipped()
    clips = read_split(tmp_path, "train", skipped=skipped)
    assert [c.text for c in clips][:3] == ["clip 0", "clip 1", "clip 2"]
    reasons = dict(skipped.items)
    meta = str(split / "metadata.jsonl")
    assert reasons[f"{meta}:8"] == "no caption in column 'text'"
    assert reasons[f"{meta}:9"] == reasons[f"{meta}:10"] == "file_name leads outside the split's folder"
    assert reasons[f"{meta}:11"].startswith("not JSON") and reasons[f"{meta}:12"] == "not UTF-8"
    kept, audio = load_clips(clips, 8000, skipped)
    assert [c.path.name for c in kept] == ["ok0.wav", "ok1.wav", "ok2.wav"] and all(len(a) == 800 for a in audio)
    summary = skipped.summary()
    assert summary["count"] == 9 and summary["reasons"]["missing"] == 1 and summary["reasons"]["no samples"] == 1
    assert summary["reasons"]["NaN or infinite samples"] == 1
    assert any(r.startswith("unreadable") for r in summary["reasons"])
    check_bad_share("train", len(kept), skipped, max_bad_fraction=0.8)  # 9 of 12: under the limit
    with pytest.raises(DatasetError, match="9 of 12 items are bad"):
        check_bad_share("train", len(kept), skipped, max_bad_fraction=0.5)


def test_csv_metadata_and_non_utf8_csv(tmp_path):
    split = tmp_path / "valid"
    _wav(split, "a.wav", np.ones(10) * 0.1)
    (split / "metadata.csv").write_text("file_name,text\na.wav,hello\n")
    assert read_split(tmp_path, "valid")[0].text == "hello"
    (split / "metadata.csv").write_bytes(b"file_name,text\na.wav,caf\xe9\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_split(tmp_path, "valid")
