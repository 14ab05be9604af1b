"""Fine-tune a MusicGen student: StageMixedKL against a teacher (``kd``), or cross-entropy (``ce``).

One optimizer step sees a global batch of ``micro_batch x grad_accum x world_size`` clips of codec
codes ``[K=4, T]`` with their captions. Both modes run the one training loop
(``musicgen.train.loop``) on the same data in the same order; they differ only in the objective
(``musicgen.train.objectives``):

- ``kd``: ``kdq.losses.StageMixedKL(student, teacher, step=s, mask=m)`` + ``ce_weight`` x ``codebook_ce``;
- ``ce``: ``codebook_ce`` only (the ``student_ce`` control), the very loss ``student_base`` was
  pretrained with.

Only the decoder (and the text-to-decoder projection) trains, as in MusicGen; the text condition is
dropped for ``cfg_dropout`` of the clips exactly the way generation builds its unconditional rows.

Command line (also under ``torchrun --nproc-per-node N``: DDP, gloo on CPU, NCCL on GPUs)::

    python examples/musicgen/distill.py --student DIR --teacher DIR --data TOKENS.safetensors --out DIR \\
        [--mode kd|ce] [--config distill.json] [--set train.steps=200 train.micro_batch=8 ce_weight=1 ...]

``--config`` is a ``DistillConfig`` as JSON (``musicgen.config``); ``--set`` changes fields by path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from kdq.errors import bad_value
from musicgen import flush_denormals
from musicgen.config import ConfigError, DistillConfig, override

MODES = ("kd", "ce")


def run_distill(mode: str, cfg: DistillConfig, *, student: str | Path, teacher: str | Path | None, data: str | Path,
                out: str | Path, device: str = "cpu", progress: bool = True, throttle: float = 0.0) -> dict:
    """Train ``student``'s decoder (see the module docstring); save ``out/model``; return the summary.

    Resumes from ``out/checkpoints``; a finished run is reopened (not retrained) by any number of
    processes.
    """
    from musicgen.data.tokens import TokenDataset
    from musicgen.models.musicgen import load_musicgen, load_tokenizer
    from musicgen.train.loop import _dist, train
    from musicgen.train.objectives import DistillObjective, LMObjective

    if mode not in MODES:
        raise bad_value(ConfigError, "mode", mode, f"one of {MODES}", "use 'kd' (distillation) or 'ce' (the control)")
    if mode == "kd" and teacher is None:
        raise bad_value(ConfigError, "teacher", None, "a teacher model for mode='kd'", "pass one, or use mode='ce'")
    out = Path(out)
    model = load_musicgen(student).to(device)
    tok = load_tokenizer(student)
    tokens = TokenDataset.load(data)
    if tokens.codes.shape[1] != model.config.decoder.num_codebooks:
        raise bad_value(ConfigError, "data codebooks", tokens.codes.shape[1], f"the student's {model.config.decoder.num_codebooks}")
    if mode == "kd":
        objective = DistillObjective(tokens, tok, load_musicgen(teacher).to(device), cfg)
    else:
        objective = LMObjective(tokens, tok, cfg_dropout=cfg.cfg_dropout, name="distill[ce]")
    summary = train(model, objective, cfg.train, out, device=device, progress=progress, throttle=throttle)
    d = _dist()
    if d is None or d.get_rank() == 0:
        model.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
    return {**summary, "mode": mode, "config": cfg.to_dict()}


def distill_stage(mode: str, cfg: DistillConfig, *, student: str, teacher: str, data: str, out: Path,
                  nproc: int = 1, progress: bool = True) -> dict:
    """The pipeline's distillation stage: in this process, or under ``torchrun`` with ``nproc``
    processes (same global batch: the micro-batch is split), then reopened here."""
    import subprocess

    if nproc > 1:
        if cfg.train.micro_batch % nproc:
            raise bad_value(ConfigError, "distill.train.micro_batch", cfg.train.micro_batch, f"a multiple of nproc={nproc}")
        per = override(cfg, {"train.micro_batch": cfg.train.micro_batch // nproc})
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(per.to_dict()))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), __file__, "--mode", mode,
               "--student", student, "--data", data, "--out", str(out), "--config", str(out / "config.json"),
               *(["--teacher", teacher] if mode == "kd" else []), *([] if progress else ["--no-progress"])]
        subprocess.run(cmd, check=True)
        cfg = per  # reopen the finished run with the settings it ran under
    summary = run_distill(mode, cfg, student=student, teacher=teacher if mode == "kd" else None, data=data, out=out,
                          progress=progress)
    if nproc > 1:  # keep the torchrun run's figures (world size, wall time), not the reopening's
        summary = {**json.loads((out / "summary.json").read_text()), "mode": mode, "config": cfg.to_dict()}
    return {"model": str(out / "model"), "curve": str(out / "curve.jsonl"), "summary": summary}


@flush_denormals
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="student model folder (or hub id)")
    p.add_argument("--teacher", help="teacher model folder (or hub id); required for --mode kd")
    p.add_argument("--data", required=True, help="token file (musicgen.data.tokens.TokenDataset, .safetensors)")
    p.add_argument("--out", required=True, help="output folder (resumes from its checkpoints)")
    p.add_argument("--mode", default="kd", choices=MODES)
    p.add_argument("--config", help="DistillConfig as a JSON file")
    p.add_argument("--set", nargs="*", default=[], metavar="PATH=VALUE", help="change fields, e.g. train.steps=200")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = DistillConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else DistillConfig()
    changes = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(changes) != len(args.set):
        p.error(f"--set takes PATH=VALUE items, got {args.set}")
    cfg = override(cfg, changes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return run_distill(args.mode, cfg, student=args.student, teacher=args.teacher, data=args.data, out=args.out,
                           device=device, progress=not args.no_progress, throttle=args.throttle)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main()
