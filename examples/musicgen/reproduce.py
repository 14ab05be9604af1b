"""TinyMusician end to end: data, teacher and student, distillation, planning, export, evaluation, report.

::

    python examples/musicgen/reproduce.py [--preset smoke|mini|paper] [--out DIR] [--force STAGE ...]

Every stage is cached in ``OUT/stages/<stage>.json`` under a key made of its settings and the keys of
the stages it reads, so a second run only redoes what changed (``--force`` redoes a stage and what
follows from it); distillation also resumes mid-run from its own checkpoints. A stage whose code is
not available (an optional piece of the project that is not installed or merged) is recorded as
``{"skipped": "<why>"}`` and never faked; what depends on it is skipped in turn, or runs on a stand-in
that the results name as such.

Stages: ``data`` (render music or read the user's audiofolder dataset) -> ``world`` (codec, text
encoder, teacher and ``student_base``) -> ``tokens`` (codec codes of every split) -> ``distill_ce``
and ``distill_kd`` (``distill.py``) -> ``plan`` (sensitivity profile of the distilled student with the
KL score, the paper plan and kdq's plan at no more bytes) -> ``variants`` (the seven models) ->
``export`` (ONNX bundles, parity, the device run) -> ``evaluate`` (samples for held-out prompts, FAD,
CLAP score, held-out NLL, KL to the teacher, retention) -> ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from kdq.errors import KdqError, bad_value, close_matches
from musicgen import flush_denormals

VARIANT_NAMES = ("teacher", "student_base", "student_ce", "student_kd", "student_base_paper_plan",
                 "student_kd_paper_plan", "student_kd_kdq_plan")


class ReproduceError(KdqError):
    """A bad preset, option or input folder."""


class Skip(Exception):
    """A stage cannot run here; the message says why (recorded as ``{"skipped": why}``)."""


# ------------------------------------------------------------------------------------------ presets


def _preset(name: str) -> dict:
    """Settings of each preset (plain data; every stage's cache key is built from its part)."""
    smoke = {
        "seed": 0,
        "data": {"pieces": {"bach": 3, "folk": 3}, "sample_rate": 8000, "clip_seconds": 2.0, "clips_per_render": 2,
                 "renders_per_piece": 1, "max_render_seconds": 8.0, "fractions": [0.3, 0.3], "workers": 1},
        "world": {"teacher": {"decoder_hidden": 64, "decoder_layers": 2}, "student": {"decoder_hidden": 32, "decoder_layers": 1}},
        "distill": {"steps": 8, "micro_batch": 4, "grad_accum": 1, "warmup_steps": 2, "lr": 3e-3,
                    "checkpoint_every": 4, "bf16": "off"},
        "plan": {"granularity": "part", "candidates": ["fp32", "fp16", "int8"], "calibration_clips": 2},
        "export": {"enabled": True, "device_seconds": 0.3, "threads": 2},
        "evaluate": {"prompts": 2, "seconds": 0.3, "guidance_scale": 3.0, "top_k": 250, "clap_mini_steps": 10,
                     "max_eval_clips": 8},
    }
    mini = {
        "seed": 0,
        "data": {"pieces": {"bach": 40, "folk": 20}, "sample_rate": 8000, "clip_seconds": 4.0, "clips_per_render": 3,
                 "renders_per_piece": 2, "max_render_seconds": 30.0, "fractions": [0.1, 0.1], "workers": 2},
        "world": {"teacher": {"decoder_hidden": 256, "decoder_layers": 4}, "student": {"decoder_hidden": 128, "decoder_layers": 2}},
        # ce_weight 1: decided on the valid split (docs/reproduction.md): pure StageMixedKL came closest to the
        # teacher but lost to cross-entropy on NLL; with cross-entropy mixed in it matched CE's NLL as well
        "distill": {"steps": 300, "micro_batch": 8, "grad_accum": 1, "warmup_steps": 30, "lr": 1e-3,
                    "checkpoint_every": 50, "bf16": "auto", "ce_weight": 1.0},
        "plan": {"granularity": "layer", "candidates": ["fp32", "fp16", "bf16", "int8"], "calibration_clips": 8},
        "export": {"enabled": True, "device_seconds": 4.0, "threads": 2, "ort_format": True},
        "evaluate": {"prompts": 24, "seconds": 4.0, "guidance_scale": 3.0, "top_k": 250, "clap_mini_steps": 400,
                     "max_eval_clips": 200},
    }
    paper = {
        "seed": 0,
        "data": {"dataset": None, "text_column": "text", "clip_seconds": 10.0},
        "world": {"teacher_id": "facebook/musicgen-large", "student_id": "facebook/musicgen-small"},
        "distill": {"steps": 5000, "micro_batch": 4, "grad_accum": 8, "warmup_steps": 250, "lr": 1e-5,
                    "checkpoint_every": 250, "bf16": "auto"},
        "plan": {"granularity": "layer", "candidates": ["fp32", "fp16", "bf16", "int8"], "calibration_clips": 16},
        "export": {"enabled": True, "device_seconds": 10.0, "threads": 2, "ort_format": True},
        "evaluate": {"prompts": 64, "seconds": 10.0, "guidance_scale": 3.0, "top_k": 250, "clap_mini_steps": 0,
                     "max_eval_clips": 500},
    }
    presets = {"smoke": smoke, "mini": mini, "paper": paper}
    if name not in presets:
        raise bad_value(ReproduceError, "preset", name, f"one of {sorted(presets)}{close_matches(name, presets)}")
    return copy.deepcopy(presets[name])


# ------------------------------------------------------------------------------------ stage runner


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finite(obj: Any) -> Any:
    """NaN and infinities become None: results.json is strict JSON that any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_finite(_jsonable(obj)), f, indent=1, allow_nan=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class Pipeline:
    """Runs stages in order with a JSON cache per stage."""

    out: Path
    force: set[str] = field(default_factory=set)
    progress: bool = True
    stages: dict[str, dict] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    resuming: bool = False  # while a stage runs: True if it was interrupted under the same key before
    _forced_any: bool = False

    def run(self, name: str, settings: Any, fn: Callable[[], dict], *, after: tuple[str, ...] = ()) -> dict:
        """Run ``fn`` (or reuse its cached result); return its result dict (``{"skipped": ...}`` if it skipped)."""
        for dep in after:
            if self.stages.get(dep, {}).get("skipped"):
                why = f"needs stage {dep!r}, which was skipped"
                return self._record(name, {"skipped": why}, 0.0, cached=False, key="")
        # a stage's key holds its settings and when the stages it reads were last made, so redoing a
        # stage (--force, or changed settings) redoes everything downstream of it
        key = _key({"settings": settings, "after": [self.keys.get(d, "") for d in after], "name": name})
        path = self.out / "stages" / f"{name}.json"
        if name not in self.force and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key and not saved["result"].get("skipped"):
                return self._record(name, saved["result"], saved.get("wall_s", 0.0), cached=True,
                                    key=f"{key}:{saved.get('done_at')}")
        # A stage that starts under a key it did not start under before begins clean (its folders of
        # partial work, e.g. distillation checkpoints or a profile cache, belong to other inputs); one
        # interrupted under this same key resumes from them.
        started = self.out / "stages" / f"{name}.started"
        self.resuming = started.exists() and started.read_text() == key
        started.parent.mkdir(parents=True, exist_ok=True)
        started.write_text(key)
        print(f"[reproduce] stage {name} {'(resuming) ' if self.resuming else ''}...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Skip as e:
            result = {"skipped": str(e)}
        wall = time.perf_counter() - t0
        done_at = time.time()
        _write_json(path, {"key": key, "result": result, "wall_s": wall, "done_at": done_at})
        print(f"[reproduce] stage {name}: {'skipped: ' + result['skipped'] if result.get('skipped') else 'done'} "
              f"({wall:.1f} s)", flush=True)
        return self._record(name, result, wall, cached=False, key=f"{key}:{done_at}")

    def _record(self, name: str, result: dict, wall: float, *, cached: bool, key: str) -> dict:
        self.keys[name] = key
        self.stages[name] = {"wall_s": round(wall, 2), "cached": cached,
                             **({"skipped": result["skipped"]} if result.get("skipped") else {})}
        return result


def _optional(module: str, what: str):
    """Import ``module`` or raise ``Skip`` saying which piece of the project is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{what} is not available ({module}: {e})") from None


# -------------------------------------------------------------------------------------------- data


def stage_data(cfg: dict, out: Path, preset: str, world: dict, progress: bool = True) -> dict:
    """The audiofolder dataset: the mini world's rendered music, the user's (paper), or a fresh render."""
    from musicgen.audiofolder import read_split

    if world.get("data_root"):
        root = world["data_root"]
        counts = {s: len(read_split(root, s)) for s in ("train", "valid", "test")}
        return {"root": root, "counts": counts, "source": "the mini world's music21 renders"}

    if preset == "paper":
        root = cfg.get("dataset")
        if not root:
            raise Skip("the paper preset needs --dataset DIR (audiofolder: <split>/metadata.jsonl with a text column)")
        counts = {s: len(read_split(root, s, text_column=cfg.get("text_column", "text"))) for s in ("train", "valid", "test")}
        return {"root": str(Path(root).resolve()), "counts": counts, "source": "user dataset"}
    data = _optional("musicgen.data", "the mini world's renderer (musicgen.data)")
    settings = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    rcfg = data.RenderConfig(**settings)
    root = out / "data"
    stats = data.render_dataset(rcfg, root, progress=progress)
    counts = {s: len(read_split(root, s)) for s in ("train", "valid", "test")}
    if not counts["train"] or not counts["test"]:
        raise Skip(f"rendering produced too few clips {counts}; raise data.pieces")
    return {"root": str(root), "counts": counts, "stats": _jsonable(stats), "source": "music21 corpus rendered offline"}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))  # NaN survives here; _finite removes it


