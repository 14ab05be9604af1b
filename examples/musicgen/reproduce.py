"""TinyMusician end to end: a teacher distilled into a student, mixed precision, ONNX, evaluation, report.

::

    python examples/musicgen/reproduce.py [--preset smoke|mini|paper] [--out DIR] [--from-scratch]
        [--force STAGE ...] [--set PATH=VALUE ...] [--dataset DIR --teacher ID --student ID] [--nproc N]

The pipeline, read top to bottom (``run``). Every stage goes through ``musicgen.pipeline``: cached
under a key made of its settings (``musicgen.config``) and its inputs, resumable when interrupted,
redone with what depends on it by ``--force STAGE``. A failing stage stops the run.

1. **Models and data.** ``mini``: the shipped world (``hub``: codec, text encoder, teacher,
   ``student_base``, checksums verified) and the rendered music (``render``), or with
   ``--from-scratch`` the whole world rebuilt (``world.py``: render, codec, text, tokens, teacher,
   student_base); ``smoke``: always its toy world; ``paper``: two checkpoints and the user's
   audiofolder dataset (``data``). Then ``tokens``: codec codes of every split.
2. **distill_ce, distill_kd** (``distill.py``): ``student_base`` fine-tuned for the same steps on
   the same data with cross-entropy (the control) and with ``StageMixedKL``.
3. **plan** (``plan.py``): sensitivity profile of ``student_kd`` on valid clips, the paper's plan
   and kdq's plan at no more bytes, both measured.
4. **export** (``bundle/``): ONNX bundles of ``student_kd`` (fp32, paper plan, kdq plan), parity
   with PyTorch, and a device run of each.
5. **clap_mini** (the offline CLAP proxy, trained on the train split), then **evaluate**
   (``eval/ablation.py``): the seven variants generated from and measured the same way.
6. ``OUT/results.json`` and ``OUT/report.html``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from kdq.errors import KdqError
from musicgen import flush_denormals
from musicgen.config import DatasetConfig, Preset, override, preset
from musicgen.files import sha256, write_json
from musicgen.pipeline import Context, Pipeline


# ---------------------------------------------------------------------------------- models and data


def dataset_stage(cfg: DatasetConfig, ctx: Context) -> dict:
    """The user's audiofolder dataset (paper preset): its splits, counted."""
    from musicgen.data.audiofolder import Skipped, read_split

    counts, skipped = {}, {}
    for split in ("train", "valid", "test"):
        bad = Skipped()
        counts[split] = len(read_split(cfg.root, split, text_column=cfg.text_column, skipped=bad))
        skipped[split] = bad.summary()
    return {"root": str(Path(cfg.root).resolve()), "counts": counts, "skipped_metadata": skipped, "source": "user dataset"}


def models_and_data(p: Preset, pipe: Pipeline, *, from_scratch: bool) -> dict:
    """Run the first stages; return the teacher, ``student_base`` and their origin, the data and the tokens."""
    from musicgen.world import build_world, hub_folder, render_stage, tokens_stage, verify_hub

    if p.world is not None and (from_scratch or p.hub is None):
        built = build_world(p, pipe)
        return {"teacher": built["teacher"]["model"], "student_base": built["student_base"]["model"], "source": "built",
                "figures": {n: built[n].get("held_out") for n in ("codec", "teacher", "student_base")},
                "curves": {f"{n} (CE pretraining)": built[n]["curve"] for n in ("teacher", "student_base")},
                "data": built["render"], "tokens": built["tokens"], "stages": ("render", "teacher", "student_base")}
    if p.world is not None:
        card = hub_folder(p) / "card.json"
        hub = pipe.run("hub", {"card": sha256(card) if card.is_file() else None}, lambda c: verify_hub(p))
        data = pipe.run("render", {"data": p.data, "seed": p.seed}, lambda c: render_stage(p, c))
        tokens = pipe.run("tokens", {"clip_seconds": p.data.clip_seconds},
                          lambda c: tokens_stage(hub["folders"]["codec"], data, c, clip_seconds=p.data.clip_seconds),
                          inputs=("render", "hub"))
        return {"teacher": hub["folders"]["teacher"], "student_base": hub["folders"]["student_base"], "source": "hub",
                "figures": hub["card"]["figures"], "curves": {}, "data": data, "tokens": tokens, "stages": ("render", "hub")}
    data = pipe.run("data", p.data, lambda c: dataset_stage(p.data, c))
    tokens = pipe.run("tokens", {"clip_seconds": p.data.clip_seconds, "max": p.eval.max_eval_clips, "codec": p.student_id},
                      lambda c: tokens_stage(p.student_id, data, c, clip_seconds=p.data.clip_seconds,
                                             max_clips=p.eval.max_eval_clips, text_column=p.data.text_column,
                                             max_bad_fraction=p.data.max_bad_fraction), inputs=("data",))
    return {"teacher": p.teacher_id, "student_base": p.student_id, "source": "checkpoints", "figures": {}, "curves": {},
            "data": data, "tokens": tokens, "stages": ("data",)}


