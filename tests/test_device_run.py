"""The device run: .ort conversion with required_operators.config, the JSON contract, the WAV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from musicgen.bundle.device import DeviceRunError, device_run, ensure_ort_format  # noqa: E402
from musicgen.bundle.runtime import MusicgenOnnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    """A copy of the shared tiny bundle (the device run writes .ort files beside the .onnx ones)."""
    import shutil

    return Path(shutil.copytree(tiny_bundle[1], tmp_path_factory.mktemp("device") / "bundle"))


def test_ort_format_run_matches_onnx_and_reports(bundle, tmp_path):
    res = device_run(bundle, "gentle harp solo", seconds=0.5, out=tmp_path / "a.wav", threads=1, ort_format=True, greedy=True)
    onnx_dir = bundle / "onnx"
    for part in ("text_encoder", "decoder_model_merged", "encodec_decode"):
        assert (onnx_dir / f"{part}.ort").is_file()
    ops = (onnx_dir / "required_operators.config").read_text()
    assert "ai.onnx" in ops and "If" in ops and "MatMul" in ops
    assert res["format"] == "ort" and res["decoder_steps"] == 25 + 3
    assert set(res["bundle_bytes"]) == {"text_encoder", "decoder_model_merged", "encodec_decode"}
    assert res["bundle_bytes"]["decoder_model_merged"] == (onnx_dir / "decoder_model_merged.ort").stat().st_size
    assert res["audio_s"] == pytest.approx(0.5) and res["rtf"] == pytest.approx(res["generation_s"] / 0.5, abs=1e-3)
    assert res["peak_rss_bytes"] > 10 * 2**20 and res["tokens_per_s"] > 0
    assert {"tokenize", "text_encoder", "decoder_first_step", "decoder_cached_steps", "encodec_decode"} <= set(res["stages_s"])
    import soundfile as sf

    wav, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 32000 and wav.shape == (16000,)
    ref = MusicgenOnnx(bundle).generate(["gentle harp solo"], max_new_tokens=28, guidance_scale=3.0)
    np.testing.assert_allclose(wav, np.clip(ref[0, 0], -1, 1), atol=2 / 2**15)  # 16-bit WAV
    # a second call reuses the converted files
    mtime = (onnx_dir / "decoder_model_merged.ort").stat().st_mtime
    ensure_ort_format(bundle)
    assert (onnx_dir / "decoder_model_merged.ort").stat().st_mtime == mtime


def test_cli_last_line_is_json(bundle, tmp_path):
    out = tmp_path / "b.wav"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/musicgen/device_run.py"), "--bundle", str(bundle), "--prompt", "dark organ",
         "--seconds", "0.3", "--out", str(out), "--threads", "1", "--seed", "4", "--progress"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("load_s", "stages_s", "tokens_per_s", "rtf", "peak_rss_bytes", "bundle_bytes"):
        assert key in res
    assert res["format"] == "onnx" and out.is_file()


def test_bad_arguments(bundle, tmp_path):
    with pytest.raises(DeviceRunError, match="seconds"):
        device_run(bundle, "x", seconds=0, out=tmp_path / "x.wav")
    with pytest.raises(DeviceRunError, match="bundle"):
        ensure_ort_format(tmp_path)