# ------------------------------------------------------------------------------------------- world


def stage_world(cfg: dict, out: Path, preset: str, seed: int, progress: bool) -> dict:
    """Teacher and student_base model folders (``from_pretrained``), sharing tokenizer, text encoder and codec.

    smoke/mini: the mini world (``musicgen.world.run_world``: rendered music, trained codec, text
    encoder, tokens, teacher and student trained with cross-entropy; its own stage cache). Where that
    code is missing, tiny random MusicGens stand in and the results say so (``"stand_in"``).
    paper: hub ids or local folders (default facebook/musicgen-large and facebook/musicgen-small).
    """
    if preset == "paper":
        return {"teacher": cfg["teacher_id"], "student_base": cfg["student_id"], "stand_in": None}
    try:
        world = _optional("musicgen.world", "the mini world (musicgen.world)")
        folder = out / "world"
        threads = torch.get_num_threads()
        try:
            summary = world.run_world(cfg.get("world_preset", preset), folder, progress=progress)
        finally:
            torch.set_num_threads(threads)  # run_world sets its own thread count for its stages
        paths = world.world_paths(folder)
        brief = {st: {k: v for k, v in f.items() if k not in ("curve", "samples")}
                 for st, f in summary.get("stages", {}).items()}
        return {"teacher": str(paths["teacher"]), "student_base": str(paths["student"]), "stand_in": None,
                "data_root": str(paths["data"]),
                "tokens": {s: str(paths[f"tokens_{s}"]) for s in ("train", "valid", "test")},
                "world_stages": brief, "world_wall_s": summary.get("total_wall_seconds"),
                "curves": {n: summary.get("stages", {}).get(n, {}).get("curve") for n in ("teacher", "student")}}
    except Skip as why:
        from musicgen.tiny import save_tiny_musicgen

        t, s = out / "world" / "teacher", out / "world" / "student_base"
        save_tiny_musicgen(t, seed=seed + 1, **cfg["teacher"])
        # the student shares the teacher's text encoder and codec, as MusicGen sizes do
        _save_student_sharing(t, s, seed=seed + 2, sizes=cfg["student"])
        return {"teacher": str(t), "student_base": str(s),
                "stand_in": f"{why}; tiny random MusicGens stand in for the teacher and student_base, so quality "
                            "figures below measure nothing about distillation"}


