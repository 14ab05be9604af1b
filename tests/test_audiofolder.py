import numpy as np
import pytest
import soundfile as sf

from musicgen.audiofolder import DatasetError, load_audio, read_split, write_metadata


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
