"""A plain ONNX Runtime generation loop over a MusicGen bundle (see export.py and docs/export.md).

Pipeline: tokenize -> text encoder -> classifier-free-guidance batch (the prompt's states and a
zero "null" condition) -> decoder steps with a KV cache and MusicGen's delay pattern -> greedy or
temperature/top-k/top-p sampling with a seed -> EnCodec decode -> WAV. Only numpy, onnxruntime and
tokenizers are needed, as on a phone; the loop reproduces
``MusicgenForConditionalGeneration.generate`` (greedy, same guidance scale) to float precision.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from kdq.errors import KdqError, bad_value
from musicgen.bundle.parts import INPLACE_KEY, PARTS, SUFFIX, part_file, plan_dtype
from musicgen.bundle.streaming import check_stream_args, stream_decode

MIN_FRAMES = 7  # EnCodec's first conv (kernel 7) pads by reflection; below 7 frames PyTorch pads differently
GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


class BundleLoadError(KdqError):
    """The bundle folder is missing a file or holds inconsistent settings."""


class GenerationArgError(KdqError):
    """A generation argument is out of range."""


def build_delay_pattern(batch_codebooks: int, num_codebooks: int, pad: int, max_length: int) -> np.ndarray:
    """MusicGen's delay pattern for generation from a single BOS token per codebook.

    Returns ``pattern`` of shape (B*K, max_length): ``-1`` where a token is to be predicted, ``pad``
    where codebook ``k`` is delayed (its first ``k+1`` positions) or finished (its last ``K-1-k``).
    """
    k = num_codebooks
    pattern = np.full((batch_codebooks // k, k, max_length), -1, dtype=np.int64)
    if max_length >= 2 * k - 1:
        for cb in range(k):
            pattern[:, cb, : cb + 1] = pad  # the BOS delay: positions 0..cb
            pattern[:, cb, cb + max_length - k + 1 :] = pad  # the end: codebook cb finishes k-1-cb early
    return pattern.reshape(batch_codebooks, max_length)


def apply_delay_pattern(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Keep ``ids`` where the pattern says "predict" (-1), the pattern's pad token elsewhere."""
    p = pattern[:, : ids.shape[1]]
    return np.where(p == -1, ids, p)


