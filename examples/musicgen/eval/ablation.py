"""The ablation: the seven variants of the student, each generated from and measured the same way.

Variants: ``teacher``, ``student_base`` (pretrained), ``student_ce`` (the cross-entropy control),
``student_kd`` (StageMixedKL), ``student_base_paper_plan`` (quantization only),
``student_kd_paper_plan`` (TinyMusician: KD + the paper's precision plan) and
``student_kd_kdq_plan`` (KD + kdq's plan at no more bytes). A planned variant is ``apply_plan`` on a
fresh copy, so its bytes are real storage.

For each variant, on the same prompts (every test caption) with the same seeds:

- bytes; teacher-forced held-out NLL and KL to the teacher on the test codes (``eval.heldout``);
- for each embedder (model-free ``mel-chroma`` and its pitch part ``chroma``, the codec's latents,
  the ``clap-mini`` proxy...): FAD and KAD against the test clips, each with a bootstrap interval
  over clips;
- CLAP score (the proxy's mean text-audio cosine), key accuracy (``eval.music``: the key estimated
  from the clip's chroma against the key its caption names; ceiling: the real test clips' own
  accuracy, chance 1/24), instrument accuracy (``eval.instrument``: a classifier trained on the
  train split's real clips and their codec reconstructions; ceilings: its accuracy on the real test
  clips and on their reconstructions, which is what a generator can reach; chance 1/12), and the
  clips' dynamics (``eval.music.frame_std``; ceilings: the real test clips' and their
  reconstructions'), each with an interval.

Then every comparison of the ablation note (``COMPARISONS``: teacher against student_base, KD
against CE, kdq's plan against the paper's, each plan against its fp32 model) as a paired bootstrap
interval of the difference (``kdq.metrics.paired_bootstrap``): the same prompts resampled for both
variants; "within noise" where the interval covers 0. ``headline`` compares TinyMusician's variant
with ``student_base`` as the paper does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VARIANT_NAMES = ("teacher", "student_base", "student_ce", "student_kd", "student_base_paper_plan",
                 "student_kd_paper_plan", "student_kd_kdq_plan")

#: (a, b, what the comparison asks) for the paired intervals and the note.
COMPARISONS = (
    ("teacher", "student_base", "the teacher knows more than the student it teaches"),
    ("student_kd", "student_ce", "distillation against fine-tuning on the data alone"),
    ("student_kd_kdq_plan", "student_kd_paper_plan", "kdq's plan against the paper's at no more bytes"),
    ("student_kd_paper_plan", "student_kd", "the paper's plan against fp32"),
    ("student_kd_kdq_plan", "student_kd", "kdq's plan against fp32"),
    ("student_base_paper_plan", "student_base", "quantization alone"),
)
#: metric -> True when lower is better.
LOWER_IS_BETTER = {"fad": True, "kad": True, "nll": True, "kl_teacher": True, "clap": False, "key_accuracy": False,
                   "instrument_accuracy": False}
#: metrics with no better direction, only a description of the difference ("more dynamic" when A - B > 0).
DESCRIBED = {"frame_std": "more dynamic"}
#: the headline FAD's embedder, in order of preference (a model-free or published embedder first).
FAD_ORDER = ("vggish", "mel-chroma", "clap", "encodec", "clap-mini-proxy")


def variant_specs(models: dict[str, str], plans: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """``{variant: (model folder or id, plan file or None)}`` from the stages' products."""
    specs: dict[str, tuple[str, str | None]] = {n: (models[n], None) for n in ("teacher", "student_base", "student_ce", "student_kd")}
    for name, base, plan in (("student_base_paper_plan", "student_base", "paper"),
                             ("student_kd_paper_plan", "student_kd", "paper"),
                             ("student_kd_kdq_plan", "student_kd", "kdq")):
        specs[name] = (models[base], plans[plan])
    return specs