def _world_recipe(cfg: dict, preset: str) -> dict | None:
    """The mini world's recipe for this preset (thread counts aside), so that changing it redoes the
    world stage and everything after it; None for the paper preset or where the world code is missing."""
    if preset == "paper":
        return None
    try:
        from musicgen.world import get_preset
    except ImportError:
        return None
    return get_preset(cfg.get("world_preset", preset)).recipe()


def _save_student_sharing(teacher_dir: Path, out: Path, *, seed: int, sizes: dict) -> None:
    from transformers import AutoTokenizer

    from musicgen.tiny import build_tiny_musicgen

    teacher = _load(teacher_dir)
    student = build_tiny_musicgen(seed, **sizes)
    student.text_encoder.load_state_dict(teacher.text_encoder.state_dict())
    student.audio_encoder.load_state_dict(teacher.audio_encoder.state_dict())
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(out)


_LOADED: dict[str, Any] = {}


def _load(path: str | Path, *, max_params: int = 50_000_000):
    """``from_pretrained`` in eval mode; small models are kept and handed out as fresh copies."""
    from transformers import MusicgenForConditionalGeneration

    weights = Path(path) / "model.safetensors"
    key = f"{path}:{weights.stat().st_mtime_ns if weights.exists() else ''}"
    if key in _LOADED:
        return copy.deepcopy(_LOADED[key])
    model = MusicgenForConditionalGeneration.from_pretrained(str(path)).eval()
    if sum(p.numel() for p in model.parameters()) <= max_params:
        _LOADED[key] = copy.deepcopy(model)
    return model


def _tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------ tokens


@torch.no_grad()
def stage_tokens(data_root: str, model_dir: str, out: Path, *, clip_seconds: float, max_clips: int,
                 world: dict | None = None) -> dict:
    """Codec codes of every split: the mini world's token files, or encoded here with the shared codec."""
    from musicgen.audiofolder import load_audio, read_split
    from musicgen.distill import CodesDataset, load_codes

    if world and world.get("tokens"):
        paths = world["tokens"]
        counts = {s: len(load_codes(p)) for s, p in paths.items()}
        return {"paths": paths, "counts": counts, "frames": int(load_codes(paths["train"]).codes.shape[-1]),
                "source": "musicgen.world tokens"}

    model = _load(model_dir)
    codec = model.audio_encoder
    sr = model.config.audio_encoder.sampling_rate
    n = int(round(clip_seconds * sr))
    counts, paths = {}, {}
    for split in ("train", "valid", "test"):
        clips = read_split(data_root, split)
        if split != "train":
            clips = clips[:max_clips]
        if not clips:
            counts[split] = 0
            continue
        codes, texts = [], []
        for i in range(0, len(clips), 16):
            batch = clips[i : i + 16]
            audio = np.stack([_fit(load_audio(c.path, sr), n) for c in batch])
            enc = codec.encode(torch.from_numpy(audio)[:, None], bandwidth=None)
            codes.append(enc.audio_codes[0])  # [B, K, T]
            texts += [c.text for c in batch]
        ds = CodesDataset(torch.cat(codes), texts)
        ds.save(out / "tokens" / split)
        counts[split] = len(ds)
        paths[split] = str(out / "tokens" / split)
    return {"paths": paths, "counts": counts, "frames": int(ds.codes.shape[-1]), "sample_rate": sr}


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


# ----------------------------------------------------------------------------------------- distill


def stage_distill(mode: str, cfg: dict, world: dict, tokens: dict, out: Path, progress: bool, nproc: int = 1,
                  *, fresh: bool = False) -> dict:
    """Fine-tune student_base with StageMixedKL (``kd``) or cross-entropy (``ce``), same steps and data.

    ``nproc > 1`` runs ``distill.py`` under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU) with the
    same global batch, then reopens the finished run here.
    """
    from musicgen.distill import DistillConfig, distill, load_codes

    config = DistillConfig(mode=mode, **{k: v for k, v in cfg.items() if k != "nproc"})
    run = out / f"student_{mode}"
    if fresh and run.exists():  # checkpoints of a run from other inputs (e.g. a retrained teacher)
        shutil.rmtree(run)
    if nproc > 1:
        if config.micro_batch % nproc:
            raise bad_value(ReproduceError, "distill.micro_batch", config.micro_batch, f"a multiple of nproc={nproc}")
        per = {**config.to_dict(), "micro_batch": config.micro_batch // nproc}
        run.mkdir(parents=True, exist_ok=True)
        _write_json(run / "config.json", per)
        script = Path(__file__).resolve().with_name("distill.py")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(script),
               "--student", world["student_base"], "--data", tokens["paths"]["train"], "--out", str(run),
               "--config", str(run / "config.json"), *(["--teacher", world["teacher"]] if mode == "kd" else [])]
        subprocess.run(cmd, check=True)
        config = DistillConfig.from_dict(per)  # reopen the finished run with the settings it ran under
        ddp_summary = json.loads((run / "summary.json").read_text())
    student = _load(world["student_base"])
    teacher = _load(world["teacher"]) if mode == "kd" else None
    summary = distill(student, teacher, load_codes(tokens["paths"]["train"]),
                      _tokenizer(world["student_base"]), config, run, progress=progress)
    if nproc > 1:  # keep the torchrun run's own summary (world size, wall time), not the reopening's
        summary = {**ddp_summary, "reopened": summary["resumed_from"] >= config.steps}
    _tokenizer(world["student_base"]).save_pretrained(run / "model")
    return {"model": str(run / "model"), "curve": str((run / "curve.jsonl").relative_to(out)), "summary": summary}


