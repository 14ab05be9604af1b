"""Valid split only: the shipped teacher against student_base on FAD (mel-chroma) and key accuracy
under three sampling settings (docs/reproduction.md, "What held").

    python benchmarks/teacher_fad_valid.py
"""
import sys, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import numpy as np, torch
torch.set_num_threads(2); torch.set_flush_denormal(True)
from musicgen.data.audiofolder import load_audio, read_split
from musicgen.eval.generate import generate
from musicgen.eval.music import MelChromaEmbedder, key_accuracy
from musicgen.models.musicgen import load_musicgen, load_tokenizer
from kdq.metrics import frechet_bootstrap
hub = str(ROOT / "examples/musicgen/hub/mini")
clips = read_split(str(ROOT / "runs/world/render/data"), "valid")[:100]
ref = [load_audio(c.path, 8000) for c in clips]
caps = [c.text for c in clips]
emb = MelChromaEmbedder()
R = emb.units(ref, 8000)
for name in ("teacher", "student_base"):
    m = load_musicgen(f"{hub}/{name}"); tok = load_tokenizer(f"{hub}/{name}")
    for g, k in ((3.0, 250), (1.0, 250), (3.0, 50)):
        a = generate(m, tok, caps, seconds=4.0, seed=0, guidance_scale=g, top_k=k, batch=50, progress=False)
        f = frechet_bootstrap(emb.units(a, 8000), R, n_boot=50, seed=0)
        ka = key_accuracy(a, caps, 8000)
        rms = float(np.mean([np.sqrt((x**2).mean()) for x in a]))
        print(name, f"g={g} k={k}", "FAD", round(f.value, 1), [round(f.low, 1), round(f.high, 1)], "key", round(ka.accuracy, 3), "rms", round(rms, 4), flush=True)
print("ref rms", float(np.mean([np.sqrt((x**2).mean()) for x in ref])))