def materialise(spec: tuple[str, str | None]):
    """The variant's model: loaded, and converted in place by its plan when it has one."""
    from kdq.quant import Plan, apply_plan
    from musicgen.models.musicgen import load_musicgen

    model = load_musicgen(spec[0])
    return apply_plan(model, Plan.load(spec[1])) if spec[1] else model


def _interval(est) -> list[float]:
    return [float(est.low), float(est.high)]


def _mean_interval(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """Percentile bootstrap interval of the mean of per-item values (NaN items left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    rng = np.random.default_rng(seed)
    reps = [v[rng.integers(0, len(v), len(v))].mean() for _ in range(n_boot)]
    return [float(q) for q in np.percentile(reps, [2.5, 97.5])]


class Judges:
    """Everything a variant's clips are measured with, prepared once: embedders with their reference
    units, the key estimator and the instrument classifier, and the real test clips' own scores
    (the ceilings)."""

    def __init__(self, embedders: list, reference: list[np.ndarray], captions: list[str], sample_rate: int,
                 instrument, *, n_boot: int, seed: int):
        from musicgen.eval.instrument import instrument_accuracy
        from musicgen.eval.music import frame_std, key_accuracy, key_from_caption

        self.embedders, self.sr, self.instrument, self.n_boot, self.seed = embedders, sample_rate, instrument, n_boot, seed
        self.reference = {e.key: e.units(reference, sample_rate) for e in embedders}
        self.ceilings: dict[str, Any] = {"reference_clips": len(reference),
                                         "frame_std": float(frame_std(reference, sample_rate).mean())}
        self.keys = any(key_from_caption(c) for c in captions)  # a user's captions may name no key
        if self.keys:
            real_key = key_accuracy(reference, captions, sample_rate)
            self.ceilings.update({"key_accuracy": real_key.accuracy, "key_accuracy_chance": real_key.chance})
        if instrument is not None:  # None: the captions name fewer than two instruments (instrument stage)
            real_inst = instrument_accuracy(reference, captions, sample_rate, classifier=instrument)
            self.ceilings.update({"instrument_accuracy": real_inst.accuracy, "instrument_accuracy_chance": real_inst.chance})

    def score(self, audio: list[np.ndarray], prompts: list[str]) -> tuple[dict, dict]:
        """(the row's figures, the per-item values the comparisons resample)."""
        from kdq.metrics import clap_scores, frechet_bootstrap, kad_bootstrap
        from musicgen.eval.instrument import instrument_accuracy
        from musicgen.eval.music import frame_std, key_accuracy

        row: dict[str, Any] = {}
        items: dict[str, Any] = {"units": {}}
        for e in self.embedders:
            units = e.units(audio, self.sr)
            items["units"][e.key] = units
            fad = frechet_bootstrap(units, self.reference[e.key], n_boot=self.n_boot, seed=self.seed)
            kad = kad_bootstrap(units, self.reference[e.key], n_boot=self.n_boot, seed=self.seed)
            row.update({f"fad_{e.key}": fad.value, f"fad_{e.key}_ci": _interval(fad),
                        f"kad_{e.key}": kad.value, f"kad_{e.key}_ci": _interval(kad)})
            if e.has_text:
                cos = clap_scores(e.embed_text(prompts), e.embed(audio, self.sr))
                items[f"clap_{e.key}"] = cos
                row[f"clap_score_{e.key}"] = float(cos.mean())
                row[f"clap_score_{e.key}_ci"] = _mean_interval(cos, self.n_boot, self.seed)
        items["frame_std"] = frame_std(audio, self.sr)
        row.update({"frame_std": float(items["frame_std"].mean()),
                    "frame_std_ci": _mean_interval(items["frame_std"], self.n_boot, self.seed)})
        if self.keys:
            key = key_accuracy(audio, prompts, self.sr)
            items["key_accuracy"] = np.array(key.per_item)
            row.update({"key_accuracy": key.accuracy,
                        "key_accuracy_ci": _mean_interval(items["key_accuracy"], self.n_boot, self.seed)})
        if self.instrument is not None:
            inst = instrument_accuracy(audio, prompts, self.sr, classifier=self.instrument)
            items["instrument_accuracy"] = np.array(inst.per_item)
            row.update({"instrument_accuracy": inst.accuracy,
                        "instrument_accuracy_ci": _mean_interval(items["instrument_accuracy"], self.n_boot, self.seed)})
        fad_keys = [f"fad_{k}" for k in FAD_ORDER if f"fad_{k}" in row]
        clap_keys = [k for k in ("clap_score_clap", "clap_score_clap-mini-proxy") if k in row]
        row["fad"] = row[fad_keys[0]] if fad_keys else None
        row["fad_embedder"] = fad_keys[0].removeprefix("fad_") if fad_keys else None
        row["clap"] = row[clap_keys[0]] if clap_keys else None
        row["clap_embedder"] = clap_keys[0].removeprefix("clap_score_") if clap_keys else None
        return row, items

    def compare(self, a: dict, b: dict) -> dict[str, dict]:
        """Paired intervals of ``metric(A) - metric(B)`` for every metric both item sets carry."""
        from kdq.metrics import frechet_distance, paired_bootstrap, paired_kad_bootstrap

        kw = {"n_boot": self.n_boot, "seed": self.seed}
        out = {}
        for key, ref in self.reference.items():
            out[f"fad_{key}"] = paired_bootstrap(frechet_distance, a["units"][key], b["units"][key], ref, **kw).to_dict()
            out[f"kad_{key}"] = paired_kad_bootstrap(a["units"][key], b["units"][key], ref, **kw).to_dict()

        def mean(x, _):
            return float(np.nanmean(x))

        for name in [k for k in a if k != "units"]:
            va, vb = np.asarray(a[name], dtype=np.float64), np.asarray(b[name], dtype=np.float64)
            keep = np.isfinite(va) & np.isfinite(vb)
            out[name] = paired_bootstrap(mean, va[keep], vb[keep], **kw).to_dict()
        return out


def retention(base: dict, row: dict) -> dict:
    """CLAP and FAD retention of ``row`` against ``base`` with the embedders the row's headline uses."""
    from kdq.metrics import retention_table

    def scores(r: dict) -> dict:
        return {k: v for k, v in r.items() if isinstance(v, (int, float)) and k.startswith(("fad_", "clap_score_"))}

    table = retention_table(scores(base), scores(row))
    out = {}
    if row.get("clap_embedder"):
        out["clap"] = table.get(f"retention_clap_score_{row['clap_embedder']}")
    if row.get("fad_embedder"):
        out["fad"] = table.get(f"retention_fad_{row['fad_embedder']}")
    return out


def headline(results: dict) -> dict:
    """TinyMusician's variant against ``student_base`` in fp32, as the paper reports it."""
    v, b = results["student_kd_paper_plan"], results["student_base"]
    ret = retention(b, v)
    parts = [x for x in (ret.get("clap"), ret.get("fad")) if isinstance(x, (int, float))]
    return {"variant": "student_kd_paper_plan", "baseline": "student_base", "fad": v.get("fad"), "clap": v.get("clap"),
            "size_reduction": 1 - v["bytes"] / b["bytes"], "retention": float(np.mean(parts)) if parts else None,
            "retention_parts": ret, "embedder": f"FAD: {v.get('fad_embedder')}, CLAP: {v.get('clap_embedder')}",
            "retention_definition": "retention = mean of CLAP retention (kdq CLAP / base CLAP) and FAD retention "
                                    "(base FAD / kdq FAD), against student_base in fp32 (docs/metrics.md)"}


def evaluate_variants(specs: dict, *, prompts: list[str], judges: Judges, test_tokens: str, cfg: Any, folder: Path,
                      root: Path, seed: int, progress: bool = True) -> dict:
    """Every variant's row and the paired comparisons (see the module docstring); samples in
    ``folder/samples/<variant>/``, their paths in the rows relative to ``root`` (the run's folder)."""
    from tqdm.auto import tqdm

    from kdq.quant import model_bytes
    from musicgen.data.tokens import TokenDataset
    from musicgen.eval.generate import generate, save_clips
    from musicgen.eval.heldout import heldout
    from musicgen.models.musicgen import load_musicgen, load_tokenizer

    test = TokenDataset.load(test_tokens)
    teacher = load_musicgen(specs["teacher"][0])
    tok = load_tokenizer(specs["teacher"][0])
    sr = teacher.config.audio_encoder.sampling_rate
    results: dict[str, dict] = {}
    items: dict[str, dict] = {}
    for name in tqdm(VARIANT_NAMES, desc="evaluate", disable=not progress):
        model = materialise(specs[name])
        row: dict[str, Any] = {"bytes": int(model_bytes(model))}
        figures = heldout(model, tok, test, teacher=None if name == "teacher" else teacher)
        row.update({k: figures[k] for k in ("nll", "nll_cb0", "kl_teacher")})
        audio = generate(model, tok, prompts, seconds=cfg.seconds, seed=seed, guidance_scale=cfg.guidance_scale,
                         top_k=cfg.top_k, batch=cfg.batch, progress=progress, desc=name)
        row["samples"] = [str(p.relative_to(root)) for p in save_clips(folder / "samples" / name, audio, sr)]
        scores, items[name] = judges.score(audio, prompts)
        items[name].update({"nll": np.array(figures["nll_items"]), "kl_teacher": np.array(figures["kl_items"])})
        row.update(scores)
        results[name] = row
        del model
    for name, row in results.items():
        if name != "student_base":
            row["retention"] = retention(results["student_base"], row)
    comparisons = {f"{a} - {b}": {"a": a, "b": b, "question": q, **judges.compare(items[a], items[b])}
                   for a, b, q in tqdm(COMPARISONS, desc="compare", disable=not progress)}
    return {"variants": results, "comparisons": comparisons, "ceilings": judges.ceilings, "prompts": prompts,
            "headline": headline(results), "sample_rate": sr}


def _kind(metric: str) -> str:
    """``fad_mel-chroma`` -> ``fad``; ``clap_clap-mini-proxy`` -> ``clap``; others as they are."""
    head = metric.split("_", 1)[0]
    return head if head in ("fad", "kad", "clap") else metric


def ablation_note(variants: dict, comparisons: dict | None = None) -> str:
    """Which of the expected orderings held in this run, stated from the numbers and their intervals."""
    notes = []
    for key, c in (comparisons or {}).items():
        a, b = c["a"], c["b"]
        parts = []
        for metric in ("fad_mel-chroma", "kad_mel-chroma", "fad_chroma", "kad_chroma", "nll", "kl_teacher", "key_accuracy", "instrument_accuracy",
                       "clap_clap-mini-proxy", "frame_std"):
            est = c.get(metric)
            if not est or (metric == "kl_teacher" and "teacher" in (a, b)):
                continue
            if est["within_noise"]:
                verdict = "within noise"
            elif metric in DESCRIBED:
                verdict = f"{a if est['estimate'] > 0 else b} {DESCRIBED[metric]}"
            else:
                better = (est["estimate"] < 0) == LOWER_IS_BETTER[_kind(metric)]
                verdict = f"{a} better" if better else f"{b} better"
            parts.append(f"{metric} {est['estimate']:+.3g} [{est['low']:.3g}, {est['high']:.3g}] ({verdict})")
        if parts:
            notes.append(f"{key} ({c['question']}): " + "; ".join(parts) + ".")
    a, b = variants["student_kd_kdq_plan"], variants["student_kd_paper_plan"]
    notes.append(f"Bytes: kdq plan {a['bytes']:,} B against paper plan {b['bytes']:,} B.")
    return " ".join(notes)
