"""Run a MusicGen ONNX bundle the way a phone would, and report what it cost (the CLI is ``device_run.py``).

A small thread count, ONNX Runtime's mobile model format (``.ort``, converted on demand with
``onnxruntime.tools.convert_onnx_models_to_ort``, which also writes the ``required_operators.config``
a reduced mobile build is compiled with), and bounded memory (no CPU arena). Writes the WAV and
prints, as the last line of stdout, one JSON object: load time, per-stage times, tokens per second,
``rtf`` (generation seconds / audio seconds), peak RSS bytes and bundle bytes per part.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kdq.errors import KdqError, bad_value
from musicgen.bundle.runtime import MIN_FRAMES, MusicgenOnnx, Timings
from musicgen.files import write_wav


class DeviceRunError(KdqError):
    """Bad arguments to the device run, or the ``.ort`` conversion failed."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` survives ``exec`` and can report the
    parent's peak in a child process); elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def ensure_ort_format(bundle: str | os.PathLike) -> list[Path]:
    """Convert ``bundle/onnx/*.onnx`` to ``.ort`` (and ``required_operators.config``) if missing or stale.

    Runs ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` into a temporary folder and moves
    the results next to the ``.onnx`` files only when the conversion succeeded.
    """
    onnx_dir = Path(bundle) / "onnx"
    models = sorted(onnx_dir.glob("*.onnx"))
    if not models:
        raise bad_value(DeviceRunError, "bundle", str(bundle), "a bundle with onnx/*.onnx files", "run export.py first")
    config = onnx_dir / "required_operators.config"
    fresh = config.is_file() and all(
        m.with_suffix(".ort").is_file() and m.with_suffix(".ort").stat().st_mtime >= m.stat().st_mtime for m in models
    )
    if fresh:
        return [m.with_suffix(".ort") for m in models]
    with tempfile.TemporaryDirectory(prefix=".ort-", dir=onnx_dir) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_dir),
               "--output_dir", tmp, "--optimization_style", "Fixed"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DeviceRunError(f"ONNX -> ORT conversion failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        for f in Path(tmp).iterdir():
            if f.suffix == ".ort" or f.name.endswith(".config"):
                os.replace(f, onnx_dir / f.name)
    return [m.with_suffix(".ort") for m in models]


def bundle_bytes(bundle: Path, files: dict[str, Path]) -> dict[str, int]:
    """Bytes per part of the files actually loaded."""
    return {part: path.stat().st_size for part, path in files.items()}


def device_run(
    bundle: str | os.PathLike,
    prompt: str,
    *,
    seconds: float,
    out: str | os.PathLike,
    threads: int = 2,
    ort_format: bool = False,
    greedy: bool = False,
    seed: int = 0,
    guidance_scale: float | None = None,
    top_k: int | None = None,
    progress: bool = False,
    stream: bool = False,
    window: int = 50,
    overlap: int = 10,
) -> dict:
    """Load, generate ``seconds`` of audio for ``prompt``, write the WAV; return the measurements.

    ``stream``: decode audio in cross-faded windows of ``window`` code frames overlapping by
    ``overlap`` while the decoder runs (``MusicgenOnnx.generate_stream``); ``time_to_first_audio_s``
    is then when the first chunk came out (without streaming: when the whole clip did).
    """
    if seconds <= 0:
        raise bad_value(DeviceRunError, "seconds", seconds, "> 0")
    if threads < 1:
        raise bad_value(DeviceRunError, "threads", threads, ">= 1")
    bundle = Path(bundle)
    convert_s = 0.0
    if ort_format:
        t = time.perf_counter()
        ensure_ort_format(bundle)
        convert_s = time.perf_counter() - t
    t = time.perf_counter()
    rt = MusicgenOnnx(bundle, threads=threads, ort_format=ort_format, low_memory=True)
    load_s = time.perf_counter() - t
    gen = rt.generation_config
    k = rt.num_codebooks
    max_new_tokens = max(k - 1 + MIN_FRAMES, round(seconds * rt.frame_rate) + k - 1)
    guidance = guidance_scale if guidance_scale is not None else gen.get("guidance_scale", 3.0)
    timings = Timings()
    t = time.perf_counter()
    kw = dict(max_new_tokens=max_new_tokens, guidance_scale=guidance, do_sample=not greedy,
              top_k=top_k if top_k is not None else (gen.get("top_k") or 250), seed=seed, timings=timings,
              progress=progress)
    chunks = 1
    if stream:
        parts = list(rt.generate_stream(prompt, window=window, overlap=overlap, **kw))
        audio, chunks = np.concatenate(parts, axis=-1), len(parts)
    else:
        audio = rt.generate([prompt], **kw)
    gen_s = time.perf_counter() - t
    write_wav(out, audio[0], rt.sampling_rate)
    audio_s = audio.shape[-1] / rt.sampling_rate
    dec_s = timings.stages.get("decoder_first_step", 0.0) + timings.stages.get("decoder_cached_steps", 0.0)
    return {
        "bundle": str(bundle),
        "format": "ort" if ort_format else "onnx",
        "threads": threads,
        "dtypes": rt.dtypes,
        "ort_convert_s": round(convert_s, 4),
        "load_s": round(load_s, 4),
        "stages_s": {k2: round(v, 4) for k2, v in timings.stages.items()},
        "decoder_steps": timings.decoder_steps,
        "ms_per_cached_step": round(1000 * timings.stages.get("decoder_cached_steps", 0.0) / max(1, timings.decoder_steps - 1), 3),
        "tokens_per_s": round(timings.decoder_steps / dec_s, 2) if dec_s else None,
        "generation_s": round(gen_s, 4),
        "time_to_first_audio_s": round(timings.first_audio_s, 4),
        "streaming": {"window_frames": window, "overlap_frames": overlap, "chunks": chunks} if stream else None,
        "audio_s": round(audio_s, 4),
        "rtf": round(gen_s / audio_s, 4),
        "peak_rss_bytes": peak_rss_bytes(),
        "bundle_bytes": bundle_bytes(bundle, rt.files),
        "wav": str(out),
    }
