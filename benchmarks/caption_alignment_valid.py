"""Valid split only: why the mini world's models ignore the instrument their caption names (issue 21).

Parts (second argument, comma-separated; all by default):
- ``gain``: caption gain per attribute: teacher-forced NLL with one attribute of the caption swapped
  (instrument, key, tempo, style), with another clip's caption (``all``) and with none (``empty``),
  minus NLL with the clip's own caption; all positions, first second, first 10 frames, codebook 0.
- ``text``: does the frozen T5 encoder's mean-pooled output separate each attribute (nearest train
  centroid on valid captions), and how far a one-attribute swap moves it (relative to the spread).
- ``ceiling``: the instrument classifier (trained on real train renders, as the main job's stage is)
  and the key estimator on real valid clips and on their codec reconstructions; log-mel frame std.
- ``recon_clf``: the same classifier trained on codec reconstructions of the train clips, and on real
  clips plus reconstructions, scored on real and reconstructed valid clips.
- ``gen``: the teacher's clips for 60 valid captions under several sampling settings (needs ``CLF``,
  a classifier folder, e.g. one written by ``recon_clf``).

    flock /tmp/kdq-heavy.lock .venv/bin/python benchmarks/caption_alignment_valid.py runs/mini gain,text,ceiling,recon_clf
    CLF=benchmarks/results/tmp/clf_both flock /tmp/kdq-heavy.lock .venv/bin/python benchmarks/caption_alignment_valid.py runs/mini gen

``runs/mini`` is a main-job folder whose ``render`` and ``tokens`` stages have run. Results:
``benchmarks/results/caption_alignment_valid_<parts>.json``.
"""
import sys, json, time
ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT_DIR), str(ROOT_DIR / "examples")]
import numpy as np
import torch
from pathlib import Path

from musicgen.data.audiofolder import load_audio, read_split
from musicgen.data.render import INSTRUMENTS
from musicgen.eval.alignment import ATTRIBUTES, attribute_values, caption_gain, swap_attribute
from musicgen.data.tokens import TokenDataset
from musicgen.eval.instrument import train_instrument_classifier, instrument_accuracy, InstrumentClassifier
from musicgen.eval.music import key_accuracy, MelChromaEmbedder
from musicgen.eval.generate import generate
from musicgen.models.musicgen import load_musicgen, load_tokenizer
from musicgen.models.codec import decode

torch.set_num_threads(2)
torch.set_flush_denormal(True)
RUN = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT_DIR / "runs/mini")
WHAT = sys.argv[2].split(",") if len(sys.argv) > 2 else ["gain", "text", "ceiling", "gen"]
stages = {n: json.loads((RUN / "stages" / f"{n}.json").read_text()) for n in ("render", "tokens")}
root = stages["render"]["result"]["root"]
tokp = stages["tokens"]["result"]["paths"]
HUB = ROOT_DIR / "examples/musicgen/hub/mini"
TEACHER = sys.argv[3] if len(sys.argv) > 3 else str(HUB / "teacher")
STUDENT = str(HUB / "student_base")
out = {}
TMP = ROOT_DIR / "benchmarks/results/tmp"
TMP.mkdir(parents=True, exist_ok=True)

valid = read_split(root, "valid")
train = read_split(root, "train")
ds = TokenDataset.load(tokp["valid"])
assert [c.text for c in valid] == ds.captions
NAMES = [n for _, n in INSTRUMENTS]
VALUES = attribute_values([c.meta for c in valid], ds.captions)


def swap(caption, attr, i):
    own, pools = VALUES[attr]
    return swap_attribute(caption, own[i], pools[i], np.random.default_rng(i))