# -------------------------------------------------------------------------------------------- plan


def _calibration(model, tokens: dict, tok, n: int) -> dict:
    """Calibration inputs from held-in (valid) clips: never the test split."""
    from musicgen.distill import delay_pattern, load_codes

    ds = load_codes(tokens["paths"]["valid" if tokens["counts"].get("valid") else "train"])
    codes = ds.codes[:n]
    inputs, _, _ = delay_pattern(codes, bos_token_id=model.config.decoder.bos_token_id,
                                 pad_token_id=model.config.decoder.pad_token_id)
    enc = tok(ds.texts[:n], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "decoder_input_ids": inputs.reshape(-1, inputs.shape[-1]), "audio_codes": codes[None]}


def musicgen_kl_score(model, x: dict):
    """Planner score: decoder-logit KL to the fp32 model on calibration clips + EnCodec's relative error."""
    from kdq.quant import OutputKL, RelativeError, SumOfScores

    def logits(m):
        return m(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                 decoder_input_ids=x["decoder_input_ids"]).logits

    def audio(m):
        return m.audio_encoder.decode(x["audio_codes"], [None]).audio_values

    return SumOfScores([OutputKL(logits, model), RelativeError(audio, model)], [1.0, 1.0])


def stage_plan(cfg: dict, model_dir: str, tokens: dict, out: Path, progress: bool, *, fresh: bool = False) -> dict:
    """Profile the distilled student, then the paper plan and kdq's plan at no more bytes."""
    quant = _optional("kdq.quant", "the planner (kdq.quant)")
    plans = _optional("musicgen.plans", "the MusicGen plans (musicgen.plans)")
    model = _load(model_dir)
    x = _calibration(model, tokens, _tokenizer(model_dir), cfg["calibration_clips"])
    score = musicgen_kl_score(model, x)
    groups = plans.musicgen_groups(model, cfg["granularity"])
    planner = quant.MixedPrecisionPlanner(model, groups=groups, candidates=cfg["candidates"])
    folder = out / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    if fresh:  # the cache's fingerprint is names and shapes: it cannot tell retrained weights apart
        (folder / "profile_cache.json").unlink(missing_ok=True)
    table = planner.profile(score, cache=folder / "profile_cache.json", progress=progress)
    table.save(folder / "sensitivity.json")
    paper = plans.paper_plan()
    paper_measured = planner.measure(paper, score)
    budget = int(paper_measured["measured_bytes"])
    kdq_plan = planner.solve(table, max_bytes=budget)
    kdq_measured = planner.measure(kdq_plan, score)
    (folder / "paper_plan.json").write_text(paper.to_json())
    (folder / "kdq_plan.json").write_text(kdq_plan.to_json())
    frontier = [{"bytes": int(p["bytes"]), "sensitivity": float(p["sensitivity"])} for p in planner.frontier(table)]
    return {
        "paper_plan_file": str(folder / "paper_plan.json"), "kdq_plan_file": str(folder / "kdq_plan.json"),
        "budget_bytes": budget, "groups": len(groups), "evaluations": planner.evaluations(),
        "fp32": {"bytes": int(table.total_bytes("fp32")), "sensitivity": 0.0},
        "paper_plan": {"bytes": int(paper_measured["measured_bytes"]), "sensitivity": paper_measured["measured_sensitivity"],
                       "measured": paper_measured},
        "kdq_plan": {"bytes": int(kdq_measured["measured_bytes"]), "sensitivity": kdq_measured["measured_sensitivity"],
                     "predicted_sensitivity": kdq_measured["predicted_sensitivity"], "measured": kdq_measured,
                     "assignments": dict(kdq_plan.assignments)},
        "frontier": frontier, "sensitivity": _jsonable(table.to_dict()),
    }


# -------------------------------------------------------------------------------------------- models


def build_variants(world: dict, distilled: dict[str, dict], plan: dict) -> dict[str, Any]:
    """The seven variants as models (or the reason one cannot be built)."""
    models: dict[str, Any] = {"teacher": world["teacher"], "student_base": world["student_base"]}
    for mode in ("ce", "kd"):
        d = distilled[mode]
        models[f"student_{mode}"] = d["model"] if not d.get("skipped") else {"skipped": d["skipped"]}
    for base, plan_key, name in (("student_base", "paper_plan_file", "student_base_paper_plan"),
                                 ("student_kd", "paper_plan_file", "student_kd_paper_plan"),
                                 ("student_kd", "kdq_plan_file", "student_kd_kdq_plan")):
        if plan.get("skipped"):
            models[name] = {"skipped": f"plan: {plan['skipped']}"}
        elif isinstance(models[base], dict):
            models[name] = {"skipped": f"{base}: {models[base]['skipped']}"}
        else:
            models[name] = (models[base], plan[plan_key])
    return models