# -------------------------------------------------------------------------------------- evaluation


def clap_mini_stage(p: Preset, data: dict, ctx: Context) -> dict:
    """The offline CLAP proxy, trained on the train split (nothing when the preset asks for none)."""
    from musicgen.eval.embedders import train_clap_mini

    if not p.eval.clap_mini_steps:
        return {"folder": None}
    emb = train_clap_mini(data["root"], out_dir=ctx.folder / "model", steps=p.eval.clap_mini_steps, batch_size=16,
                          progress=ctx.progress, seed=p.seed)
    return {"folder": str(ctx.folder / "model"), "retrieval": emb.info.get("retrieval")}


def evaluate_stage(p: Preset, specs: dict, data: dict, tokens: dict, ctx: Context) -> dict:
    """Prompts, reference clips and embedders for ``eval.ablation.evaluate_variants``."""
    from musicgen.data.audiofolder import load_audio, read_split
    from musicgen.eval.ablation import evaluate_variants
    from musicgen.eval.metrics import label, offline_embedders

    cfg = p.eval
    clips = read_split(data["root"], "test", text_column=getattr(p.data, "text_column", "text"))[: cfg.max_eval_clips]
    prompts = [c.text for c in clips] if not cfg.prompts else (list(dict.fromkeys(c.text for c in clips)) * cfg.prompts)[: cfg.prompts]
    sr = tokens["sample_rate"]
    embedders, missing = offline_embedders(codec=specs["teacher"][0], clap_mini=ctx.inputs["clap_mini"]["folder"], clap=cfg.clap)
    result = evaluate_variants(specs, prompts=prompts, reference=[load_audio(c.path, sr) for c in clips],
                               test_tokens=tokens["paths"]["test"], embedders=embedders, cfg=cfg,
                               folder=ctx.folder, root=ctx.folder.parent, seed=p.seed, progress=ctx.progress)
    return {**result, "embedders": {e.key: label(e) for e in embedders},
            "embedders_missing": {k: v for k, v in missing.items() if v != "not requested"}}


# ------------------------------------------------------------------------------------------ the run


def run(p: Preset, out: str | Path, *, from_scratch: bool = False, force: set[str] | None = None,
        progress: bool = True, nproc: int = 1, command: str | None = None) -> dict:
    """Run the pipeline for preset ``p``; write ``OUT/results.json`` and ``OUT/report.html``; return the results."""
    from musicgen.bundle.build import export_stage
    from musicgen.distill import distill_stage
    from musicgen.eval.ablation import ablation_note, variant_specs
    from musicgen.plan import plan_stage
    from musicgen.report import write_report

    out = Path(out).resolve()
    pipe = Pipeline(out, force=set(force or ()), progress=progress)
    if p.threads:
        torch.set_num_threads(p.threads)
    t0 = time.perf_counter()

    md = models_and_data(p, pipe, from_scratch=from_scratch)
    made = md["stages"]  # the stages that made the models and the data
    models = {"teacher": md["teacher"], "student_base": md["student_base"]}
    for mode in ("ce", "kd"):
        d = pipe.run(f"distill_{mode}", {"distill": p.distill, "models": models},
                     lambda c, mode=mode: distill_stage(mode, p.distill, student=models["student_base"], teacher=models["teacher"],
                                                        data=md["tokens"]["paths"]["train"], out=c.folder, nproc=nproc,
                                                        progress=c.progress), inputs=("tokens", *made))
        models[f"student_{mode}"] = d["model"]
    plan = pipe.run("plan", p.plan, lambda c: plan_stage(p.plan, models["student_kd"], md["tokens"], c.folder,
                                                           progress=c.progress), inputs=("distill_kd", "tokens"))
    plans = {"paper": plan["paper_plan_file"], "kdq": plan["kdq_plan_file"]}
    export = pipe.run("export", p.export, lambda c: export_stage(p.export, models["student_kd"], plans, c.folder,
                                                                 progress=c.progress),
                      inputs=("distill_kd", "plan")) if p.export.enabled else None
    pipe.run("clap_mini", {"steps": p.eval.clap_mini_steps, "seed": p.seed},
             lambda c: clap_mini_stage(p, md["data"], c), inputs=("tokens",))
    specs = variant_specs(models, plans)
    evaluation = pipe.run("evaluate", p.eval, lambda c: evaluate_stage(p, specs, md["data"], md["tokens"], c),
                          inputs=("tokens", *made, "clap_mini", "distill_ce", "distill_kd", "plan"))

    results = {
        "preset": p.name,
        "command": command or f"python examples/musicgen/reproduce.py --preset {p.name} --out {out}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "out": str(out),
        "world": {k: md[k] for k in ("teacher", "student_base", "source", "figures")},
        "data": {k: v for k, v in md["data"].items() if k != "stats"},
        "variants": evaluation["variants"],
        "prompts": evaluation["prompts"],
        "embedders": evaluation["embedders"],
        "embedders_missing": evaluation["embedders_missing"],
        "headline": evaluation["headline"],
        "ort": _ort_summary(export),
        "planner": {k: v for k, v in plan.items() if k not in ("paper_plan_file", "kdq_plan_file")},
        "training": {"student_ce": str(Path(pipe.results["distill_ce"]["curve"]).relative_to(out)),
                     "student_kd": str(Path(pipe.results["distill_kd"]["curve"]).relative_to(out)),
                     **{n: str(Path(c).relative_to(out)) for n, c in md["curves"].items()}},
        "distill": {f"student_{m}": pipe.results[f"distill_{m}"]["summary"] for m in ("ce", "kd")},
        "stages": pipe.stages,
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "versions": versions(),
        "config": p.to_dict(),
    }
    results["ablation_note"] = ablation_note(results["variants"])
    write_json(out / "results.json", results)
    write_report(out / "results.json")
    return results


