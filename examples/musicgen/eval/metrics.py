"""FAD and CLAP score of generated clips, per embedder, and retention against a baseline (CLI: ``evaluate.py``).

Result keys name the embedder: ``fad_<key>`` (lower is better) and ``clap_score_<key>`` (higher is
better), where ``<key>`` is ``clap``, ``vggish``, ``encodec`` or ``clap-mini-proxy`` (the offline
proxy, never to be read as LAION CLAP). Retention is ``kdq.metrics.retention`` (docs/metrics.md):
compressed CLAP / baseline CLAP, and baseline FAD / compressed FAD.

"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdq.metrics import clap_score, frechet_bootstrap, frechet_distance, retention_table
from musicgen.data.audiofolder import load_audio, read_split
from musicgen.eval.embedders import (
    AudioEmbedder,
    ClapEmbedder,
    ClapMiniEmbedder,
    EmbedderError,
    EmbedderUnavailable,
    EncodecEmbedder,
    VGGishEmbedder,
    train_clap_mini,
)

__all__ = ["clap_score_with", "evaluate", "fad_with", "load_clips", "offline_embedders"]


def label(embedder: AudioEmbedder) -> str:
    """Human-readable name: ``clap-mini (proxy)`` for proxies."""
    return f"{embedder.name} (proxy)" if embedder.proxy else embedder.name


def fad_with(
    embedder: AudioEmbedder,
    generated: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    *,
    sample_rate: int,
    reference_sample_rate: int | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """``{"fad_<key>": value, "rows_fad_<key>": [M_gen, M_ref], "ci_fad_<key>": [low, high]?}``.

    Rows are what the Gaussians are fitted on (frames for frame-level embedders, clips otherwise).
    ``bootstrap`` > 0 adds a 95% bootstrap interval with that many replicates.
    """
    a = embedder.fad_embeddings(generated, sample_rate)
    b = embedder.fad_embeddings(reference, reference_sample_rate or sample_rate)
    key = f"fad_{embedder.key}"
    if bootstrap:
        est = frechet_bootstrap(a, b, n_boot=bootstrap, seed=seed)
        return {key: est.value, f"rows_{key}": [est.n_a, est.n_b], f"ci_{key}": [est.low, est.high]}
    return {key: frechet_distance(a, b), f"rows_{key}": [len(a), len(b)]}


def clap_score_with(embedder: AudioEmbedder, prompts: Sequence[str], audio: Sequence[np.ndarray], *, sample_rate: int) -> dict:
    """``{"clap_score_<key>": mean cosine(text_i, audio_i)}`` for a joint text-audio embedder."""
    return {f"clap_score_{embedder.key}": clap_score(embedder.embed_text(list(prompts)), embedder.embed(audio, sample_rate))}


def evaluate(
    generated: Sequence[np.ndarray],
    prompts: Sequence[str],
    reference: Sequence[np.ndarray],
    *,
    sample_rate: int,
    reference_sample_rate: int | None = None,
    embedders: Sequence[AudioEmbedder],
    bootstrap: int = 0,
    baseline: dict | None = None,
) -> dict:
    """FAD per embedder, CLAP score per joint text-audio embedder, and retention against ``baseline``.

    Args:
        generated: generated clips (one per prompt).
        prompts: the prompt each clip was generated from.
        reference: real clips the FAD reference Gaussian is fitted on.
        sample_rate: rate of ``generated``.
        reference_sample_rate: rate of ``reference`` (default ``sample_rate``).
        embedders: the embedders to use (``offline_embedders`` builds the available ones).
        bootstrap: replicates for FAD intervals (0 = none).
        baseline: an earlier result of the uncompressed model, for ``retention_*`` keys.
    """
    if len(generated) != len(prompts):
        raise EmbedderError(
            f"generated has {len(generated)} clips and prompts {len(prompts)}; need one prompt per clip"
        )
    result: dict = {"n_generated": len(generated), "n_reference": len(reference), "embedders": {}}
    for emb in embedders:
        result["embedders"][emb.key] = label(emb)
        result.update(fad_with(emb, generated, reference, sample_rate=sample_rate,
                               reference_sample_rate=reference_sample_rate, bootstrap=bootstrap))
        if emb.has_text:
            result.update(clap_score_with(emb, prompts, generated, sample_rate=sample_rate))
    if baseline is not None:
        result.update(retention_table(baseline, result))
    return result


def offline_embedders(
    *,
    clap: str | Path | None = None,
    vggish: str | Path | None = None,
    codec: str | Path | AudioEmbedder | None = None,
    clap_mini: str | Path | AudioEmbedder | None = None,
) -> tuple[list[AudioEmbedder], dict[str, str]]:
    """Build every requested embedder that loads here; return them and ``{name: why not}`` for the rest.

    Args:
        clap: CLAP folder or hub id.
        vggish: VGGish safetensors file.
        codec: EnCodec or MusicGen folder, or a ready ``EncodecEmbedder``.
        clap_mini: clap-mini cache folder, or a ready ``ClapMiniEmbedder``.
    """
    ready: list[AudioEmbedder] = []
    missing: dict[str, str] = {}
    loaders = {
        "clap": (clap, lambda v: ClapEmbedder.from_pretrained(v)),
        "vggish": (vggish, lambda v: VGGishEmbedder.from_local(v)),
        "encodec": (codec, lambda v: v if isinstance(v, AudioEmbedder) else EncodecEmbedder.from_pretrained(v)),
        "clap-mini-proxy": (clap_mini, lambda v: v if isinstance(v, AudioEmbedder) else ClapMiniEmbedder.load(v)),
    }
    for name, (value, load) in loaders.items():
        if value is None:
            missing[name] = "not requested"
            continue
        try:
            ready.append(load(value))
        except EmbedderUnavailable as e:
            missing[name] = str(e)
    return ready, missing


def load_clips(root: str | Path, split: str, sample_rate: int) -> tuple[list[np.ndarray], list[str]]:
    """Audio (mono, at ``sample_rate``) and captions of an audiofolder split."""
    clips = read_split(root, split)
    return [load_audio(c.path, sample_rate) for c in clips], [c.text for c in clips]


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per result set, one column per score key (FAD with its interval)."""
    keys = sorted({k for r in results.values() for k, v in r.items()
                   if k.startswith(("fad_", "clap_score_", "retention_")) and (v is None or isinstance(v, float))})
    lines = ["| set | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in results.items():
        cells = []
        for k in keys:
            v, ci = r.get(k), r.get(f"ci_{k}")
            cells.append("" if v is None else f"{v:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