def materialise(spec: Any):
    """A model from a folder, or a folder and a plan file (``apply_plan`` on a fresh copy)."""
    if isinstance(spec, tuple):
        from kdq.quant import Plan, apply_plan

        model = _load(spec[0])
        return apply_plan(model, Plan.from_json(Path(spec[1]).read_text())), spec[0]
    return _load(spec), spec


# ------------------------------------------------------------------------------------------ export


def stage_export(cfg: dict, variants: dict, tokens: dict, out: Path, progress: bool) -> dict:
    """ONNX bundles of student_kd (fp32, paper plan, kdq plan), end-to-end parity and the device run."""
    exp = _optional("musicgen.export", "the ONNX bundle export (musicgen.export)")
    rt = _optional("musicgen.runtime", "the ONNX Runtime pipeline (musicgen.runtime)")
    if isinstance(variants["student_kd"], dict):
        raise Skip(f"student_kd: {variants['student_kd']['skipped']}")
    src = variants["student_kd"]
    bundles: dict[str, Any] = {}
    plans = {"fp32": "fp32"}
    for name in ("student_kd_paper_plan", "student_kd_kdq_plan"):
        if isinstance(variants[name], tuple):
            plans[name.removeprefix("student_kd_")] = variants[name][1]
    for label, plan in plans.items():
        target = out / "bundles" / label
        try:
            plan_obj = plan
            if plan != "fp32":
                from kdq.quant import Plan

                plan_obj = Plan.from_json(Path(plan).read_text())
            report = exp.export_bundle(src, target, plan=plan_obj, progress=progress)
            bundles[label] = {"path": str(target), "bytes": report.get("bundle_bytes"),
                              "parts": {p: {k: v for k, v in e.items() if k in ("dtype", "bytes", "parity", "file")}
                                        for p, e in report.get("parts", {}).items()}}
        except ImportError as e:
            bundles[label] = {"skipped": f"plan export is not available here ({e})"}
        except Exception as e:  # a plan the exporter cannot honour yet is a result, not a crash
            bundles[label] = {"skipped": f"{type(e).__name__}: {str(e)[:300]}"}
    if bundles["fp32"].get("skipped"):
        return {"bundles": bundles, "skipped": f"fp32 export failed: {bundles['fp32']['skipped']}"}
    # end-to-end parity: greedy CFG audio of the ORT loop against transformers' generate
    model = _load(src)
    tok = _tokenizer(src)
    prompt = "a slow chorale on organ"
    frames = max(int(cfg["device_seconds"] * 50), 8)
    torch_audio = model.generate(**tok([prompt], return_tensors="pt"), do_sample=False, guidance_scale=3.0,
                                 max_new_tokens=frames + 3).numpy()
    pipe = rt.MusicgenOnnx(bundles["fp32"]["path"], threads=cfg["threads"])
    ort_audio = pipe.generate([prompt], max_new_tokens=frames + 3, guidance_scale=3.0)
    n = min(torch_audio.shape[-1], ort_audio.shape[-1])
    parity = float(np.abs(torch_audio[..., :n] - ort_audio[..., :n]).max())
    graph_parity = _max_abs(bundles["fp32"].get("parts", {}))
    graph_parity = graph_parity if math.isfinite(graph_parity) else None
    # the device run: each bundle in a fresh process (so peak RSS is the run's own), few threads, sampled
    runs = {}
    script = Path(__file__).resolve().with_name("device_run.py")
    for label, b in bundles.items():
        if b.get("skipped"):
            continue
        if not script.exists():
            runs[label] = {"skipped": "the device run (musicgen/device_run.py) is not available"}
            continue
        cmd = [sys.executable, str(script), "--bundle", b["path"], "--prompt", prompt, "--seconds",
               str(cfg["device_seconds"]), "--out", str(out / "bundles" / f"{label}_device.wav"),
               "--threads", str(cfg["threads"]), *(["--ort-format"] if cfg.get("ort_format") else [])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(script.parents[2]), str(script.parents[1]),
                                                            os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if proc.returncode != 0 or not lines:
            runs[label] = {"skipped": f"device_run failed (exit {proc.returncode}): {proc.stderr[-300:]}"}
            continue
        runs[label] = json.loads(lines[-1])
        runs[label]["command"] = " ".join(shlex.quote(c) for c in cmd[1:])
    fp32_run = runs.get("fp32", {})
    return {"bundles": bundles, "device_runs": runs, "parity_max_abs": parity, "graph_parity_max_abs": graph_parity,
            "rtf": fp32_run.get("rtf"), "threads": cfg["threads"], "prompt": prompt}


def _max_abs(obj: Any) -> float:
    best = -math.inf
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("max_abs_diff", "max_abs") and isinstance(v, (int, float)):
                best = max(best, float(v))
            elif k in ("max_abs_diff", "max_abs") and isinstance(v, dict):
                best = max([best, *(float(x) for x in v.values() if isinstance(x, (int, float)))])
            else:
                best = max(best, _max_abs(v))
    elif isinstance(obj, list):
        for v in obj:
            best = max(best, _max_abs(v))
    return best


# ---------------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def heldout_figures(model, teacher, tok, ds, *, batch: int = 8) -> dict:
    """Teacher-forced NLL (nats/token, all codebooks and the first) and forward KL to the teacher."""
    import torch.nn.functional as F

    from kdq.losses import forward_kl
    from musicgen.distill import decoder_logits, delay_pattern, encode_text

    nll = nll0 = kl = 0.0
    n = n0 = 0
    for i in range(0, len(ds), batch):
        codes = ds.codes[i : i + batch]
        enc = tok(ds.texts[i : i + batch], return_tensors="pt", padding=True)
        no = torch.zeros(len(codes), dtype=torch.bool)
        inputs, labels, mask = delay_pattern(codes, bos_token_id=model.config.decoder.bos_token_id,
                                             pad_token_id=model.config.decoder.pad_token_id)
        s = decoder_logits(model, inputs, *encode_text(model, enc["input_ids"], enc["attention_mask"], drop=no)).float()
        lp = F.log_softmax(s, -1).gather(-1, labels.clamp(0, s.shape[-1] - 1)[..., None])[..., 0]
        nll -= float(lp[mask].sum())
        nll0 -= float(lp[:, 0][mask[:, 0]].sum())
        n += int(mask.sum())
        n0 += int(mask[:, 0].sum())
        if teacher is not None:
            t = decoder_logits(teacher, inputs, *encode_text(teacher, enc["input_ids"], enc["attention_mask"], drop=no))
            kl += float(forward_kl(s, t.float(), mask=mask, reduction="sum"))
    return {"nll": nll / n, "nll_cb0": nll0 / n0, "kl_teacher": (kl / n) if teacher is not None else 0.0}


def stage_evaluate(cfg: dict, variants: dict, tokens: dict, data: dict, out: Path, progress: bool, seed: int) -> dict:
    from tqdm.auto import tqdm

    from kdq.quant import model_bytes
    from musicgen.audiofolder import load_audio, read_split
    from musicgen.distill import load_codes

    test = load_codes(tokens["paths"]["test"])
    clips = read_split(data["root"], "test")
    prompts = list(dict.fromkeys(c.text for c in clips))[: cfg["prompts"]]
    if len(prompts) < cfg["prompts"]:
        prompts = (prompts * cfg["prompts"])[: cfg["prompts"]]
    teacher = _load(variants["teacher"])
    tok = _tokenizer(variants["teacher"])
    sr = teacher.config.audio_encoder.sampling_rate
    reference = [load_audio(c.path, sr) for c in clips[: cfg["max_eval_clips"]]]
    embedders, missing = _embedders(cfg, variants, data, out, progress)
    frames = max(int(cfg["seconds"] * 50), 8)
    results: dict[str, dict] = {}
    generated: dict[str, list[np.ndarray]] = {}
    ref_cache: dict[str, np.ndarray] = {}
    for name in tqdm(VARIANT_NAMES, desc="evaluate", disable=not progress):
        spec = variants[name]
        if isinstance(spec, dict):
            results[name] = {"skipped": spec["skipped"]}
            continue
        model, folder = materialise(spec)
        row: dict[str, Any] = {"bytes": int(model_bytes(model))}
        row.update(heldout_figures(model, teacher if name != "teacher" else None, tok, test))
        audio = []
        for i, prompt in enumerate(prompts):
            torch.manual_seed(seed * 1000 + i)
            wav = model.generate(**tok([prompt], return_tensors="pt"), do_sample=True, top_k=cfg["top_k"],
                                 guidance_scale=cfg["guidance_scale"], max_new_tokens=frames + 3)
            audio.append(wav[0, 0].float().numpy())
        generated[name] = audio
        row["samples"] = _save_samples(out, name, audio, sr)
        row.update(_scores(embedders, audio, prompts, reference, sr, ref_cache))
        results[name] = row
        del model
    headline = _headline(results)
    for name, row in results.items():
        if name != "student_base" and not row.get("skipped") and "student_base" in results:
            row["retention"] = _retention(results["student_base"], row)
    return {"variants": results, "prompts": prompts, "embedders": {e.key: _label(e) for e in embedders},
            "embedders_missing": missing, "headline": headline, "sample_rate": sr}


def _label(e) -> str:
    return f"{e.name} (proxy)" if getattr(e, "proxy", False) else e.name


def _embedders(cfg: dict, variants: dict, data: dict, out: Path, progress: bool):
    ev = _optional("musicgen.evaluate", "the evaluation embedders (musicgen.evaluate)")
    emb_mod = _optional("musicgen.embedders", "the evaluation embedders (musicgen.embedders)")
    clap_mini = None
    if cfg.get("clap_mini_steps"):
        clap_mini = emb_mod.train_clap_mini(data["root"], out_dir=out / "clap_mini", steps=cfg["clap_mini_steps"],
                                            batch_size=16, progress=progress, num_threads=1)
    ready, missing = ev.offline_embedders(codec=variants["teacher"], clap_mini=clap_mini, clap=cfg.get("clap"))
    return ready, missing


def _scores(embedders, audio, prompts, reference, sr, ref_cache: dict) -> dict:
    """FAD (against the test clips) and CLAP score per embedder; reference embeddings computed once."""
    import musicgen.evaluate as ev
    from kdq.metrics import frechet_distance

    row: dict[str, Any] = {}
    for e in embedders:
        key = f"fad_{e.key}"
        try:
            if e.key not in ref_cache:
                ref_cache[e.key] = e.fad_embeddings(reference, sr)
            gen = e.fad_embeddings(audio, sr)
            row[key] = frechet_distance(gen, ref_cache[e.key])
            row[f"rows_{key}"] = [len(gen), len(ref_cache[e.key])]
        except Exception as err:
            row[key] = None
            row[f"error_{key}"] = f"{type(err).__name__}: {str(err)[:200]}"
        if e.has_text:
            row.update(ev.clap_score_with(e, prompts, audio, sample_rate=sr))
    # frame-level embedders first: a few dozen clips give thousands of frames, a clip-level FAD on so few
    # rows is mostly estimator bias
    fad_keys = [k for k in ("fad_vggish", "fad_encodec", "fad_clap", "fad_clap-mini-proxy") if row.get(k) is not None]
    clap_keys = [k for k in ("clap_score_clap", "clap_score_clap-mini-proxy") if row.get(k) is not None]
    row["fad"] = row[fad_keys[0]] if fad_keys else None
    row["fad_embedder"] = fad_keys[0].removeprefix("fad_") if fad_keys else None
    row["clap"] = row[clap_keys[0]] if clap_keys else None
    row["clap_embedder"] = clap_keys[0].removeprefix("clap_score_") if clap_keys else None
    return row


def _retention(base: dict, row: dict) -> dict:
    from kdq.metrics import retention_table

    nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and (k.startswith("fad_") or k.startswith("clap_score_"))}
    bnums = {k: v for k, v in base.items() if isinstance(v, (int, float)) and (k.startswith("fad_") or k.startswith("clap_score_"))}
    table = retention_table(bnums, nums)
    out = {}
    if row.get("clap_embedder"):
        out["clap"] = table.get(f"retention_clap_score_{row['clap_embedder']}")
    if row.get("fad_embedder"):
        out["fad"] = table.get(f"retention_fad_{row['fad_embedder']}")
    return out


