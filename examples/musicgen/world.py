"""The mini world: real music rendered offline, and the models the reproduction starts from.

Stages (run by ``reproduce.py --from-scratch``, or here; each through ``musicgen.pipeline``)::

    render -> codec -> text -> tokens -> teacher, student_base

``render`` draws pieces from music21's corpus and renders them through a General MIDI SoundFont;
``codec`` trains a small EnCodec on the training clips; ``text`` a word tokenizer and a T5 encoder
pretrained on the captions; ``tokens`` encodes every split; ``teacher`` and ``student_base`` are
MusicGen decoders trained from scratch with cross-entropy on the codes (``student_base`` is the
analogue of a pretrained MusicGen-small).

The *local hub*: the mini preset ships these products under ``examples/musicgen/hub/mini/`` as
``from_pretrained`` folders, each with a model card (recipe, seed, command, held-out figures,
SHA-256 of every file), so the main job starts from pretrained checkpoints as the paper does.
``python examples/musicgen/world.py --preset mini --out runs/world --publish`` rebuilds them.

    python examples/musicgen/world.py --preset smoke --out runs/world-smoke
    python examples/musicgen/world.py --preset mini --out runs/world [--publish] [--force codec]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from kdq.errors import KdqError
from musicgen import flush_denormals
from musicgen.config import CodecConfig, LMConfig, Preset, RenderConfig, WorldConfig, digest, key_of, preset
from musicgen.files import read_json, sha256, write_json
from musicgen.pipeline import Context, Pipeline

HUB = Path(__file__).resolve().parent / "hub"
PRODUCTS = ("codec", "text", "teacher", "student_base")  # what the hub ships (from_pretrained folders)
SPLITS = ("train", "valid", "test")


class WorldError(KdqError):
    """A world that cannot be built or a hub that does not match its recipe."""


# ------------------------------------------------------------------------------------------ stages


def world_data(p: Preset) -> RenderConfig:
    """The render recipe of the world's training data: the preset's, with the world's ``renders_per_piece``."""
    n = p.world.renders_per_piece if p.world is not None else None
    return p.data if n is None else dataclasses.replace(p.data, renders_per_piece=n)


def render_stage(p: Preset, ctx: Context, data: RenderConfig | None = None) -> dict:
    """Render the dataset (audiofolder layout) into ``ctx.folder/data``; ``data`` defaults to ``p.data``."""
    from musicgen.data.audiofolder import read_split
    from musicgen.data.render import render_dataset

    root = ctx.folder / "data"
    stats = render_dataset(data or p.data, root, seed=p.seed, progress=ctx.progress)
    counts = {s: len(read_split(root, s)) for s in SPLITS}
    if not counts["train"] or not counts["test"]:
        raise WorldError(f"rendering produced too few clips {counts}; raise data.pieces")
    return {"root": str(root), "counts": counts, "source": "music21 corpus rendered offline",
            "stats": {k: v for k, v in stats.items() if k not in ("caption_words", "failure_list")}}


def split_audio(root: str | Path, split: str, sample_rate: int, limit: int | None = None) -> tuple[torch.Tensor, list]:
    """Audio ``[clips, samples]`` and the clips of a rendered split (equal-length clips)."""
    from musicgen.data.audiofolder import load_audio, read_split

    clips = read_split(root, split)[:limit]
    return torch.tensor(np.stack([load_audio(c.path, sample_rate) for c in clips])), clips


def codec_stage(cfg: CodecConfig, seed: int, ctx: Context) -> dict:
    """Train the codec (``CodecObjective``), save it, and measure it on held-out test clips."""
    from musicgen.eval.codec import evaluate_codec, spectrogram_figure
    from musicgen.files import write_wav
    from musicgen.models.codec import build_codec, decode
    from musicgen.train.loop import train
    from musicgen.train.objectives import CodecObjective
    from musicgen.data.tokens import encode_clips

    root = ctx.inputs["render"]["root"]
    audio, _ = split_audio(root, "train", cfg.sample_rate)
    model = build_codec(cfg, seed=seed)
    objective = CodecObjective(cfg, audio, seed=seed)
    summary = train(model, objective, cfg.train, ctx.folder / "run", progress=ctx.progress)
    model.save_pretrained(ctx.folder / "model")
    test, clips = split_audio(root, "test", cfg.sample_rate, limit=cfg.eval_clips)
    figures = evaluate_codec(model, test, sample_rate=cfg.sample_rate, codebook_size=cfg.codebook_size,
                             notes=[c.meta.get("notes") for c in clips])
    show = test[:3]
    recon = decode(model, encode_clips(model, list(show.numpy()), sample_rate=cfg.sample_rate,
                                       clip_seconds=show.shape[1] / cfg.sample_rate))[:, : show.shape[1]]
    spectrogram_figure(ctx.folder / "spectrograms.png", show.numpy(), recon.numpy(), sample_rate=cfg.sample_rate,
                       titles=[c.text for c in clips[:3]])
    for i in range(len(show)):
        write_wav(ctx.folder / f"test_{i}_original.wav", show[i].numpy(), cfg.sample_rate)
        write_wav(ctx.folder / f"test_{i}_reconstruction.wav", recon[i].numpy(), cfg.sample_rate)
    return {"model": str(ctx.folder / "model"), "params": sum(t.numel() for t in model.parameters()),
            "restarts": objective.restarts, "kmeans_residual": getattr(objective, "kmeans_residual", None),
            "train": summary, "held_out": figures}


