"""Valid split only: does more training help the shipped teacher? (issue 21 diagnosis)

Continues the shipped teacher STEPS more steps (LR with warm-up 30 and cosine decay) on the train
tokens of a main-job run, and reports before and after: valid NLL, NLL on every 8th train clip, and
for 60 valid captions (4 s, guidance 3, top-k 250) instrument accuracy (classifier folder from
``caption_alignment_valid.py``'s ``recon_clf`` part), key accuracy and the log-mel frame std.

    flock /tmp/kdq-heavy.lock .venv/bin/python benchmarks/teacher_more_steps_valid.py 1500 1e-3 /tmp/ft1500 --before
"""
import sys, json, time
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import numpy as np, torch
from pathlib import Path
from musicgen.config import TrainConfig
from musicgen.data.audiofolder import read_split
from musicgen.data.tokens import TokenDataset
from musicgen.eval.heldout import heldout
from musicgen.eval.generate import generate
from musicgen.eval.instrument import InstrumentClassifier, instrument_accuracy
from musicgen.eval.music import key_accuracy, MelChromaEmbedder
from musicgen.models.musicgen import load_musicgen, load_tokenizer
from musicgen.train.loop import train
from musicgen.train.objectives import LMObjective

def main():
    torch.set_num_threads(2); torch.set_flush_denormal(True)
    steps, lr, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = pos[3] if len(pos) > 3 else str(ROOT / "examples/musicgen/hub/mini/teacher")
    tokp = ROOT / "runs/mini/tokens"
    tr, va = TokenDataset.load(f"{tokp}/train.safetensors"), TokenDataset.load(f"{tokp}/valid.safetensors")
    trsub = tr.subset(list(range(0, len(tr), 8)))
    model, tok = load_musicgen(src), load_tokenizer(src)
    clf = InstrumentClassifier.load(ROOT / "benchmarks/results/tmp/clf_both")
    emb = MelChromaEmbedder()
    def figs(m, tag):
        t0 = time.time()
        r = {"valid_nll": round(heldout(m, tok, va)["nll"], 4), "train_nll": round(heldout(m, tok, trsub)["nll"], 4)}
        caps = va.captions[:60]
        audio = generate(m, tok, caps, seconds=4.0, seed=0, batch=30)
        r["instrument"] = round(instrument_accuracy(audio, caps, 8000, classifier=clf).accuracy, 3)
        r["key"] = round(key_accuracy(audio, caps, 8000).accuracy, 3)
        mel = np.concatenate(emb.embed_frames(audio, 8000))[:, :64]
        r["mel_std"] = round(float(mel.std(0).mean()), 3)
        r["s"] = round(time.time() - t0, 1)
        print(tag, json.dumps(r), flush=True)
        return r
    if "--before" in sys.argv:
        figs(model, "before")
    cfg = TrainConfig(steps=steps, micro_batch=8, lr=lr, warmup_steps=30, weight_decay=0.01, betas=(0.9, 0.95),
                      max_grad_norm=1.0, checkpoint_every=250, log_every=50)
    t0 = time.time()
    s = train(model, LMObjective(tr, tok, cfg_dropout=0.1), cfg, out / "run", progress=False)
    print("train s", round(time.time() - t0, 1), flush=True)
    model.save_pretrained(out / "model"); tok.save_pretrained(out / "model")
    figs(model.eval(), f"after {steps}")

if __name__ == "__main__":
    main()
