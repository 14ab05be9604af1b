"""TinyMusician end to end: a teacher distilled into a student, mixed precision, ONNX, evaluation, report.

::

    python examples/musicgen/reproduce.py [--preset smoke|mini|paper] [--out DIR] [--from-scratch]
        [--force STAGE ...] [--set PATH=VALUE ...] [--dataset DIR --teacher ID --student ID] [--nproc N]
        [--steps N] [--clips N] [--clip-seconds S] [--micro-batch N] [--grad-accum N] [--warmup F]
        [--no-progress] [--debug]

Every argument is checked before any work (datasets, folders, checkpoints: hub ids only in the local
Hugging Face cache, never over the network); a bad one ends the command with one line and exit
status 2. An error raised during the run (a typed ``KdqError``) ends it with one line and exit
status 1 (``--debug``: the traceback); the next run resumes where it stopped. The run ends by
printing the ablation table, the headline (paper | kdq) and where results.json and report.html are.

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
5. **clap_mini** (the offline CLAP proxy) and **instrument** (the classifier of instrument accuracy),
   both trained on the train split, then **evaluate**
   (``eval/ablation.py``): the seven variants generated from and measured the same way.
6. ``OUT/results.json`` and ``OUT/report.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from kdq.errors import KdqError, bad_value, close_matches
from musicgen import flush_denormals
from musicgen.config import Config, DatasetConfig, Preset, override, preset
from musicgen.files import sha256, write_json
from musicgen.pipeline import Context, Pipeline

SPLITS = ("train", "valid", "test")
#: every stage name a run can have (``--force`` takes these)
STAGES = ("hub", "render", "codec", "text", "data", "tokens", "teacher", "student_base", "distill_ce", "distill_kd",
          "plan", "export", "clap_mini", "instrument", "evaluate")


class ArgumentError(KdqError):
    """A command-line argument that cannot work (a missing folder, a checkpoint not available offline)."""


# ---------------------------------------------------------------------------------- models and data


def dataset_stage(cfg: DatasetConfig, ctx: Context) -> dict:
    """The user's audiofolder dataset (paper preset): its splits, counted.

    With ``cfg.max_clips``, the first ``max_clips`` clips of each split (metadata order) are copied
    into ``ctx.folder/data`` in the same layout, and the rest of the run reads that copy.
    """
    from tqdm.auto import tqdm

    from musicgen.data.audiofolder import Skipped, read_split, write_metadata

    source = Path(cfg.root).resolve()
    root = source if cfg.max_clips is None else ctx.folder / "data"
    counts, skipped = {}, {}
    for split in SPLITS:
        bad = Skipped()
        clips = read_split(source, split, text_column=cfg.text_column, skipped=bad)
        if cfg.max_clips is not None:
            clips = clips[: cfg.max_clips]
            for clip in tqdm(clips, desc=f"copy {split}", disable=not ctx.progress, leave=False):
                target = root / split / clip.path.relative_to(source / split)
                target.parent.mkdir(parents=True, exist_ok=True)
                if clip.path.is_file():  # a missing file is kept in the metadata: the tokens stage counts it
                    shutil.copyfile(clip.path, target)
            write_metadata(root, split, [{**c.meta, "file_name": str(c.path.relative_to(source / split)),
                                          cfg.text_column: c.text} for c in clips])
        counts[split] = len(clips)
        skipped[split] = bad.summary()
    return {"root": str(root), "source_root": str(source), "max_clips": cfg.max_clips, "counts": counts,
            "skipped_metadata": skipped, "source": "user dataset"}


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
        from musicgen.data.render import RENDERER

        data = pipe.run("render", {"data": p.data, "seed": p.seed, "renderer": RENDERER}, lambda c: render_stage(p, c))
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


def instrument_stage(p: Preset, data: dict, tokens: dict, codec_dir: str, ctx: Context) -> dict:
    """The instrument classifier that instrument accuracy is measured with, trained on the train split's
    real clips *and their codec reconstructions* (the codec of the MusicGen in ``codec_dir``).

    Why both: every model speaks through the codec, and a classifier trained on real renders alone
    scored 0.953 on real valid clips but 0.207 on their reconstructions; on real plus reconstructions
    0.920 and 0.733 (docs/mini_world.md, issue 21). The stage reports the classifier on the valid
    split's real clips and reconstructions: the latter is the ceiling a generator can reach.
    """
    from musicgen.data.audiofolder import load_audio, read_split
    from musicgen.data.render import INSTRUMENTS
    from musicgen.eval.instrument import instrument_accuracy, instrument_from_caption, train_instrument_classifier
    from musicgen.models.musicgen import load_musicgen

    names = [n for _, n in INSTRUMENTS]
    clips = [(c, instrument_from_caption(c.text, names)) for c in read_split(data["root"], "train")]
    clips = [(c, n) for c, n in clips if n is not None]
    if len({n for _, n in clips}) < 2:
        return {"folder": None, "why": "the train captions name fewer than two instruments"}
    sr = tokens["sample_rate"]
    codec = load_musicgen(codec_dir).audio_encoder
    recon, recon_caps = reconstructions(codec, tokens["paths"]["train"], names)
    audio = [load_audio(c.path, sr) for c, _ in clips] + recon
    labels = [n for _, n in clips] + [instrument_from_caption(c, names) for c in recon_caps]
    clf = train_instrument_classifier(audio, labels, sr, classes=names)
    clf.save(ctx.folder / "model")
    out = {"folder": str(ctx.folder / "model"), "trained_on": "train split: real clips + codec reconstructions", **clf.info}
    if "valid" in tokens["paths"]:
        real = [(c, n) for c, n in ((c, instrument_from_caption(c.text, names)) for c in read_split(data["root"], "valid"))
                if n is not None]
        if real:
            v_audio, v_caps = reconstructions(codec, tokens["paths"]["valid"], names)
            out["valid"] = {"real": instrument_accuracy([load_audio(c.path, sr) for c, _ in real], [n for _, n in real], sr,
                                                        classifier=clf).accuracy,
                            "reconstruction": instrument_accuracy(v_audio, v_caps, sr, classifier=clf).accuracy}
    return out


def reconstructions(codec, tokens_path: str, names, batch: int = 25) -> tuple[list, list[str]]:
    """(audio, captions) of a token file's clips whose caption names one of ``names``, decoded by ``codec``."""
    from musicgen.data.tokens import TokenDataset
    from musicgen.eval.instrument import instrument_from_caption
    from musicgen.models.codec import decode

    ds = TokenDataset.load(tokens_path)
    keep = [i for i, c in enumerate(ds.captions) if instrument_from_caption(c, names) is not None]
    codes = ds.codes[keep]
    with torch.no_grad():
        audio = [a.numpy() for i in range(0, len(codes), batch) for a in decode(codec, codes[i : i + batch])]
    return audio, [ds.captions[i] for i in keep]