def text_stage(w: WorldConfig, seed: int, ctx: Context) -> dict:
    """Train the caption tokenizer, pretrain then freeze the T5 encoder; save both."""
    from musicgen.data.audiofolder import read_split
    from musicgen.models.text import build_text_encoder, train_tokenizer
    from musicgen.train.loop import train
    from musicgen.train.objectives import MaskedTextModel, MaskedWordObjective

    cfg = w.text
    captions = [c.text for c in read_split(ctx.inputs["render"]["root"], "train")]
    tok = train_tokenizer(captions, max_length=cfg.max_length)
    batch = tok(sorted(set(captions)), padding=True, truncation=True, return_tensors="pt")
    model = MaskedTextModel(build_text_encoder(cfg, len(tok), seed=seed), len(tok))
    summary = train(model, MaskedWordObjective(cfg, batch["input_ids"], batch["attention_mask"]), cfg.train,
                    ctx.folder / "run", progress=ctx.progress)
    folder = ctx.folder / "model"
    model.encoder.eval().requires_grad_(False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"model": str(folder), "vocab_size": len(tok), "distinct_captions": int(len(batch["input_ids"])),
            "params": sum(p.numel() for p in model.encoder.parameters()), "train": summary}


def tokens_stage(codec_dir: str, data: dict, ctx: Context, *, clip_seconds: float, max_clips: int | None = None,
                 text_column: str = "text", max_bad_fraction: float = 0.0) -> dict:
    """Codes of every split with the codec in ``codec_dir`` (a codec or MusicGen folder)."""
    from transformers import AutoConfig, EncodecModel, MusicgenForConditionalGeneration

    from musicgen.data.audiofolder import Skipped, check_bad_share, load_clips, read_split
    from musicgen.data.tokens import TokenDataset, encode_clips
    from musicgen.eval.heldout import unigram_nll

    if AutoConfig.from_pretrained(codec_dir).model_type == "musicgen":
        codec = MusicgenForConditionalGeneration.from_pretrained(codec_dir, use_safetensors=True).audio_encoder.eval()
    else:
        codec = EncodecModel.from_pretrained(codec_dir, use_safetensors=True).eval()
    sr = codec.config.sampling_rate
    paths, counts, skipped = {}, {}, {}
    sets = {}
    for split in SPLITS:
        bad = Skipped()
        clips = read_split(data["root"], split, text_column=text_column, skipped=bad)
        clips = clips if split == "train" or max_clips is None else clips[:max_clips]
        clips, audio = load_clips(clips, sr, bad)
        check_bad_share(split, len(clips), bad, max_bad_fraction)
        skipped[split] = bad.summary()
        if not clips:
            continue
        codes = encode_clips(codec, audio, sample_rate=sr, clip_seconds=clip_seconds, progress=ctx.progress,
                             desc=f"encode {split}")
        sets[split] = TokenDataset(codes, [c.text for c in clips])
        paths[split] = str(sets[split].save(ctx.folder / f"{split}.safetensors"))
        counts[split] = len(clips)
    if "train" not in sets or "test" not in sets:
        raise WorldError(f"the dataset at {data['root']} needs clips in train and test (got {counts})")
    return {"paths": paths, "counts": counts, "skipped": skipped, "sample_rate": sr,
            "frames": int(sets["train"].codes.shape[-1]),
            "unigram_test": unigram_nll(sets["train"], sets["test"], vocab=codec.config.codebook_size)}


