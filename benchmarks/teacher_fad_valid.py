"""Valid split only: why FAD on mel-chroma frames does not rank the shipped teacher ahead of
student_base, and what does (docs/reproduction.md, "What held").

For each model and sampling setting (guidance, top-k, temperature), 100 valid captions, 4 s each:
FAD with a 95% clip-bootstrap interval on the ``mel-chroma`` embedder, on its mel part alone and on
its pitch part alone (``chroma``), the paired teacher - student_base difference on each, key
accuracy, and two figures of the clips' dynamics: the mean per-dimension standard deviation of the
log-mel frames and the share of quiet frames (mean log10 mel power below -3). Reference points: the
real clips' first half against their second half (how far two real sets are) and the codec's
reconstructions of the real clips.

    flock /tmp/kdq-heavy.lock .venv/bin/python benchmarks/teacher_fad_valid.py \\
        --out benchmarks/results/teacher_fad_valid.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdq.metrics import frechet_bootstrap, frechet_distance, paired_bootstrap  # noqa: E402
from musicgen.data.audiofolder import load_audio, read_split  # noqa: E402
from musicgen.eval.generate import generate  # noqa: E402
from musicgen.eval.music import MelChromaEmbedder, key_accuracy  # noqa: E402
from musicgen.models.musicgen import load_musicgen, load_tokenizer  # noqa: E402

SETTINGS = ((3.0, 250, 1.0), (1.0, 250, 1.0), (3.0, 50, 1.0), (3.0, 250, 0.6))  # guidance, top-k, temperature
PARTS = {"mel-chroma": slice(0, 76), "mel": slice(0, 64), "chroma": slice(64, 76)}


def dynamics(units: list[np.ndarray]) -> dict:
    mel = np.concatenate(units)[:, :64]
    return {"mel_std_per_dim": round(float(mel.std(0).mean()), 3), "quiet_frames": round(float(np.mean(mel.mean(1) < -3)), 3)}


def fads(units: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    out = {}
    for name, cut in PARTS.items():
        f = frechet_bootstrap([u[:, cut] for u in units], [r[:, cut] for r in ref], n_boot=200, seed=0)
        out[name] = [round(f.value, 1), round(f.low, 1), round(f.high, 1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    hub = ROOT / "examples/musicgen/hub/mini"
    clips = read_split(str(ROOT / "runs/world/render/data"), "valid")[: args.clips]
    real = [load_audio(c.path, 8000) for c in clips]
    captions = [c.text for c in clips]
    emb = MelChromaEmbedder()
    ref = emb.units(real, 8000)
    half = len(ref) // 2
    out: dict = {"clips": len(ref), "reference": {"real clips": dynamics(ref)}, "fad": {}, "paired": {}}
    out["fad"]["real, first half against second half"] = fads(ref[:half], ref[half:])
    models = {name: (load_musicgen(hub / name), load_tokenizer(hub / name)) for name in ("teacher", "student_base")}
    with torch.no_grad():
        codec = models["teacher"][0].audio_encoder
        x = torch.from_numpy(np.stack(real)).float()[:, None]
        recon = codec.decode(codec.encode(x).audio_codes, [None]).audio_values[:, 0].numpy()[:, : x.shape[-1]]
    units = emb.units(list(recon), 8000)
    out["fad"]["codec reconstruction"] = fads(units, ref)
    out["reference"]["codec reconstruction"] = dynamics(units)
    for g, k, t in SETTINGS:
        setting = f"guidance {g:g}, top-k {k}, temperature {t:g}"
        gen = {}
        for name, (model, tok) in models.items():
            audio = generate(model, tok, captions, seconds=4.0, seed=0, guidance_scale=g, top_k=k, temperature=t, batch=50)
            gen[name] = emb.units(audio, 8000)
            out["fad"][f"{name}, {setting}"] = {**fads(gen[name], ref), **dynamics(gen[name]),
                                                "key_accuracy": round(key_accuracy(audio, captions, 8000).accuracy, 3)}
        for part, cut in PARTS.items():
            p = paired_bootstrap(frechet_distance, [u[:, cut] for u in gen["teacher"]], [u[:, cut] for u in gen["student_base"]],
                                 [r[:, cut] for r in ref], n_boot=200, seed=0)
            out["paired"][f"teacher - student_base, {setting}, {part}"] = [round(p.estimate, 1), round(p.low, 1), round(p.high, 1)]
        print(setting, json.dumps({k: v for k, v in out["fad"].items() if setting in k}), flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