def evaluate_stage(p: Preset, specs: dict, data: dict, tokens: dict, ctx: Context) -> dict:
    """Prompts (every test caption unless the preset caps them), the real test clips and the judges
    for ``eval.ablation.evaluate_variants``."""
    from musicgen.data.audiofolder import load_audio, read_split
    from musicgen.eval.ablation import Judges, evaluate_variants
    from musicgen.eval.instrument import InstrumentClassifier
    from musicgen.eval.metrics import label, offline_embedders
    from musicgen.eval.music import ChromaEmbedder, MelChromaEmbedder

    cfg = p.eval
    clips = read_split(data["root"], "test", text_column=getattr(p.data, "text_column", "text"))[: cfg.max_eval_clips]
    prompts = [c.text for c in clips] if not cfg.prompts else (list(dict.fromkeys(c.text for c in clips)) * cfg.prompts)[: cfg.prompts]
    sr = tokens["sample_rate"]
    embedders, missing = offline_embedders(codec=specs["teacher"][0], clap_mini=ctx.inputs["clap_mini"]["folder"], clap=cfg.clap)
    embedders = [MelChromaEmbedder(), ChromaEmbedder(), *embedders]
    folder = ctx.inputs["instrument"]["folder"]
    judges = Judges(embedders, [load_audio(c.path, sr) for c in clips], [c.text for c in clips], sr,
                    InstrumentClassifier.load(folder) if folder else None, n_boot=cfg.bootstrap, seed=p.seed)
    if folder:  # the ceiling a generator can reach: the classifier on the codec's reconstructions of the test clips
        from musicgen.eval.instrument import instrument_accuracy
        from musicgen.models.musicgen import load_musicgen

        recon, caps = reconstructions(load_musicgen(specs["teacher"][0]).audio_encoder, tokens["paths"]["test"],
                                      judges.instrument.labels)
        if recon:
            from musicgen.eval.music import frame_std

            judges.ceilings["instrument_accuracy_reconstruction"] = instrument_accuracy(
                recon, caps, sr, classifier=judges.instrument).accuracy
            judges.ceilings["frame_std_reconstruction"] = float(frame_std(recon, sr).mean())
    result = evaluate_variants(specs, prompts=prompts, judges=judges, test_tokens=tokens["paths"]["test"], cfg=cfg,
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
    pipe.run("instrument", {"seed": p.seed, "trained_on": "real+codec"},
             lambda c: instrument_stage(p, md["data"], md["tokens"], models["teacher"], c), inputs=("tokens", *made))
    specs = variant_specs(models, plans)
    evaluation = pipe.run("evaluate", p.eval, lambda c: evaluate_stage(p, specs, md["data"], md["tokens"], c),
                          inputs=("tokens", *made, "clap_mini", "instrument", "distill_ce", "distill_kd", "plan"))

    results = {
        "preset": p.name,
        "command": command or command_for(p, out, from_scratch=from_scratch),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "out": str(out),
        "world": {k: md[k] for k in ("teacher", "student_base", "source", "figures")},
        "data": {k: v for k, v in md["data"].items() if k != "stats"},
        "variants": evaluation["variants"],
        "prompts": evaluation["prompts"],
        "embedders": evaluation["embedders"],
        "embedders_missing": evaluation["embedders_missing"],
        "headline": evaluation["headline"],
        "comparisons": evaluation["comparisons"],
        "ceilings": evaluation["ceilings"],
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
    results["ablation_note"] = ablation_note(results["variants"], results["comparisons"])
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


def _changed(base: Config, cfg: Config, prefix: str = "") -> dict:
    """``{dotted path: value}`` of every setting of ``cfg`` that differs from ``base``."""
    out = {}
    for f in dataclasses.fields(cfg):
        a, b = getattr(base, f.name), getattr(cfg, f.name)
        if isinstance(a, Config) and type(a) is type(b):
            out.update(_changed(a, b, f"{prefix}{f.name}."))
        elif a != b:
            out[prefix + f.name] = b.to_dict() if isinstance(b, Config) else b
    return out


def _set_item(path: str, value) -> str:
    """``PATH=VALUE`` for ``--set``: bare text where ``override`` reads it back as the same string, else JSON."""
    if isinstance(value, str):
        try:
            bare = json.loads(value) == value
        except json.JSONDecodeError:
            bare = True
        if bare:
            return f"{path}={value}"
    return f"{path}={json.dumps(value)}"


def command_for(p: Preset, out: str | Path, *, from_scratch: bool = False) -> str:
    """A command line that reproduces preset ``p``: its name and one ``--set`` per setting that differs."""
    args = ["--preset", p.name, "--out", str(out), *(["--from-scratch"] if from_scratch else [])]
    changes = _changed(preset(p.name), p)
    if "distill.train.steps" in changes:  # parse() would rescale the warm-up to the preset's share otherwise
        changes["distill.train.warmup_steps"] = p.distill.train.warmup_steps
    if changes:
        args += ["--set", *(_set_item(k, v) for k, v in changes.items())]
    return "python examples/musicgen/reproduce.py " + shlex.join(args)


def _read_config(folder: Path, flag: str, value: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError as e:
        raise bad_value(ArgumentError, flag, value, "a model folder with a readable config.json",
                        f"{folder / 'config.json'}: {e.strerror or e}") from None
    except ValueError:
        raise bad_value(ArgumentError, flag, value, "a model folder whose config.json is JSON",
                        f"{folder / 'config.json'} is not JSON") from None
    return config if isinstance(config, dict) else {}


def local_checkpoint(flag: str, value: str, *, model_type: str, tokenizer: bool = True) -> tuple[str, dict]:
    """The local folder of a checkpoint given as a folder or a hub id, and its config; no network.

    A hub id must already be in the local Hugging Face cache (``snapshot_download(local_files_only=True)``);
    its snapshot folder is returned, so the run loads it offline. The folder must hold a
    ``config.json`` of ``model_type``, safetensors weights and (``tokenizer``) tokenizer files.

    Raises:
        ArgumentError: naming ``flag``, the value, what is allowed and the fix.
    """
    folder = Path(value).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise bad_value(ArgumentError, flag, value, "a model folder or a hub id (it is a file)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(value, local_files_only=True))
        except (HFValidationError, LocalEntryNotFoundError):
            raise bad_value(ArgumentError, flag, value,
                            f"a model folder, or a hub id already in the local Hugging Face cache ({HF_HUB_CACHE}); "
                            "it is neither", f"download it first (hf download {value}) or pass its folder") from None
    config = _read_config(folder, flag, value)
    if config.get("model_type") != model_type:
        raise bad_value(ArgumentError, flag, value, f"a {model_type} checkpoint",
                        f"its config.json says model_type={config.get('model_type')!r}")
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise bad_value(ArgumentError, flag, value, "a folder with safetensors weights (model.safetensors)",
                        "kdq never loads pickled weights: convert them with save_pretrained(safe_serialization=True)")
    if tokenizer and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        raise bad_value(ArgumentError, flag, value, "a folder with the model's tokenizer files",
                        "save the tokenizer next to the model (tokenizer.save_pretrained(folder))")
    return str(folder), config


def check_dataset(root: str, text_column: str) -> None:
    """An audiofolder dataset with train, valid and test metadata and clips in train and test."""
    from musicgen.data.audiofolder import DatasetError, read_split

    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise bad_value(ArgumentError, "--dataset", root, "an existing folder (audiofolder: <split>/metadata.jsonl)",
                        "it is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise bad_value(ArgumentError, "--dataset", root, "a folder this user can read", "check its permissions")
    counts = {}
    for split in SPLITS:
        try:
            counts[split] = len(read_split(folder, split, text_column=text_column))
        except (DatasetError, OSError) as e:
            raise bad_value(ArgumentError, "--dataset", root, f"an audiofolder dataset with a readable {split} split",
                            str(e)) from None
    if not counts["train"] or not counts["test"]:
        raise bad_value(ArgumentError, "--dataset", root, "clips in the train and test splits", f"it has {counts}")


def check_out(out: str) -> None:
    """An output folder that exists, or can be made, and can be written."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise bad_value(ArgumentError, "--out", out, "a folder (it is a file)", "choose another --out")
    parent = next(q for q in (path, *path.parents) if q.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise bad_value(ArgumentError, "--out", out, "a folder this user can write", f"{parent} is not writable")


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _warmup_steps(base: Preset, changes: dict, fraction: float) -> int | None:
    """``fraction`` of the distillation steps the run will have (None when the steps value is invalid:
    ``override`` then names it)."""
    raw = changes.get("distill.train.steps", base.distill.train.steps)
    try:
        return round(fraction * int(json.loads(raw) if isinstance(raw, str) else raw))
    except (ValueError, TypeError):
        return None


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Preset]:
    """The arguments and the preset they describe; every argument error exits with status 2 and one
    line, before any work (``--debug``: with the traceback of a typed error)."""
    ap = _Parser(prog="reproduce.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini", choices=["smoke", "mini", "paper"])
    ap.add_argument("--out", metavar="DIR", help="output folder (default runs/<preset>)")
    ap.add_argument("--from-scratch", action="store_true", help="rebuild the world instead of starting from the shipped one")
    ap.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="stages to redo (and everything downstream of them)")
    ap.add_argument("--set", nargs="*", default=[], metavar="PATH=VALUE", help="change settings, e.g. distill.train.steps=50")
    ap.add_argument("--dataset", metavar="DIR", help="paper preset: audiofolder dataset root (splits train/valid/test)")
    ap.add_argument("--teacher", metavar="ID", help="paper preset: teacher folder, or hub id in the local cache (default facebook/musicgen-large)")
    ap.add_argument("--student", metavar="ID", help="paper preset: student folder, or hub id in the local cache (default facebook/musicgen-small)")
    ap.add_argument("--clap", metavar="ID", help="a CLAP checkpoint (folder, or hub id in the local cache) for FAD/CLAP with the real embedder")
    size = ap.add_argument_group("sizes (shortcuts for --set)")
    size.add_argument("--steps", type=int, metavar="N", help="distillation steps (distill.train.steps); warm-up keeps its share unless --warmup")
    size.add_argument("--clips", type=int, metavar="N", help="paper preset: at most N clips per split, the first of each (data.max_clips)")
    size.add_argument("--clip-seconds", type=float, metavar="S", help="seconds per training and reference clip (data.clip_seconds)")
    size.add_argument("--micro-batch", type=int, metavar="N", help="clips per forward pass (distill.train.micro_batch)")
    size.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (distill.train.grad_accum)")
    size.add_argument("--warmup", type=float, metavar="F",
                      help="learning-rate warm-up as a fraction of the distillation steps, in [0, 1)")
    ap.add_argument("--nproc", type=int, default=1, metavar="N", help="processes for distillation (torchrun DDP; one per GPU)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = ap.parse_args(argv)

    def fail(e: KdqError) -> None:
        if args.debug:
            raise e
        ap.error(" ".join(str(e).split()))

    changes = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set takes PATH=VALUE items, got {item!r}")
        path, value = item.split("=", 1)
        changes[path] = value
    paper = args.preset == "paper"
    for flag, path in (("dataset", "data.root"), ("teacher", "teacher_id"), ("student", "student_id"),
                       ("clips", "data.max_clips")):
        if getattr(args, flag) is not None and not paper:
            ap.error(f"--{flag} is for the paper preset (a user's dataset and checkpoints); "
                     f"--preset {args.preset} builds its own")
    for flag, path in (("dataset", "data.root"), ("teacher", "teacher_id"), ("student", "student_id"),
                       ("steps", "distill.train.steps"), ("clap", "eval.clap"), ("clips", "data.max_clips"),
                       ("clip_seconds", "data.clip_seconds"), ("micro_batch", "distill.train.micro_batch"),
                       ("grad_accum", "distill.train.grad_accum")):
        if getattr(args, flag) is not None:
            changes[path] = getattr(args, flag)
    try:
        base = preset(args.preset)
    except KdqError as e:
        fail(e)
    if args.warmup is not None:
        if "distill.train.warmup_steps" in changes:
            ap.error("give --warmup F or --set distill.train.warmup_steps=N, not both")
        if not 0 <= args.warmup < 1:
            ap.error(f"--warmup={args.warmup!r} is not allowed: a fraction of the steps in [0, 1), e.g. 0.05")
        fraction = args.warmup
    else:  # changed steps keep the preset's share of warm-up (the paper's 250 of 5,000 steps: 5%)
        fraction = base.distill.train.warmup_steps / base.distill.train.steps
    if "distill.train.warmup_steps" not in changes and (args.warmup is not None or "distill.train.steps" in changes):
        warmup = _warmup_steps(base, changes, fraction)
        if warmup is not None:
            changes["distill.train.warmup_steps"] = warmup
    try:
        p = override(base, changes)
    except KdqError as e:
        fail(e)
    if args.nproc < 1:
        ap.error(f"--nproc={args.nproc}: must be >= 1")
    unknown = [s for s in args.force if s not in STAGES]
    if unknown:
        ap.error(f"--force {unknown[0]!r}: not a stage{close_matches(unknown[0], STAGES)}; stages: {list(STAGES)}")
    try:
        check_out(args.out or f"runs/{p.name}")
        if p.name == "paper":
            if not p.data.root:
                raise ArgumentError("the paper preset needs --dataset DIR (audiofolder: <split>/metadata.jsonl "
                                    "with a text column)")
            check_dataset(p.data.root, p.data.text_column)
            teacher, t_cfg = local_checkpoint("--teacher", p.teacher_id, model_type="musicgen")
            student, s_cfg = local_checkpoint("--student", p.student_id, model_type="musicgen")
            shared = ("vocab_size", "num_codebooks")
            if [t_cfg.get("decoder", {}).get(k) for k in shared] != [s_cfg.get("decoder", {}).get(k) for k in shared]:
                raise ArgumentError(f"--teacher {p.teacher_id!r} and --student {p.student_id!r} must share the codec's "
                                    f"codes to be distilled: decoder {shared} differ; use a teacher and student of one family")
            changes.update({"teacher_id": teacher, "student_id": student})
        if p.eval.clap:
            changes["eval.clap"] = local_checkpoint("--clap", p.eval.clap, model_type="clap", tokenizer=False)[0]
        p = override(base, changes)
    except KdqError as e:
        fail(e)
    return args, p


class _LibraryBars:
    """transformers' own progress bars (loading and writing weights) off while a ``--no-progress`` run lasts."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        from transformers.utils import logging

        self.was = logging.is_progress_bar_enabled()
        if not self.enabled:
            logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.was:
            logging.enable_progress_bar()


@flush_denormals
def main(argv: list[str] | None = None) -> dict:
    """Run the command line; errors end it with one line (exit 2: arguments; 1: the run) unless ``--debug``."""
    from musicgen.report import terminal_summary

    argv = list(sys.argv[1:] if argv is None else argv)
    args, p = parse(argv)
    command = "python examples/musicgen/reproduce.py " + shlex.join(argv)
    try:
        with _LibraryBars(not args.no_progress):
            results = run(p, args.out or f"runs/{p.name}", from_scratch=args.from_scratch, force=set(args.force),
                          progress=not args.no_progress, nproc=args.nproc, command=command.strip())
    except KdqError as e:
        if args.debug:
            raise
        stage = getattr(e, "stage", None)
        print(f"reproduce.py: error{f' in stage {stage}' if stage else ''}: {' '.join(str(e).split())} "
              "(--debug shows the traceback; the next run resumes here)", file=sys.stderr)
        raise SystemExit(1) from None
    print(terminal_summary(results))
    return results


if __name__ == "__main__":
    main()