def _headline(results: dict) -> dict:
    v, b = results.get("student_kd_paper_plan", {}), results.get("student_base", {})
    if v.get("skipped") or b.get("skipped") or not v or not b:
        return {"variant": "student_kd_paper_plan", "baseline": "student_base",
                "skipped": v.get("skipped") or b.get("skipped") or "not evaluated"}
    ret = _retention(b, v)
    parts = [x for x in (ret.get("clap"), ret.get("fad")) if isinstance(x, (int, float))]
    return {"variant": "student_kd_paper_plan", "baseline": "student_base", "fad": v.get("fad"), "clap": v.get("clap"),
            "size_reduction": 1 - v["bytes"] / b["bytes"], "retention": float(np.mean(parts)) if parts else None,
            "retention_parts": ret, "embedder": f"FAD: {v.get('fad_embedder')}, CLAP: {v.get('clap_embedder')}",
            "retention_definition": "retention = mean of CLAP retention (kdq CLAP / base CLAP) and FAD retention "
                                    "(base FAD / kdq FAD), against student_base in fp32 (docs/metrics.md)"}


def _save_samples(out: Path, name: str, audio: list[np.ndarray], sr: int) -> list[str]:
    import soundfile as sf

    folder = out / "samples" / name
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, a in enumerate(audio):
        path = folder / f"{i}.wav"
        peak = float(np.abs(a).max()) or 1.0
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".wav")
        os.close(fd)
        sf.write(tmp, np.clip(a / max(peak, 1.0), -1, 1), sr, subtype="PCM_16", format="WAV")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        files.append(str(path.relative_to(out)))
    return files