def _ort_summary(export: dict | None) -> dict:
    if export is None:
        return {"skipped": "export disabled in this preset"}
    return {**{k: v for k, v in export.items() if k != "bundles"},
            "bundle_bytes": {k: b["bytes"] for k, b in export["bundles"].items()}}


def versions() -> dict:
    """Python, machine and package versions of this run."""
    import importlib.metadata as md
    import os

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "cuda": torch.cuda.is_available()}
    for pkg in ("kdq", "torch", "transformers", "onnx", "onnxruntime", "numpy", "scipy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# -------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Preset]:
    """The arguments and the preset they describe; every argument error exits with status 2 before any work."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini", choices=["smoke", "mini", "paper"])
    ap.add_argument("--out", help="output folder (default runs/<preset>)")
    ap.add_argument("--from-scratch", action="store_true", help="rebuild the world instead of starting from the shipped one")
    ap.add_argument("--force", nargs="*", default=[], help="stages to redo (and everything downstream of them)")
    ap.add_argument("--set", nargs="*", default=[], metavar="PATH=VALUE", help="change settings, e.g. distill.train.steps=50")
    ap.add_argument("--dataset", help="paper preset: audiofolder dataset root (splits train/valid/test)")
    ap.add_argument("--teacher", help="paper preset: teacher hub id or folder (default facebook/musicgen-large)")
    ap.add_argument("--student", help="paper preset: student hub id or folder (default facebook/musicgen-small)")
    ap.add_argument("--steps", type=int, help="distillation steps (same as --set distill.train.steps=N)")
    ap.add_argument("--clap", help="a CLAP checkpoint (hub id or folder) for FAD/CLAP with the real embedder")
    ap.add_argument("--nproc", type=int, default=1, help="processes for distillation (torchrun DDP; one per GPU)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    changes = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set takes PATH=VALUE items, got {item!r}")
        path, value = item.split("=", 1)
        changes[path] = value
    for flag, path in (("dataset", "data.root"), ("teacher", "teacher_id"), ("student", "student_id"),
                       ("steps", "distill.train.steps"), ("clap", "eval.clap")):
        if getattr(args, flag) is not None:
            changes[path] = getattr(args, flag)
    try:
        p = override(preset(args.preset), changes)
    except KdqError as e:
        ap.error(str(e))
    if p.name == "paper":
        root = getattr(p.data, "root", None)
        if not root:
            ap.error("the paper preset needs --dataset DIR (audiofolder: <split>/metadata.jsonl with a text column)")
        if not Path(root).is_dir():
            ap.error(f"--dataset {root!r} is not a folder")
    if args.nproc < 1:
        ap.error(f"--nproc {args.nproc}: must be >= 1")
    return args, p


@flush_denormals
def main(argv: list[str] | None = None) -> dict:
    args, p = parse(argv)
    command = "python examples/musicgen/reproduce.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = run(p, args.out or f"runs/{p.name}", from_scratch=args.from_scratch, force=set(args.force),
                  progress=not args.no_progress, nproc=args.nproc, command=command.strip())
    out = Path(results["out"])
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'}")
    return results


if __name__ == "__main__":
    main()