def sample_next(
    logits: np.ndarray, *, rng: np.random.Generator | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """Next token per row of ``logits`` (rows, vocab): argmax if ``rng`` is None, else a sample.

    Sampling follows transformers' warper order: divide by ``temperature``, keep the ``top_k``
    largest (0 = all), keep the smallest set whose probability reaches ``top_p``, then draw one token
    from the softmax by inverse CDF with ``rng``.
    """
    if rng is None:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / temperature
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_x = np.take_along_axis(x, order, -1)
        probs = np.exp(sorted_x - sorted_x[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        cum = np.cumsum(probs, -1)
        drop_sorted = (cum - probs) >= top_p  # the first token is always kept
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        x = np.where(drop, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((x.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), x.shape[-1] - 1)


@dataclass
class Timings:
    """Seconds per stage of one generation."""

    stages: dict[str, float] = field(default_factory=dict)
    decoder_steps: int = 0
    first_audio_s: float | None = None  # from the start of generate/generate_stream to the first audio out

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class MusicgenOnnx:
    """ONNX Runtime sessions over a bundle folder, and the generation loop.

    Args:
        bundle: folder written by ``export.py`` (``config.json``, tokenizer files, ``onnx/``).
        threads: intra-op threads per session (None: ONNX Runtime's default).
        dtypes: file variant per part (``fp32``, ``fp16``, ``q8``...); default from
            ``config.json["transformers.js_config"]["dtype"]``.
        ort_format: load ``.ort`` files (ONNX Runtime's mobile format) instead of ``.onnx``.
        io_binding: keep the KV cache in ONNX Runtime values between steps through an IO binding
            instead of passing numpy arrays. Off by default: at MusicGen-small size it measured 4-6%
            slower per cached step than the plain ``run`` (docs/device.md, "Loop options"; binding
            about 200 inputs and outputs from Python each step costs more than it saves).
        low_memory: turn off ONNX Runtime's CPU memory arena and memory-pattern planning, so freed
            buffers go back to the system (lower peak RSS, as on a phone; slightly slower).
        graph_optimization: ONNX Runtime's graph optimization level when loading ``.onnx`` files, one
            of ``GRAPH_OPTIMIZATION`` (``.ort`` files were optimized when converted).
        session_config: extra session config entries (``SessionOptions.add_session_config_entry``),
            e.g. ``{"session.intra_op.allow_spinning": "0"}``.
        decoder: which decoder graphs to run: ``"merged"`` (``decoder_model_merged``, the exported
            decoder whose cache is concatenated every step), ``"inplace"`` (``cross_kv`` once per clip,
            then ``decoder_step`` writing one position per step into preallocated cache buffers that an
            IO binding binds once as both past and present; ``musicgen.bundle.fast_decoder``), or
            ``"auto"`` (the in-place graphs when the bundle has them). ``io_binding`` applies to the
            merged decoder only: the in-place loop always binds.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        *,
        threads: int | None = None,
        dtypes: dict[str, str] | None = None,
        ort_format: bool = False,
        io_binding: bool = False,
        low_memory: bool = False,
        graph_optimization: str = "all",
        session_config: dict[str, str] | None = None,
        decoder: str = "auto",
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.bundle = Path(bundle)
        cfg_path = self.bundle / "config.json"
        if not cfg_path.is_file():
            raise bad_value(BundleLoadError, "bundle", str(bundle), "a folder holding config.json and onnx/", "run examples/musicgen/export.py first")
        self.config = json.loads(cfg_path.read_text())
        gen_path = self.bundle / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        tjs = self.config.get("transformers.js_config", {}).get("dtype", {})
        inplace = self.config.get(INPLACE_KEY)
        if decoder not in ("auto", "merged", "inplace"):
            raise bad_value(BundleLoadError, "decoder", decoder, "one of ['auto', 'merged', 'inplace']")
        if decoder == "auto":
            decoder = "inplace" if inplace else "merged"
        if decoder == "inplace" and not inplace:
            raise bad_value(BundleLoadError, "decoder", decoder, f"'merged' or 'auto' for {bundle} (it has no in-place "
                            "decoder graphs)", "re-export with export_bundle(..., decoder='inplace')")
        if decoder == "merged" and "decoder_model_merged" not in tjs:
            raise bad_value(BundleLoadError, "decoder", decoder, f"'inplace' or 'auto' for {bundle} (it has only the "
                            "in-place decoder graphs)", "re-export with decoder='merged' or 'both'")
        self.decoder_kind = decoder
        parts = [p for p in PARTS if decoder == "merged" or p != "decoder_model_merged"]
        self.dtypes = {p: (dtypes or {}).get(p, tjs.get(p, "fp32")) for p in parts}
        ext = ".ort" if ort_format else ".onnx"
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if low_memory:
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise bad_value(GenerationArgError, "graph_optimization", graph_optimization, f"one of {sorted(GRAPH_OPTIMIZATION)}")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(str(key), str(value))
        self.files: dict[str, Path] = {}
        self.sessions = {}
        paths = {}
        for part in parts:
            if plan_dtype(self.dtypes[part]) not in SUFFIX:
                raise bad_value(BundleLoadError, f"dtype[{part}]", self.dtypes[part], f"one of {sorted(SUFFIX)}")
            paths[part] = part_file(part, self.dtypes[part], ext)
        if decoder == "inplace":
            for name, entry in inplace.items():
                paths[name] = str(Path(entry["file"]).with_suffix(ext))
                self.dtypes[name] = entry["dtype"]
        for part, rel in paths.items():
            path = self.bundle / rel
            if not path.is_file():
                raise bad_value(BundleLoadError, "bundle", str(bundle), f"must hold {path.relative_to(self.bundle)}",
                                "re-export, or convert with --ort-format" if ort_format else "re-export the bundle")
            self.files[part] = path
            self.sessions[part] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        pad_id = self.config.get("text_encoder", {}).get("pad_token_id", 0) or 0
        self.tokenizer.enable_padding(pad_id=pad_id)
        dec = self.config["decoder"]
        self.num_codebooks = dec["num_codebooks"]
        self.num_layers = dec["num_hidden_layers"]
        self.heads = dec["num_attention_heads"]
        self.head_dim = dec["hidden_size"] // dec["num_attention_heads"]
        self.pad_token_id = self.generation_config.get("pad_token_id", dec.get("pad_token_id"))
        self.start_token_id = self.generation_config.get("decoder_start_token_id", dec.get("bos_token_id"))
        self.sampling_rate = self.config["audio_encoder"].get("sampling_rate", 32000)
        self.frame_rate = self.config["audio_encoder"].get("frame_rate") or 50
        self.io_binding = io_binding
        self.max_positions = dec.get("max_position_embeddings", 2048)
        self.vocab_size = dec["vocab_size"]
        self._types = {p: {i.name: _NP.get(i.type, np.float32) for i in s.get_inputs()} for p, s in self.sessions.items()}

    # -- stages ---------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask (batch, len), padded to the longest prompt."""
        enc = self.tokenizer.encode_batch(list(prompts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask

    def encode_text(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """T5 encoder states (batch, len, hidden) as float32."""
        (hidden,) = self.sessions["text_encoder"].run(None, {"input_ids": ids, "attention_mask": mask})
        return hidden.astype(np.float32)

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """EnCodec: codes (B, K, frames) -> float32 audio (B, channels, samples)."""
        (audio,) = self.sessions["encodec_decode"].run(None, {"audio_codes": codes[None].astype(np.int64)})
        return audio.astype(np.float32)

    def generate_codes(self, hidden: np.ndarray, mask: np.ndarray, *, max_new_tokens: int, **kwargs) -> np.ndarray:
        """The decoder loop: returns audio codes (B, K, frames), frames = max_new_tokens - (K - 1).

        ``kwargs``: ``guidance_scale``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``timings``, ``progress`` (a tqdm bar over decoder steps, on stderr); see ``_steps``.
        """
        for ids, pattern in self._steps(hidden, mask, max_new_tokens=max_new_tokens, **kwargs):
            pass
        ids = apply_delay_pattern(ids, pattern)
        keep = ids != self.pad_token_id
        return ids[keep].reshape(hidden.shape[0], self.num_codebooks, -1)

    def code_frames(self, hidden: np.ndarray, mask: np.ndarray, *, max_new_tokens: int, **kwargs) -> Iterator[np.ndarray]:
        """The decoder loop, yielding each code frame ``[B, K]`` as soon as all its codebooks exist.

        Under the delay pattern codebook ``c`` of frame ``f`` is sampled at step ``f + c``, so frame
        ``f`` is complete after step ``f + K - 1``; the frames equal ``generate_codes``'s.
        """
        k = self.num_codebooks
        frames = max_new_tokens - (k - 1)
        b = hidden.shape[0]
        f = 0
        for ids, pattern in self._steps(hidden, mask, max_new_tokens=max_new_tokens, **kwargs):
            step = ids.shape[1] - 2  # ids holds the start token and one token per step so far
            if f + k - 1 <= step and f < frames:
                full = apply_delay_pattern(ids, pattern).reshape(b, k, -1)
                while f + k - 1 <= step and f < frames:
                    yield np.stack([full[:, c, f + c + 1] for c in range(k)], axis=1)
                    f += 1

    def _steps(
        self,
        hidden: np.ndarray,
        mask: np.ndarray,
        *,
        max_new_tokens: int,
        guidance_scale: float | None = 3.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        timings: Timings | None = None,
        progress: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The decoder loop itself: yields ``(ids, delay pattern)`` after every step (ids before the
        pattern is applied: ``(B * K, 1 + steps so far)``)."""
        k = self.num_codebooks
        least = k - 1 + MIN_FRAMES
        if max_new_tokens < least:
            raise bad_value(GenerationArgError, "max_new_tokens", max_new_tokens,
                            f">= {least}: codebooks - 1 delay steps plus {MIN_FRAMES} frames, the shortest input the exported "
                            "EnCodec graph decodes like PyTorch (its first convolution's reflect padding takes another "
                            "branch below that length)")
        if do_sample and not (np.isfinite(temperature) and temperature > 0):
            raise bad_value(GenerationArgError, "temperature", temperature, "a finite number > 0 when sampling",
                            "use do_sample=False for greedy")
        if not 0 < top_p <= 1:  # NaN fails this too
            raise bad_value(GenerationArgError, "top_p", top_p, "in (0, 1]")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise bad_value(GenerationArgError, "top_k", top_k, "an integer >= 0 (0: no top-k filter)")
        if guidance_scale is not None and not (np.isfinite(guidance_scale) and guidance_scale >= 0):
            raise bad_value(GenerationArgError, "guidance_scale", guidance_scale, "None or a finite number >= 0 "
                            "(<= 1: no classifier-free guidance)")
        timings = timings if timings is not None else Timings()
        rng = np.random.default_rng(seed) if do_sample else None
        cfg = guidance_scale is not None and guidance_scale > 1
        b = hidden.shape[0]
        if cfg:
            hidden = np.concatenate([hidden, np.zeros_like(hidden)], 0)
            mask = np.concatenate([mask, np.zeros_like(mask)], 0)
        max_length = 1 + max_new_tokens
        ids = np.full((b * k, 1), self.start_token_id, dtype=np.int64)
        pattern = build_delay_pattern(b * k, k, self.pad_token_id, max_length)
        t0 = time.perf_counter()
        if self.decoder_kind == "inplace":
            run = self._inplace_decoder(hidden, mask, max_new_tokens=max_new_tokens)
        else:
            run = self._merged_decoder(hidden, mask)
        timings.add("decoder_first_step", time.perf_counter() - t0)  # the in-place cross K/V: once per clip
        steps = range(max_new_tokens)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="decoder steps", unit="tok")
        for step in steps:
            t0 = time.perf_counter()
            dec_in = apply_delay_pattern(ids, pattern)
            if step > 0:
                dec_in = dec_in[:, -1:]
            if cfg:
                dec_in = np.concatenate([dec_in, dec_in], 0)
            logits = run(dec_in, step)
            logits = logits.astype(np.float32)
            if cfg:
                cond, uncond = logits[: b * k], logits[b * k :]
                logits = uncond + (cond - uncond) * guidance_scale
            nxt = sample_next(logits, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p)
            ids = np.concatenate([ids, nxt[:, None].astype(np.int64)], 1)
            timings.add("decoder_first_step" if step == 0 else "decoder_cached_steps", time.perf_counter() - t0)
            timings.decoder_steps += 1
            yield ids, pattern

    def _merged_decoder(self, hidden: np.ndarray, mask: np.ndarray):
        """``run(dec_in, step) -> logits (rows, vocab)`` over ``decoder_model_merged``: the exported graph
        returns the cache concatenated with the new position, which the next step feeds back."""
        sess = self.sessions["decoder_model_merged"]
        types = self._types["decoder_model_merged"]
        float_t = types.get("encoder_hidden_states", np.float32)
        past_names = [n for n in (i.name for i in sess.get_inputs()) if n.startswith("past_key_values.")]
        out_names = [o.name for o in sess.get_outputs()]
        rows = hidden.shape[0]
        past: dict = {n: np.zeros((rows, self.heads, 0, self.head_dim), dtype=types[n]) for n in past_names}
        static = {"encoder_hidden_states": hidden.astype(float_t), "encoder_attention_mask": mask.astype(np.int64)}
        if self.io_binding:
            import onnxruntime as ort

            static = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in static.items()}

        def run(dec_in: np.ndarray, step: int) -> np.ndarray:
            nonlocal past
            flag = np.array([step > 0])
            if self.io_binding:
                binding = sess.io_binding()
                binding.bind_cpu_input("input_ids", np.ascontiguousarray(dec_in))
                binding.bind_cpu_input("use_cache_branch", flag)
                for n, v in static.items():
                    binding.bind_ortvalue_input(n, v)
                for n, v in past.items():
                    if isinstance(v, np.ndarray):
                        binding.bind_cpu_input(n, v)
                    else:
                        binding.bind_ortvalue_input(n, v)
                for n in out_names:
                    binding.bind_output(n, "cpu")
                sess.run_with_iobinding(binding)
                outs = binding.get_outputs()
                logits = outs[0].numpy()
                present = outs[1:]
            else:
                feed = {"input_ids": dec_in, "use_cache_branch": flag, **static, **past}
                outs = sess.run(None, feed)
                logits, present = outs[0], outs[1:]
            past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(out_names[1:], present)}
            return logits[:, -1, :]

        return run

    def _inplace_decoder(self, hidden: np.ndarray, mask: np.ndarray, *, max_new_tokens: int):
        """``run(dec_in, step) -> logits (rows, vocab)`` over the in-place graphs (``fast_decoder``).

        Runs ``cross_kv`` once, allocates the self-attention cache for the whole clip (rows, heads,
        ``max_new_tokens``, head_dim) per layer and binds it once as both ``past_*`` and ``present_*``
        (``GroupQueryAttention`` then writes each new position in place), with the cross keys and
        values, the mask and a logits buffer; each step rebinds only ``input_ids``, ``seqlens_k`` and
        ``total_sequence_length``. One position per step (the first step is the start token).
        """
        import onnxruntime as ort

        if max_new_tokens > self.max_positions:
            raise bad_value(GenerationArgError, "max_new_tokens", max_new_tokens,
                            f"<= {self.max_positions} (the decoder's max_position_embeddings) with the in-place decoder")
        rows = hidden.shape[0]
        mask64 = np.ascontiguousarray(mask.astype(np.int64))
        cross_sess = self.sessions["cross_kv"]
        cross = cross_sess.run(None, {"encoder_hidden_states": np.ascontiguousarray(hidden.astype(np.float32)),
                                      "encoder_attention_mask": mask64})
        sess = self.sessions["decoder_step"]
        binding = sess.io_binding()
        keep: list = [mask64, *cross]
        binding.bind_cpu_input("encoder_attention_mask", mask64)
        for out, value in zip(cross_sess.get_outputs(), cross):
            binding.bind_cpu_input(out.name, value)
        for i in range(self.num_layers):
            for kv in ("key", "value"):
                buf = np.zeros((rows, self.heads, max_new_tokens, self.head_dim), np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                keep += [buf, value]
                binding.bind_ortvalue_input(f"past_{kv}.{i}", value)
                binding.bind_ortvalue_output(f"present_{kv}.{i}", value)
        logits = np.empty((rows * self.num_codebooks, 1, self.vocab_size), np.float32)
        out = ort.OrtValue.ortvalue_from_numpy(logits)
        keep += [logits, out]
        binding.bind_ortvalue_output("logits", out)

        def run(dec_in: np.ndarray, step: int) -> np.ndarray:
            if dec_in.shape[1] != 1:
                raise bad_value(GenerationArgError, "dec_in", dec_in.shape, "one position per step (in-place decoder)")
            step_in = {"input_ids": np.ascontiguousarray(dec_in), "seqlens_k": np.full(rows, step, np.int32),
                       "total_sequence_length": np.array(step + 1, np.int32)}
            for name, value in step_in.items():
                binding.bind_cpu_input(name, value)
            sess.run_with_iobinding(binding)
            return logits[:, -1, :]

        run.bound_buffers = keep  # the numpy memory the bound values point to lives as long as `run`
        return run

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int, timings: Timings | None = None, **kwargs) -> np.ndarray:
        """Prompts -> float32 audio (B, channels, samples). ``kwargs`` go to ``generate_codes``."""
        timings = timings if timings is not None else Timings()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(x, str) for x in prompts):
            raise bad_value(GenerationArgError, "prompts", prompts, "a string or a non-empty list of strings")
        t_start = t = time.perf_counter()
        ids, mask = self.tokenize(prompts)
        timings.add("tokenize", time.perf_counter() - t)
        t = time.perf_counter()
        hidden = self.encode_text(ids, mask)
        timings.add("text_encoder", time.perf_counter() - t)
        codes = self.generate_codes(hidden, mask, max_new_tokens=max_new_tokens, timings=timings, **kwargs)
        t = time.perf_counter()
        audio = self.decode_audio(codes)
        timings.add("encodec_decode", time.perf_counter() - t)
        timings.first_audio_s = time.perf_counter() - t_start
        return audio

    def generate_stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        window: int = 50,
        overlap: int = 10,
        fade: str = "linear",
        timings: Timings | None = None,
        **kwargs,
    ) -> Iterator[np.ndarray]:
        """One prompt -> float32 audio chunks ``(1, channels, n)`` while the decoder generates.

        EnCodec decodes windows of ``window`` code frames that overlap by ``overlap`` frames, cross-faded
        (``musicgen.bundle.streaming.stream_decode``); the first chunk comes after ``window + K - 1``
        decoder steps instead of all of them. ``kwargs`` go to ``generate_codes``. ``timings`` gets
        ``first_audio_s`` and the windowed decodes under ``encodec_decode``.
        """
        if not isinstance(prompt, str):
            raise bad_value(GenerationArgError, "prompt", prompt, "one prompt (a str): streaming plays one clip")
        check_stream_args(window, overlap, fade, min_frames=MIN_FRAMES)
        timings = timings if timings is not None else Timings()
        t_start = time.perf_counter()
        ids, mask = self.tokenize([prompt])
        timings.add("tokenize", time.perf_counter() - t_start)
        t = time.perf_counter()
        hidden = self.encode_text(ids, mask)
        timings.add("text_encoder", time.perf_counter() - t)

        def decode(codes: np.ndarray) -> np.ndarray:
            t = time.perf_counter()
            audio = self.decode_audio(codes)  # codes [1, K, t]: one clip
            timings.add("encodec_decode", time.perf_counter() - t)
            return audio

        frames = (f[0] for f in self.code_frames(hidden, mask, max_new_tokens=max_new_tokens, timings=timings, **kwargs))
        for chunk in stream_decode(frames, decode, window=window, overlap=overlap, fade=fade, min_frames=MIN_FRAMES):
            if timings.first_audio_s is None:
                timings.first_audio_s = time.perf_counter() - t_start
            yield chunk