# -------------------------------------------------------------------------------------------- main


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for pkg in ("kdq", "torch", "transformers", "onnx", "onnxruntime", "numpy", "scipy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.cuda.is_available()
    return out


def reproduce(preset: str = "mini", out: str | Path | None = None, *, force: set[str] | None = None,
              overrides: dict | None = None, progress: bool = True, command: str | None = None,
              nproc: int = 1) -> dict:
    """Run the pipeline; write ``OUT/results.json`` and ``OUT/report.html``; return the results."""
    cfg = _preset(preset)
    for section, values in (overrides or {}).items():
        if section not in cfg:
            raise bad_value(ReproduceError, "override", section, f"a preset section: {sorted(cfg)}")
        cfg[section].update(values) if isinstance(cfg[section], dict) else cfg.__setitem__(section, values)
    out = Path(out or f"runs/{preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(out, force=set(force or ()), progress=progress)
    seed = cfg["seed"]
    t_all = time.perf_counter()

    world = pipe.run("world", {"world": cfg["world"], "seed": seed, "recipe": _world_recipe(cfg["world"], preset)},
                     lambda: stage_world(cfg["world"], out, preset, seed, progress))
    data = pipe.run("data", cfg["data"], lambda: stage_data(cfg["data"], out, preset, world, progress), after=("world",))
    clip_s = cfg["data"].get("clip_seconds", 10.0)
    tokens = pipe.run("tokens", {"clip_seconds": clip_s, "max": cfg["evaluate"]["max_eval_clips"]},
                      lambda: stage_tokens(data["root"], world["student_base"], out, clip_seconds=clip_s,
                                           max_clips=cfg["evaluate"]["max_eval_clips"], world=world),
                      after=("data", "world"))
    distilled = {}
    for mode in ("ce", "kd"):
        distilled[mode] = pipe.run(f"distill_{mode}", cfg["distill"],
                                   lambda mode=mode: stage_distill(mode, cfg["distill"], world, tokens, out, progress,
                                                                   nproc, fresh=not pipe.resuming),
                                   after=("world", "tokens"))
    plan = pipe.run("plan", cfg["plan"], lambda: stage_plan(cfg["plan"], distilled["kd"]["model"], tokens, out, progress,
                                                            fresh=not pipe.resuming),
                    after=("distill_kd", "tokens"))
    variants = build_variants(world, distilled, plan) if not world.get("skipped") else {
        n: {"skipped": f"world: {world['skipped']}"} for n in VARIANT_NAMES}
    export = (pipe.run("export", cfg["export"], lambda: stage_export(cfg["export"], variants, tokens, out, progress),
                       after=("distill_kd", "plan"))
              if cfg["export"].get("enabled") else {"skipped": "export disabled in this preset"})
    evaluation = pipe.run("evaluate", cfg["evaluate"],
                          lambda: stage_evaluate(cfg["evaluate"], variants, tokens, data, out, progress, seed),
                          after=("tokens", "distill_ce", "distill_kd", "plan"))

    variants_out = evaluation.get("variants") or {n: (v if isinstance(v, dict) else {"skipped": f"evaluate: {evaluation.get('skipped')}"})
                                                   for n, v in variants.items()}
    ort = {k: v for k, v in export.items() if k not in ("bundles",)} if not export.get("skipped") else {"skipped": export["skipped"]}
    if not export.get("skipped"):
        ort["bundle_bytes"] = {k: b.get("bytes") for k, b in export["bundles"].items()}
    results = {
        "preset": preset,
        "command": command or f"python examples/musicgen/reproduce.py --preset {preset} --out {out}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "out": str(out),
        "world": {k: v for k, v in world.items()},
        "stand_in": world.get("stand_in"),
        "data": {k: v for k, v in data.items() if k != "stats"},
        "variants": variants_out,
        "prompts": evaluation.get("prompts", []),
        "embedders": evaluation.get("embedders", {}),
        "embedders_missing": evaluation.get("embedders_missing", {}),
        "headline": evaluation.get("headline", {"skipped": evaluation.get("skipped")}),
        "ort": ort,
        "planner": {k: v for k, v in plan.items() if k not in ("paper_plan_file", "kdq_plan_file")},
        "training": {**{f"student_{m}": distilled[m]["curve"] for m in ("ce", "kd") if not distilled[m].get("skipped")},
                     **{f"{n} (CE pretraining)": c for n, c in (world.get("curves") or {}).items() if c}},
        "distill": {f"student_{m}": distilled[m].get("summary", distilled[m]) for m in ("ce", "kd")},
        "stages": {**{f"world/{k}": {"wall_s": v.get("wall_seconds"),
                                     "cached": bool(v.get("cached")) or pipe.stages.get("world", {}).get("cached", False)}
                      for k, v in (world.get("world_stages") or {}).items()}, **pipe.stages},
        "total_wall_s": round(time.perf_counter() - t_all, 1),
        "versions": _versions(),
        "config": cfg,
    }
    results["ablation_note"] = _ablation_note(results)
    _write_json(out / "results.json", results)
    from musicgen.report import write_report

    write_report(out / "results.json")
    return results


def _ablation_note(results: dict) -> str:
    """Which of the issue's expectations held in this run, stated from the numbers."""
    v = results["variants"]
    notes = []
    if results.get("stand_in"):
        notes.append(f"STAND-IN MODELS: {results['stand_in']}.")

    def get(name, key):
        row = v.get(name) or {}
        return None if row.get("skipped") else row.get(key)

    def cmp(a, b, key, lower=True, what=""):
        x, y = get(a, key), get(b, key)
        if x is None or y is None:
            return
        ok = x < y if lower else x > y
        notes.append(f"{a} {'beats' if ok else 'does NOT beat'} {b} on {what or key} ({x:.4g} vs {y:.4g}).")

    cmp("teacher", "student_base", "fad", what="FAD")
    cmp("teacher", "student_base", "nll", what="held-out NLL")
    cmp("student_kd", "student_ce", "kl_teacher", what="KL to the teacher")
    cmp("student_kd", "student_ce", "nll", what="held-out NLL")
    a, b = v.get("student_kd_kdq_plan") or {}, v.get("student_kd_paper_plan") or {}
    if not a.get("skipped") and not b.get("skipped") and a.get("bytes") and b.get("bytes"):
        notes.append(f"kdq plan {a['bytes']:,} B vs paper plan {b['bytes']:,} B; KL to teacher "
                     f"{a.get('kl_teacher', float('nan')):.4g} vs {b.get('kl_teacher', float('nan')):.4g}.")
    return " ".join(notes)


@flush_denormals
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini", choices=["smoke", "mini", "paper"])
    p.add_argument("--out", help="output folder (default runs/<preset>)")
    p.add_argument("--force", nargs="*", default=[], help="stages to redo even if cached")
    p.add_argument("--dataset", help="paper preset: audiofolder dataset root (splits train/valid/test)")
    p.add_argument("--teacher", help="paper preset: teacher hub id or folder (default facebook/musicgen-large)")
    p.add_argument("--student", help="paper preset: student hub id or folder (default facebook/musicgen-small)")
    p.add_argument("--steps", type=int, help="distillation steps")
    p.add_argument("--clap", help="a CLAP checkpoint (hub id or folder) for FAD/CLAP with the real embedder")
    p.add_argument("--nproc", type=int, default=1, help="processes for distillation (torchrun DDP; one per GPU)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    overrides: dict[str, dict] = {}
    if args.dataset:
        overrides.setdefault("data", {})["dataset"] = args.dataset
    if args.teacher:
        overrides.setdefault("world", {})["teacher_id"] = args.teacher
    if args.student:
        overrides.setdefault("world", {})["student_id"] = args.student
    if args.steps:
        overrides.setdefault("distill", {})["steps"] = args.steps
    if args.clap:
        overrides.setdefault("evaluate", {})["clap"] = args.clap
    command = "python examples/musicgen/reproduce.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = reproduce(args.preset, args.out, force=set(args.force), overrides=overrides,
                        progress=not args.no_progress, command=command.strip(), nproc=args.nproc)
    print(json.dumps({"results": str(Path(results["out"]) / "results.json"),
                      "report": str(Path(results["out"]) / "report.html"), "stages": results["stages"]}, indent=1))
    return results


if __name__ == "__main__":
    main()
