"""Short example: FAD and CLAP score of sets of rendered clips, with every embedder available offline.

There is no trained generator here, so the "generated" sets are made from real rendered music whose
quality is known by construction, which shows what each score responds to:

- ``clean``: held-out clips (the ``valid`` split) with their own captions as prompts: the ideal system;
- ``degraded``: the same clips low-passed at 1.5 kHz with added noise: worse audio, right prompts;
- ``mismatched``: the same clean clips, but each paired with another clip's caption: right audio,
  wrong prompts.

The reference set for FAD is the ``test`` split (other pieces). Steps: render a small mini-world
dataset (``musicgen.data.render``: music21 pieces through a General MIDI SoundFont), train ``clap-mini``
(the offline CLAP proxy) on its ``train`` split and report its held-out retrieval, then score each
set with clap-mini and with codec latents (``--codec`` for a trained EnCodec or MusicGen folder;
by default the tiny MusicGen's untrained EnCodec, keyed ``encodec-tiny-random``, which shows the
plumbing but carries little information). CLAP and VGGish are listed with the reason they are
unavailable, or used when ``--clap``/``--vggish`` point at local weights. Retention of each set is
reported against ``clean`` as the baseline.

    flock /tmp/kdq-heavy.lock python examples/musicgen/metrics_demo.py --out runs/metrics_demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np


def degrade(clip: np.ndarray, sample_rate: int, *, seed: int) -> np.ndarray:
    """Low-pass at 1.5 kHz (8th-order Butterworth) and add white noise at about 10 dB SNR."""
    from scipy.signal import butter, sosfilt

    sos = butter(8, 1500, btype="low", fs=sample_rate, output="sos")
    y = sosfilt(sos, clip)
    rms = float(np.sqrt(np.mean(y**2)) + 1e-8)
    return (y + np.random.default_rng(seed).normal(scale=rms / np.sqrt(10), size=y.shape)).astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="FAD and CLAP score of rendered clip sets (see module docstring)")
    p.add_argument("--out", default="runs/metrics_demo")
    p.add_argument("--pieces", default="bach=100,folk=50", help="mini-world pieces per source")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--clap-mini-steps", type=int, default=1000)
    p.add_argument("--codec", help="EnCodec or MusicGen folder (default: the tiny random MusicGen's EnCodec)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--clap", help="local CLAP folder, if any")
    p.add_argument("--vggish", help="local VGGish safetensors, if any")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from kdq.metrics import retention_table
    from musicgen.config import RenderConfig
    from musicgen.data.render import render_dataset
    from musicgen.eval.embedders import EncodecEmbedder, train_clap_mini
    from musicgen.eval.metrics import evaluate, format_table, load_clips, offline_embedders
    from musicgen.files import write_json
    from musicgen.models.tiny import build_tiny_musicgen

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    sr = args.sample_rate
    if not (data / "stats.json").exists():
        pieces = {k: int(v) for k, v in (kv.split("=") for kv in args.pieces.split(","))}
        cfg = RenderConfig(pieces=pieces, sample_rate=sr, renders_per_piece=2, clips_per_render=3, fractions=(0.15, 0.15))
        render_dataset(cfg, data, seed=0)
    stats = json.loads((data / "stats.json").read_text())

    t0 = time.perf_counter()
    clap_mini = train_clap_mini(data, out_dir=out / "clap-mini", steps=args.clap_mini_steps, eval_split="test",
                                weight_decay=0.05, spec_augment=True, num_threads=args.threads)
    train_s = time.perf_counter() - t0
    if args.codec:
        codec = EncodecEmbedder.from_pretrained(args.codec)
    else:  # an untrained codec: its latents carry little information (kept to show the plumbing)
        codec = EncodecEmbedder(build_tiny_musicgen(0).audio_encoder, name="encodec-tiny-random")
    embedders, missing = offline_embedders(clap=args.clap, vggish=args.vggish or "(no local VGGish weights)",
                                           codec=codec, clap_mini=clap_mini)

    clean, prompts = load_clips(data, "valid", sr)
    reference, _ = load_clips(data, "test", sr)
    rng = np.random.default_rng(0)
    sets = {
        "clean": (clean, prompts),
        "degraded": ([degrade(c, sr, seed=i) for i, c in enumerate(clean)], prompts),
        "mismatched": (clean, [prompts[i] for i in rng.permutation(len(prompts))]),
    }
    results = {}
    t1 = time.perf_counter()
    for name, (audio, texts) in sets.items():
        results[name] = evaluate(audio, texts, reference, sample_rate=sr, embedders=embedders, bootstrap=args.bootstrap)
    for name in ("degraded", "mismatched"):
        results[name].update(retention_table(results["clean"], results[name]))

    eval_s = time.perf_counter() - t1
    doc = {
        "eval_seconds": round(eval_s, 1),
        "dataset": {k: stats.get(k) for k in ("pieces_rendered", "failures", "clips", "minutes", "distinct_captions", "render_seconds", "sample_rate")},
        "n_valid": len(clean), "n_test": len(reference),
        "clap-mini-proxy": {"train_seconds_this_run": round(train_s, 1), **clap_mini.info},
        "unavailable": {k: v for k, v in missing.items() if v != "not requested"},
        "results": results,
        "note": "encodec-tiny-random = the tiny random MusicGen's EnCodec (latents of an untrained codec); clap-mini is a proxy "
                "trained here, not LAION CLAP. Values are not comparable across embedders or with the paper.",
    }
    write_json(out / "results.json", doc)
    r = clap_mini.info.get("retrieval", {})
    print(f"clap-mini (proxy) held-out retrieval on {r.get('n_clips')} clips / {r.get('n_captions')} captions: "
          f"text->audio R@1 {r.get('text_to_audio_R@1', 0):.2f} (chance {r.get('text_to_audio_chance@1', 0):.2f}), "
          f"R@5 {r.get('text_to_audio_R@5', 0):.2f} (chance {r.get('text_to_audio_chance@5', 0):.2f}); "
          f"audio->text R@1 {r.get('audio_to_text_R@1', 0):.2f} (chance {r.get('audio_to_text_chance@1', 0):.2f}), "
          f"R@5 {r.get('audio_to_text_R@5', 0):.2f} (chance {r.get('audio_to_text_chance@5', 0):.2f})")
    print(f"generated sets: {len(clean)} clips each; FAD reference: {len(reference)} test clips")
    print(format_table(results))
    for name, why in doc["unavailable"].items():
        print(f"{name}: unavailable: {why[:160]}")
    return doc


if __name__ == "__main__":
    main()