def lm_stage(cfg: LMConfig, w: WorldConfig, seed: int, ctx: Context, *, name: str) -> dict:
    """Train a MusicGen decoder from scratch with cross-entropy; held-out figures and a few samples."""
    from musicgen.data.tokens import TokenDataset
    from musicgen.eval.generate import generate, save_clips
    from musicgen.eval.heldout import heldout
    from musicgen.models.musicgen import build_musicgen, decoder_params, load_tokenizer
    from musicgen.train.loop import train
    from musicgen.train.objectives import LMObjective

    text_dir, tokens = ctx.inputs["text"]["model"], ctx.inputs["tokens"]
    model = build_musicgen(text_dir, ctx.inputs["codec"]["model"], cfg.decoder, seed=seed)
    tok = load_tokenizer(text_dir)
    objective = LMObjective(TokenDataset.load(tokens["paths"]["train"]), tok, cfg_dropout=cfg.cfg_dropout, name=name)
    summary = train(model, objective, cfg.train, ctx.folder / "run", progress=ctx.progress)
    folder = ctx.folder / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    test = TokenDataset.load(tokens["paths"]["test"])
    figures = {split: heldout(model, tok, TokenDataset.load(tokens["paths"][split]))
               for split in ("valid", "test") if split in tokens["paths"]}
    prompts = test.captions[:: max(1, len(test) // max(1, w.samples))][: w.samples]
    audio = generate(model, tok, prompts, seconds=w.sample_seconds, seed=seed)
    files = save_clips(ctx.folder / "samples", audio, model.config.audio_encoder.sampling_rate)
    return {"model": str(folder), "decoder_params": decoder_params(model), "train": summary, "held_out": figures,
            "curve": str(ctx.folder / "run" / "curve.jsonl"),
            "samples": [{"file": str(f), "text": t} for f, t in zip(files, prompts)]}


def build_world(p: Preset, pipe: Pipeline) -> dict[str, dict]:
    """Run (or reuse) the world's stages in ``pipe``; return their results by name."""
    w = p.world
    if w is None:
        raise WorldError(f"preset {p.name!r} has no world recipe")
    from musicgen.data.render import RENDERER

    data = world_data(p)
    pipe.run("render", {"data": data, "seed": p.seed, "renderer": RENDERER}, lambda c: render_stage(p, c, data))
    pipe.run("codec", {"codec": w.codec, "seed": p.seed}, lambda c: codec_stage(w.codec, p.seed, c), inputs=("render",))
    pipe.run("text", {"text": w.text, "seed": p.seed}, lambda c: text_stage(w, p.seed, c), inputs=("render",))
    pipe.run("tokens", {"clip_seconds": p.data.clip_seconds},
             lambda c: tokens_stage(c.inputs["codec"]["model"], c.inputs["render"], c, clip_seconds=p.data.clip_seconds),
             inputs=("render", "codec"))
    for name, cfg in (("teacher", w.teacher), ("student_base", w.student)):
        pipe.run(name, {"lm": cfg, "seed": p.seed, "samples": [w.samples, w.sample_seconds]},
                 lambda c, cfg=cfg, name=name: lm_stage(cfg, w, p.seed, c, name=name), inputs=("text", "codec", "tokens"))
    return {n: pipe.results[n] for n in ("render", "codec", "text", "tokens", "teacher", "student_base")}


# --------------------------------------------------------------------------------------------- hub


def recipe_digest(p: Preset) -> str:
    """What decides the world's products: the render recipe, the world recipe and the seed."""
    from musicgen.data.render import RENDERER

    return digest({"data": key_of(p.data), "world": key_of(p.world), "seed": p.seed, "renderer": RENDERER})


def hub_folder(p: Preset) -> Path:
    """Where preset ``p``'s shipped world lives."""
    return HUB / (p.hub or p.name)


def verify_hub(p: Preset) -> dict:
    """The shipped products' folders, after checking every file's SHA-256 and the recipe they were built with."""
    folder = hub_folder(p)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise WorldError(f"no shipped world at {folder}; build one with `python examples/musicgen/world.py --preset "
                         f"{p.name} --out runs/world --publish`, or run reproduce.py with --from-scratch")
    card = read_json(card_path)
    if card["recipe_digest"] != recipe_digest(p):
        raise WorldError(f"the world shipped in {folder} was built with another recipe (digest {card['recipe_digest']}, "
                         f"preset {recipe_digest(p)}); rebuild it with world.py --publish, or run with --from-scratch")
    for rel, want in card["sha256"].items():
        path = folder / rel
        if not path.is_file() or sha256(path) != want:
            raise WorldError(f"{path} is missing or does not match its SHA-256 in {card_path}; restore it with "
                             "`git checkout -- examples/musicgen/hub`")
    return {"folders": {n: str(folder / n) for n in PRODUCTS}, "card": card}


def publish(p: Preset, results: dict[str, dict], *, command: str, fp16: bool = True) -> Path:
    """Write the world's products into the hub folder with a model card each and ``card.json``.

    ``fp16``: store floating weights in fp16 (halves the files; the loaders cast back to fp32).
    """
    from safetensors.torch import load_file, save_file

    folder = hub_folder(p)
    stage = folder.with_name(f".{folder.name}.publishing")
    shutil.rmtree(stage, ignore_errors=True)
    sources = {"codec": results["codec"]["model"], "text": results["text"]["model"],
               "teacher": results["teacher"]["model"], "student_base": results["student_base"]["model"]}
    for name, src in sources.items():
        shutil.copytree(src, stage / name)
        if fp16:
            weights = stage / name / "model.safetensors"
            tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
            save_file(tensors, str(weights), metadata={"format": "pt"})
    def summary(held_out: dict) -> dict:  # per-clip values stay in the stage's record, not on the card
        return {split: {k: v for k, v in fig.items() if not k.endswith("_items")} for split, fig in held_out.items()}

    figures = {"codec": results["codec"]["held_out"], "tokens": {"unigram_test": results["tokens"]["unigram_test"]},
               **{n: {"held_out": summary(results[n]["held_out"]), "decoder_params": results[n]["decoder_params"]}
                  for n in ("teacher", "student_base")}}
    card = {"preset": p.name, "seed": p.seed, "recipe_digest": recipe_digest(p), "command": command,
            "recipe": {"data": p.data.to_dict(), "world": p.world.to_dict()}, "figures": figures,
            "fp16_storage": fp16, "created": time.strftime("%Y-%m-%d", time.gmtime()),
            "sha256": {str(f.relative_to(stage)): sha256(f) for f in sorted(stage.rglob("*")) if f.is_file()}}
    for name in PRODUCTS:
        (stage / name / "README.md").write_text(model_card(name, card))
    card["sha256"].update({f"{n}/README.md": sha256(stage / n / "README.md") for n in PRODUCTS})
    write_json(stage / "card.json", card)
    if folder.exists():
        if not (folder / "card.json").is_file():
            raise WorldError(f"{folder} exists but holds no card.json: not a hub folder this script wrote; move it away")
        shutil.rmtree(folder)
    stage.rename(folder)
    return folder


def model_card(name: str, card: dict) -> str:
    """A short README for one shipped model folder."""
    figs = card["figures"]
    lines = [f"# mini world: {name}", "", f"Built by `{card['command']}` (preset `{card['preset']}`, seed {card['seed']}, "
             f"recipe digest `{card['recipe_digest']}`, {card['created']}). Weights stored in "
             f"{'fp16' if card['fp16_storage'] else 'fp32'}; load with `from_pretrained(folder)`.", ""]
    if name == "codec":
        lines += ["Held-out test clips:", "", "```json", json.dumps(figs["codec"], indent=1), "```"]
    elif name in figs:
        lines += ["Held-out NLL (nats per token):", "", "```json", json.dumps(figs[name], indent=1), "```"]
    lines += ["", "The recipe (musicgen.config) and the SHA-256 of every file are in ../card.json."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- command


@flush_denormals
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Build the mini world (render, codec, text, tokens, teacher, student_base).")
    ap.add_argument("--preset", default="mini", help="smoke or mini")
    ap.add_argument("--out", required=True, help="output folder (resumable)")
    ap.add_argument("--force", nargs="*", default=[], help="stages to redo (and what depends on them)")
    ap.add_argument("--publish", action="store_true", help="write the products into examples/musicgen/hub/<preset>")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    p = preset(a.preset)
    if p.threads:
        torch.set_num_threads(p.threads)
    pipe = Pipeline(Path(a.out), force=set(a.force), progress=not a.no_progress)
    results = build_world(p, pipe)
    write_json(Path(a.out) / "world.json", {"preset": p.name, "stages": pipe.stages, "results": results})
    if a.publish:
        command = "python examples/musicgen/world.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        print(f"published {publish(p, results, command=command)}")
    print(json.dumps({"stages": pipe.stages}, indent=1))
    return results


if __name__ == "__main__":
    main()