if "gain" in WHAT:
    t0 = time.time()
    for name, path in (("teacher", TEACHER), ("student_base", STUDENT)):
        model, tok = load_musicgen(path), load_tokenizer(path)
        alts = {attr: [swap(c, attr, i) for i, c in enumerate(ds.captions)] for attr in ATTRIBUTES}
        alts["all"] = [ds.captions[(i + len(ds) // 2) % len(ds)] for i in range(len(ds))]
        alts["empty"] = [""] * len(ds)
        gains = caption_gain(model, tok, ds, alts, batch=25)
        row = {"nll": round(gains["empty"]["own_nll"], 4),
               **{a: {"gain": round(g["gain"], 4), "gain_ci": [round(x, 4) for x in g["gain_ci"]],
                      "gain_cb0": round(g["gain_cb0"], 4)} for a, g in gains.items()}}
        out[f"gain_{name}"] = row
        print(name, json.dumps(row), flush=True)
    print("gain time", time.time() - t0, flush=True)

if "text" in WHAT:
    model, tok = load_musicgen(TEACHER), load_tokenizer(TEACHER)
    enc = model.text_encoder

    @torch.no_grad()
    def pooled(caps):
        t = tok(caps, return_tensors="pt", padding=True)
        h = enc(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        m = t["attention_mask"][..., None].float()
        return ((h * m).sum(1) / m.sum(1)).numpy()

    tr_caps = [c.text for c in train]
    htr, hva = pooled(tr_caps), pooled(ds.captions)
    res = {}
    for attr, lab in (("instrument", lambda m: m["instrument"]), ("key", lambda m: m["key"]), ("tempo", lambda m: m["tempo"]),
                      ("source", lambda m: m["source"])):
        ytr = np.array([lab(c.meta) for c in train]); yva = np.array([lab(c.meta) for c in valid])
        classes = sorted(set(ytr))
        cent = np.stack([htr[ytr == k].mean(0) for k in classes])
        pred = np.array(classes)[((hva[:, None] - cent[None]) ** 2).sum(-1).argmin(1)]
        swapped = pooled([swap(c, attr, i) for i, c in enumerate(ds.captions)]) if attr != "source" else None
        rel = None if swapped is None else float(np.linalg.norm(swapped - hva, axis=1).mean() / np.linalg.norm(hva - hva.mean(0), axis=1).mean())
        res[attr] = {"centroid_acc": round(float((pred == yva).mean()), 3), "chance": round(1 / len(classes), 3),
                     "swap_shift_rel_spread": None if rel is None else round(rel, 3)}
    out["text"] = res
    print("text", json.dumps(res), flush=True)

if "ceiling" in WHAT or "gen" in WHAT:
    sr = stages["tokens"]["result"]["sample_rate"]
    clf_dir = RUN / "instrument" / "model"
    t0 = time.time()
    import os
    if os.environ.get("CLF"):
        clf = InstrumentClassifier.load(os.environ["CLF"])
    elif (clf_dir / "config.json").is_file():
        clf = InstrumentClassifier.load(clf_dir)
    else:
        clips = [c for c in train]
        clf = train_instrument_classifier([load_audio(c.path, sr) for c in clips], [c.meta["instrument"] for c in clips], sr, classes=NAMES)
        clf.save(str(TMP / "clf"))
    print("clf", time.time() - t0, flush=True)
    real = [load_audio(c.path, sr) for c in valid]
    labels = [c.meta["instrument"] for c in valid]
    emb = MelChromaEmbedder()

    def dyn(audio):
        mel = np.concatenate(emb.embed_frames(audio, sr))[:, :64]
        return round(float(mel.std(0).mean()), 3)

    def score(audio, caps):
        ia = instrument_accuracy(audio, caps, sr, classifier=clf)
        ka = key_accuracy(audio, caps, sr)
        from collections import Counter
        return {"instrument": round(ia.accuracy, 3), "key": round(ka.accuracy, 3), "mel_std": dyn(audio),
                "top_pred": Counter(ia.predicted).most_common(3)}

if "ceiling" in WHAT:
    codec = load_musicgen(TEACHER).audio_encoder
    with torch.no_grad():
        recon = [a.numpy() for a in torch.cat([decode(codec, ds.codes[i:i + 25]) for i in range(0, len(ds), 25)])]
    recon = [r[: len(real[0])] for r in recon]
    out["ceiling"] = {"real": score(real, ds.captions), "recon": score(recon, ds.captions)}
    print("ceiling", json.dumps(out["ceiling"]), flush=True)

if "gen" in WHAT:
    settings = [(3.0, 250, 1.0), (3.0, 50, 1.0), (3.0, 250, 0.7), (1.0, 250, 1.0), (6.0, 250, 1.0)]
    if len(sys.argv) > 4:
        settings = [tuple(float(x) for x in s.split(":")) for s in sys.argv[4].split(",")]
    n = 60
    caps = ds.captions[:n]
    res = {}
    for name, path in (("teacher", TEACHER),):
        model, tok = load_musicgen(path), load_tokenizer(path)
        for g, k, t in settings:
            t0 = time.time()
            audio = generate(model, tok, caps, seconds=4.0, seed=0, guidance_scale=g, top_k=int(k), temperature=t, batch=30)
            r = score(audio, caps)
            r["s"] = round(time.time() - t0, 1)
            res[f"{name} g{g} k{int(k)} t{t}"] = r
            print(name, g, k, t, json.dumps(r), flush=True)
    out["gen"] = res

(ROOT_DIR / "benchmarks/results" / ("caption_alignment_valid_%s.json" % "_".join(WHAT))).write_text(json.dumps(out, indent=1))

if "recon_clf" in WHAT:
    codec = load_musicgen(TEACHER).audio_encoder
    trds = TokenDataset.load(tokp["train"])
    assert [c.text for c in train] == trds.captions
    t0 = time.time()
    with torch.no_grad():
        def recon_of(d):
            return [a.numpy()[: len(real[0])] for a in torch.cat([decode(codec, d.codes[i:i + 25]) for i in range(0, len(d), 25)])]
        rtr = recon_of(trds); rva = recon_of(ds)
    print("decode", time.time() - t0, flush=True)
    res = {}
    for name, x, noise in (("recon", rtr, (0.0, 30.0)), ("recon_nonoise", rtr, None), ("both", [load_audio(c.path, sr) for c in train] + rtr, (0.0, 30.0))):
        from musicgen.eval.instrument import InstrumentConfig
        labs = [c.meta["instrument"] for c in train]
        labs = labs * (len(x) // len(labs))
        t0 = time.time()
        c2 = train_instrument_classifier(x, labs, sr, classes=NAMES, cfg=InstrumentConfig(noise_snr_db=noise))
        c2.save(str(TMP / f"clf_{name}"))
        a_real = instrument_accuracy(real, ds.captions, sr, classifier=c2).accuracy
        a_rec = instrument_accuracy(rva, ds.captions, sr, classifier=c2).accuracy
        res[name] = {"real": round(a_real, 3), "recon": round(a_rec, 3), "s": round(time.time() - t0, 1)}
        print(name, res[name], flush=True)
    out["recon_clf"] = res
    
