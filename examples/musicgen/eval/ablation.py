"""The ablation: the seven variants of the student, each generated from and measured the same way.

Variants: ``teacher``, ``student_base`` (pretrained), ``student_ce`` (the cross-entropy control),
``student_kd`` (StageMixedKL), ``student_base_paper_plan`` (quantization only),
``student_kd_paper_plan`` (TinyMusician: KD + the paper's precision plan) and
``student_kd_kdq_plan`` (KD + kdq's plan at no more bytes). A planned variant is ``apply_plan`` on a
fresh copy, so its bytes are real storage.

For each: bytes; teacher-forced held-out NLL and KL to the teacher on the test codes
(``eval.heldout``); clips generated for the held-out prompts with the same seeds (``eval.generate``);
FAD against the test clips and CLAP score per embedder (``eval.metrics``); retention against
``student_base`` (docs/metrics.md). ``headline`` compares TinyMusician's variant with
``student_base`` as the paper does; ``ablation_note`` states which expected orderings held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VARIANT_NAMES = ("teacher", "student_base", "student_ce", "student_kd", "student_base_paper_plan",
                 "student_kd_paper_plan", "student_kd_kdq_plan")


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


def score_row(embedders, audio: list[np.ndarray], prompts: list[str], reference: list[np.ndarray], sr: int,
              ref_cache: dict) -> dict:
    """FAD (against the test clips) and CLAP score per embedder; reference embeddings computed once."""
    from kdq.metrics import frechet_distance
    from musicgen.eval.metrics import clap_score_with

    row: dict[str, Any] = {}
    for e in embedders:
        key = f"fad_{e.key}"
        if e.key not in ref_cache:
            ref_cache[e.key] = e.fad_embeddings(reference, sr)
        gen = e.fad_embeddings(audio, sr)
        row[key] = frechet_distance(gen, ref_cache[e.key])
        row[f"rows_{key}"] = [len(gen), len(ref_cache[e.key])]
        if e.has_text:
            row.update(clap_score_with(e, prompts, audio, sample_rate=sr))
    # frame-level embedders first: a few dozen clips give thousands of frames, a clip-level FAD on so few
    # rows is mostly estimator bias
    fad_keys = [k for k in ("fad_vggish", "fad_encodec", "fad_clap", "fad_clap-mini-proxy") if row.get(k) is not None]
    clap_keys = [k for k in ("clap_score_clap", "clap_score_clap-mini-proxy") if row.get(k) is not None]
    row["fad"] = row[fad_keys[0]] if fad_keys else None
    row["fad_embedder"] = fad_keys[0].removeprefix("fad_") if fad_keys else None
    row["clap"] = row[clap_keys[0]] if clap_keys else None
    row["clap_embedder"] = clap_keys[0].removeprefix("clap_score_") if clap_keys else None
    return row


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


def evaluate_variants(specs: dict, *, prompts: list[str], reference: list[np.ndarray], test_tokens: str,
                      embedders: list, cfg: Any, folder: Path, root: Path, seed: int, progress: bool = True) -> dict:
    """Every variant's row (see the module docstring); samples in ``folder/samples/<variant>/``, their
    paths in the rows relative to ``root`` (the run's folder)."""
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
    ref_cache: dict[str, np.ndarray] = {}
    for name in tqdm(VARIANT_NAMES, desc="evaluate", disable=not progress):
        model = materialise(specs[name])
        row: dict[str, Any] = {"bytes": int(model_bytes(model))}
        figures = heldout(model, tok, test, teacher=None if name == "teacher" else teacher)
        row.update({k: figures[k] for k in ("nll", "nll_cb0", "kl_teacher")})
        audio = generate(model, tok, prompts, seconds=cfg.seconds, seed=seed, guidance_scale=cfg.guidance_scale,
                         top_k=cfg.top_k, batch=cfg.batch, desc=name)
        row["samples"] = [str(p.relative_to(root)) for p in save_clips(folder / "samples" / name, audio, sr)]
        row.update(score_row(embedders, audio, prompts, reference, sr, ref_cache))
        results[name] = row
    for name, row in results.items():
        if name != "student_base":
            row["retention"] = retention(results["student_base"], row)
    return {"variants": results, "prompts": prompts, "headline": headline(results), "sample_rate": sr}


def ablation_note(variants: dict) -> str:
    """Which of the expected orderings held in this run, stated from the numbers."""
    notes = []

    def cmp(a: str, b: str, key: str, what: str) -> None:
        x, y = variants[a].get(key), variants[b].get(key)
        if x is not None and y is not None:
            notes.append(f"{a} {'beats' if x < y else 'does NOT beat'} {b} on {what} ({x:.4g} vs {y:.4g}).")

    cmp("teacher", "student_base", "fad", "FAD")
    cmp("teacher", "student_base", "nll", "held-out NLL")
    cmp("student_kd", "student_ce", "kl_teacher", "KL to the teacher")
    cmp("student_kd", "student_ce", "nll", "held-out NLL")
    a, b = variants["student_kd_kdq_plan"], variants["student_kd_paper_plan"]
    notes.append(f"kdq plan {a['bytes']:,} B vs paper plan {b['bytes']:,} B; KL to teacher "
                 f"{a['kl_teacher']:.4g} vs {b['kl_teacher']:.4g}.")
    return " ".join(notes)
