"""Valid split only: does the shipped world follow its captions? (issue 21; chooses nothing on test)

Runs the main job's first stages in ``OUT`` (hub check, render, tokens, the instrument judge: the
same code and keys as ``reproduce.py``, so the main job reuses them), then on the valid split:

- ``ceiling``: the judge on real clips and on their codec reconstructions (instrument, key, frame std);
- ``gain``: caption gain per attribute (``musicgen.eval.alignment``) for the teacher and ``student_base``;
- ``gen``: clips generated from every valid caption (4 s, top-k 250, seed 0) by the teacher at
  several guidance scales and by ``student_base`` at the main job's: instrument and key accuracy
  and frame std, each with a bootstrap interval, and the paired teacher - student_base differences.

    flock /tmp/kdq-heavy.lock .venv/bin/python benchmarks/world_alignment_valid.py runs/mini [1.5,3,5]

Result: ``benchmarks/results/world_alignment_valid.json`` (with the hub's recipe digest).
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples")]


def main() -> None:
    import numpy as np
    import torch

    from kdq.metrics import paired_bootstrap
    from musicgen.config import preset
    from musicgen.data.audiofolder import load_audio, read_split
    from musicgen.data.render import INSTRUMENTS
    from musicgen.data.tokens import TokenDataset
    from musicgen.eval.alignment import ATTRIBUTES, attribute_values, caption_gain, swap_attribute
    from musicgen.eval.generate import generate
    from musicgen.eval.instrument import InstrumentClassifier, instrument_accuracy
    from musicgen.eval.music import frame_std, key_accuracy
    from musicgen.models.musicgen import load_musicgen, load_tokenizer
    from musicgen.pipeline import Pipeline
    from musicgen.reproduce import instrument_stage, models_and_data, reconstructions
    from musicgen.world import recipe_digest

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mini")
    scales = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [1.5, 3.0, 5.0]
    p = preset("mini")
    pipe = Pipeline(out_dir, progress=False)
    md = models_and_data(p, pipe, from_scratch=False)
    judge = pipe.run("instrument", {"seed": p.seed, "trained_on": "real+codec"},
                     lambda c: instrument_stage(p, md["data"], md["tokens"], md["teacher"], c),
                     inputs=("tokens", *md["stages"]))
    clf = InstrumentClassifier.load(judge["folder"])
    sr = md["tokens"]["sample_rate"]
    valid = read_split(md["data"]["root"], "valid")
    ds = TokenDataset.load(md["tokens"]["paths"]["valid"])
    caps = ds.captions
    assert [c.text for c in valid] == caps
    rng_seed = p.seed
    res: dict = {"recipe_digest": recipe_digest(p), "clips": len(caps), "judge_valid": judge.get("valid")}

    def interval(x):
        x = np.asarray(x, dtype=float)
        boot = np.random.default_rng(rng_seed).integers(len(x), size=(1000, len(x)))
        m = np.nanmean(x[boot], axis=1)
        return [round(float(np.percentile(m, 2.5)), 3), round(float(np.percentile(m, 97.5)), 3)]

    def score(audio):
        ia = instrument_accuracy(audio, caps, sr, classifier=clf)
        ka = key_accuracy(audio, caps, sr)
        fs = frame_std(audio, sr)
        items = {"instrument": np.array(ia.per_item), "key": np.array(ka.per_item), "frame_std": fs}
        row = {k: round(float(np.nanmean(v)), 3) for k, v in items.items()}
        row.update({f"{k}_ci": interval(v) for k, v in items.items()})
        return row, items

    t0 = time.time()
    real = [load_audio(c.path, sr) for c in valid]
    recon, _ = reconstructions(load_musicgen(md["teacher"]).audio_encoder, md["tokens"]["paths"]["valid"],
                               [n for _, n in INSTRUMENTS])
    res["ceiling"] = {"real": score(real)[0], "reconstruction": score(recon)[0]}
    print("ceiling", json.dumps(res["ceiling"]), round(time.time() - t0), "s", flush=True)

    values = attribute_values([c.meta for c in valid], caps)
    alts = {a: [swap_attribute(c, values[a][0][i], values[a][1][i], np.random.default_rng(i)) for i, c in enumerate(caps)]
            for a in ATTRIBUTES}
    alts["all"] = [caps[(i + len(caps) // 2) % len(caps)] for i in range(len(caps))]
    alts["empty"] = [""] * len(caps)
    res["gain"] = {}
    models = {"teacher": md["teacher"], "student_base": md["student_base"]}
    for name, path in models.items():
        t0 = time.time()
        g = caption_gain(load_musicgen(path), load_tokenizer(path), ds, alts, batch=25)
        res["gain"][name] = {a: {"gain": round(v["gain"], 4), "gain_ci": [round(x, 4) for x in v["gain_ci"]],
                                 "gain_cb0": round(v["gain_cb0"], 4)} for a, v in g.items()}
        res["gain"][name]["own_nll"] = round(g["empty"]["own_nll"], 4)
        print("gain", name, json.dumps(res["gain"][name]), round(time.time() - t0), "s", flush=True)

    res["gen"], items = {}, {}
    runs = [("teacher", s) for s in scales] + [("student_base", p.eval.guidance_scale)]
    for name, scale in runs:
        t0 = time.time()
        model, tok = load_musicgen(models[name]), load_tokenizer(models[name])
        audio = generate(model, tok, caps, seconds=p.eval.seconds, seed=p.seed, guidance_scale=scale,
                         top_k=p.eval.top_k, batch=p.eval.batch)
        key = f"{name} g{scale}"
        res["gen"][key], items[key] = score(audio)
        res["gen"][key]["seconds"] = round(time.time() - t0, 1)
        print("gen", key, json.dumps(res["gen"][key]), flush=True)
    base = f"student_base g{p.eval.guidance_scale}"
    res["teacher_minus_student_base"] = {}
    for name, scale in runs[:-1]:
        key = f"{name} g{scale}"
        res["teacher_minus_student_base"][key] = {}
        for m in ("instrument", "key", "frame_std"):
            a, b = items[key][m], items[base][m]
            keep = np.isfinite(a) & np.isfinite(b)
            est = paired_bootstrap(lambda x, _: float(np.mean(x)), a[keep], b[keep], n_boot=1000, seed=p.seed)
            res["teacher_minus_student_base"][key][m] = {"estimate": round(est.estimate, 3), "low": round(est.low, 3),
                                                         "high": round(est.high, 3), "within_noise": est.within_noise}
    print(json.dumps(res["teacher_minus_student_base"]), flush=True)
    dest = ROOT / "benchmarks/results/world_alignment_valid.json"
    dest.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", dest)


if __name__ == "__main__":
    main()
