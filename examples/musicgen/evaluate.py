"""FAD and CLAP score of generated clips, per embedder, and retention against a baseline.

Result keys name the embedder: ``fad_<key>`` (lower is better) and ``clap_score_<key>`` (higher is
better), where ``<key>`` is ``clap``, ``vggish``, ``encodec`` or ``clap-mini-proxy`` (the offline
proxy, never to be read as LAION CLAP). Retention is ``kdq.metrics.retention`` (docs/metrics.md):
compressed CLAP / baseline CLAP, and baseline FAD / compressed FAD.

CLI (datasets in the audiofolder layout; generated clips carry their prompt in ``text``)::

    python examples/musicgen/evaluate.py --generated out/gen --reference data --reference-split test \\
        --codec path/to/musicgen --clap-mini cache/clap-mini --train-clap-mini data --out result.json \\
        [--baseline baseline_result.json] [--clap laion/larger_clap_music] [--vggish vggish.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from kdq.metrics import clap_score, frechet_bootstrap, frechet_distance, retention_table
from musicgen.audiofolder import load_audio, read_split
from musicgen.embedders import (
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


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", required=True, help="audiofolder root of generated clips (text = prompt)")
    p.add_argument("--generated-split", default="test")
    p.add_argument("--reference", required=True, help="audiofolder root of real reference clips")
    p.add_argument("--reference-split", default="test")
    p.add_argument("--clap", help="CLAP folder or hub id (e.g. laion/larger_clap_music)")
    p.add_argument("--vggish", help="VGGish weights converted to safetensors")
    p.add_argument("--codec", help="EnCodec or MusicGen folder whose encoder gives the codec latents")
    p.add_argument("--clap-mini", help="clap-mini (proxy) cache folder")
    p.add_argument("--train-clap-mini", metavar="ROOT", help="train clap-mini on ROOT/train into --clap-mini if absent")
    p.add_argument("--clap-mini-steps", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for FAD intervals")
    p.add_argument("--baseline", help="result JSON of the uncompressed model, for retention")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)

    if args.train_clap_mini:
        if not args.clap_mini:
            p.error("--train-clap-mini needs --clap-mini (the cache folder)")
        # The settings documented in docs/metrics.md (and used by metrics_demo.py).
        train_clap_mini(args.train_clap_mini, out_dir=args.clap_mini, steps=args.clap_mini_steps,
                        weight_decay=0.05, spec_augment=True)
    embedders, missing = offline_embedders(clap=args.clap, vggish=args.vggish, codec=args.codec, clap_mini=args.clap_mini)
    if not embedders:
        p.error("no embedder is available: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    rate = 32000
    gen, prompts = load_clips(args.generated, args.generated_split, rate)
    ref, _ = load_clips(args.reference, args.reference_split, rate)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    result = evaluate(gen, prompts, ref, sample_rate=rate, embedders=embedders, bootstrap=args.bootstrap, baseline=baseline)
    result["unavailable"] = {k: v for k, v in missing.items() if v != "not requested"}
    for emb in embedders:
        if isinstance(emb, ClapMiniEmbedder):
            result["clap-mini-proxy_retrieval"] = emb.info.get("retrieval")
    print(format_table({"generated": result}))
    for name, why in result["unavailable"].items():
        print(f"{name}: unavailable: {why}")
    if args.out:
        write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
