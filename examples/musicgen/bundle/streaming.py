"""Streaming EnCodec decode: audio chunks while the decoder is still generating codes.

EnCodec's decoder is convolutional with an LSTM, so a frame's audio depends on the codes around it;
decoding in windows changes the samples near a window's edges. ``stream_decode`` decodes overlapping
windows of ``window`` frames, each starting ``overlap`` frames before the previous one ended (its left
context), and cross-fades the two decodes over those ``overlap`` frames. With ``hop`` samples per frame
and ``step = window - overlap``:

- window ``i`` (until the codes end) covers frames ``[i * step, i * step + window)``;
- chunk ``i`` covers samples ``[i * step * hop, (i + 1) * step * hop)``: the first ``overlap`` frames
  of window ``i`` are the cross-fade with window ``i - 1``'s last ``overlap`` frames (held back when
  window ``i - 1`` was emitted), the rest comes from window ``i`` alone;
- when the codes end at ``T`` frames, one last window ``[max(0, min(e - overlap, T - window)), T)``
  (``e``: the previous window's end) ends the stream, so it is never shorter than ``window`` frames
  where the clip is not; the last chunk runs to ``T * hop`` samples. A clip shorter than one window
  is decoded once, whole.

Cross-fade over ``n = overlap * hop`` samples, ``u_j = (j + 1/2) / n``: ``linear`` weights the new
window by ``u`` and the old by ``1 - u`` (sum 1: exact where the two decodes agree);
``equal_power`` by ``sin(pi u / 2)`` and ``cos(pi u / 2)`` (squares sum 1: constant power for
uncorrelated signals). The concatenated chunks have the one-shot length ``T * hop`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from kdq.errors import KdqError, bad_value

FADES = ("linear", "equal_power")


class StreamArgError(KdqError):
    """A streaming argument out of range (window, overlap, fade, code frames)."""


def crossfade_weights(n: int, fade: str) -> tuple[np.ndarray, np.ndarray]:
    """``(old, new)`` weights over ``n`` samples (see the module docstring)."""
    u = (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)
    if fade == "linear":
        return (1.0 - u).astype(np.float32), u.astype(np.float32)
    if fade == "equal_power":
        return np.cos(0.5 * np.pi * u).astype(np.float32), np.sin(0.5 * np.pi * u).astype(np.float32)
    raise bad_value(StreamArgError, "fade", fade, f"one of {FADES}")


def check_stream_args(window: int, overlap: int, fade: str, *, min_frames: int = 1) -> None:
    """Raise ``StreamArgError`` unless ``min_frames <= window``, ``0 <= overlap < window`` and ``fade`` is known."""
    for arg, v in (("window", window), ("overlap", overlap)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise bad_value(StreamArgError, arg, v, "an integer number of code frames")
    if window < min_frames:
        raise bad_value(StreamArgError, "window", window, f">= {min_frames} code frames (the shortest input the decoder takes)")
    if not 0 <= overlap < window:
        raise bad_value(StreamArgError, "overlap", overlap, f"0 <= overlap < window={window}",
                        "the overlap is the left context each window re-decodes; keep it below the window")
    if fade not in FADES:
        raise bad_value(StreamArgError, "fade", fade, f"one of {FADES}")


def stream_decode(
    frames: Iterable[np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
    *,
    window: int,
    overlap: int,
    fade: str = "linear",
    min_frames: int = 1,
) -> Iterator[np.ndarray]:
    """Decode code frames in overlapping, cross-faded windows as they arrive; yield audio chunks.

    Args:
        frames: code frames in order, each ``[K]`` integers (one frame of all codebooks); may be a
            generator fed by the decoder loop.
        decode: ``codes [1, K, t] -> audio [1, channels, t * hop]`` (e.g. ``MusicgenOnnx.decode_audio``).
        window: frames per decode.
        overlap: frames each window shares with the previous one (left context), cross-faded.
        fade: ``"linear"`` or ``"equal_power"``.
        min_frames: the fewest frames ``decode`` accepts; ``window`` must be at least this.

    Yields:
        float32 audio ``[1, channels, n]``; chunk boundaries at multiples of ``(window - overlap) * hop``
        samples (see the module docstring); together exactly the one-shot length.

    Raises:
        StreamArgError: bad window/overlap/fade, frames of differing sizes, a decode whose output is
            not a whole number of samples per frame, or a clip shorter than ``min_frames``.
    """
    check_stream_args(window, overlap, fade, min_frames=min_frames)
    buf: list[np.ndarray] = []
    hop: int | None = None
    tail: np.ndarray | None = None  # the previous window's last `overlap` frames of audio, held back
    end = 0  # frames the previous window covered, [.., end)

    def run(start: int, stop: int) -> np.ndarray:
        nonlocal hop
        codes = np.stack(buf[start:stop], axis=-1)[None]  # [1, K, t]
        audio = np.asarray(decode(codes), dtype=np.float32)
        t = stop - start
        if audio.ndim != 3 or audio.shape[-1] % t:
            raise StreamArgError(
                f"decode(codes of {t} frames) returned shape {audio.shape}: expected [1, channels, frames * hop]"
            )
        if hop is None:
            hop = audio.shape[-1] // t
        elif audio.shape[-1] != t * hop:
            raise StreamArgError(f"decode returned {audio.shape[-1]} samples for {t} frames, expected {t * hop}")
        return audio

    def join(audio: np.ndarray, start: int) -> np.ndarray:
        """``audio`` (from frame ``start``) from frame ``end - overlap`` on, cross-faded with the tail."""
        head = audio[..., (end - overlap - start) * hop :]  # type: ignore[operator]
        if tail is None or overlap == 0:
            return head
        n = tail.shape[-1]
        old, new = crossfade_weights(n, fade)
        return np.concatenate([tail * old + head[..., :n] * new, head[..., n:]], axis=-1)

    for frame in frames:
        frame = np.asarray(frame)
        if frame.ndim != 1 or (buf and frame.shape != buf[0].shape):
            raise StreamArgError(f"code frame of shape {frame.shape}: every frame must be [K] with one K ({buf[0].shape if buf else 'first'})")
        buf.append(frame)
        start = end - overlap if end else 0
        if len(buf) == start + window:
            audio = run(start, start + window)
            out = audio if end == 0 else join(audio, start)
            end = start + window
            keep = overlap * hop  # type: ignore[operator]
            tail = out[..., out.shape[-1] - keep :] if keep else None
            chunk = out[..., : out.shape[-1] - keep]
            if chunk.shape[-1]:
                yield chunk
    total = len(buf)
    if total == 0:
        return
    if end == 0:  # shorter than one window: one decode
        if total < min_frames:
            raise StreamArgError(f"the codes have {total} frames: the decoder needs at least {min_frames}")
        yield run(0, total)
        return
    if total == end:
        if tail is not None:
            yield tail
        return
    start = max(0, min(end - overlap, total - window))
    yield join(run(start, total), start)
