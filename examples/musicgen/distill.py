"""Distillation trainer for MusicGen decoders: StageMixedKL (or plain cross-entropy) on codebook logits.

One optimizer step sees a *global batch* of ``micro_batch x grad_accum x world_size`` clips of codec
codes ``[K=4, T]`` with their captions. For every clip the codes are laid out with MusicGen's delay
pattern (codebook k shifted by k steps, a BOS column in front), teacher and student predict all
positions in one teacher-forced pass, and the loss compares their logits ``[B, K, T + K - 1, V]``
only where the pattern holds a real code (its padding is masked):

- ``mode="kd"``: ``kdq.losses.StageMixedKL(student, teacher, step=s, mask=m)`` (+ ``ce_weight`` x
  cross-entropy on the codes, 0 by default);
- ``mode="ce"``: cross-entropy on the codes only: the ``student_ce`` control, same steps and data.

The loss of a step is the mean over every counted position of the global batch, however the batch
is split over micro-batches and processes: each micro-batch's mean is rescaled by its share of
positions before ``backward``, so one process with batch B and two DDP processes with B/2 each
take the same step (tested).

Training follows MusicGen's: the text encoder is frozen and only the decoder (with the projection
from text to decoder width) learns; the text condition is dropped for ``cfg_dropout`` of the clips
(0.2 as in audiocraft's MusicGen) exactly the way generation builds its unconditional rows (zero
hidden states, zero attention mask), for teacher and student alike, so the student also learns the
teacher's unconditional distribution that classifier-free guidance uses. AdamW with linear warm-up
and cosine decay, gradient clipping, optional bf16 autocast.

Exact resume: randomness is a pure function of ``(seed, step, example)``: the data order comes
from a per-epoch permutation, the dropout decisions from a per-step generator, and torch's global
RNG is reseeded at every step. A checkpoint (trainable weights and AdamW state in safetensors, the
rest in JSON) is written to a temporary folder and renamed, then ``latest.json`` is replaced
atomically, so a process killed at any instant (SIGKILL included) resumes from the last complete
checkpoint and ends with bit-identical weights (tested).

Command line (also under ``torchrun --nproc-per-node N``, DDP on gloo for CPU, NCCL for GPUs)::

    python examples/musicgen/distill.py --student DIR --teacher DIR --data DIR --out DIR \\
        [--mode kd|ce] [--steps 200] [--micro-batch 8] [--grad-accum 1] [--lr 1e-3] [--bf16 auto|on|off]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the `musicgen` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdq.errors import KdqError, bad_value, close_matches
from musicgen import flush_denormals

MODES = ("kd", "ce")
BF16_CHOICES = ("auto", "on", "off")


class DistillError(KdqError):
    """A bad distillation setting, dataset or checkpoint."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """Every knob of a distillation run (JSON round-trip with ``to_dict``/``from_dict``).

    Attributes:
        mode: ``"kd"`` (StageMixedKL against the teacher) or ``"ce"`` (cross-entropy on the codes).
        steps: optimizer steps.
        micro_batch: clips per process per forward pass.
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate (reached after ``warmup_steps``, then cosine decay).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        warmup_steps: linear warm-up length in optimizer steps.
        weight_decay: AdamW decoupled weight decay (matrices only; biases, norms, scalars get none).
        betas: AdamW betas.
        max_grad_norm: gradient clipping (0 disables it).
        cfg_dropout: fraction of clips whose text condition is dropped (classifier-free guidance).
        ce_weight: weight of cross-entropy on the codes added to the KD loss (``mode="kd"`` only).
        kd: keyword arguments of ``kdq.losses.StageMixedKL`` (``total_steps`` defaults to ``steps``).
        bf16: ``"on"``/``"off"`` bf16 autocast for teacher and student, ``"auto"`` times both on the
            first batch and keeps the faster (the choice is stored in the checkpoint).
        seed: seeds data order, condition dropout and every step's RNG.
        checkpoint_every: optimizer steps between checkpoints (the last step always checkpoints).
        keep_checkpoints: complete checkpoints kept on disk.
        log_every: optimizer steps between loss-component entries in the curve log.
    """

    mode: str = "kd"
    steps: int = 200
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    cfg_dropout: float = 0.2
    ce_weight: float = 0.0
    kd: dict = field(default_factory=dict)
    bf16: str = "off"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.mode not in MODES:
            raise bad_value(DistillError, "mode", self.mode, f"one of {MODES}", "use 'kd' or 'ce'")
        if self.bf16 not in BF16_CHOICES:
            raise bad_value(DistillError, "bf16", self.bf16, f"one of {BF16_CHOICES}")
        for name in ("steps", "micro_batch", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad_value(DistillError, name, value, "an integer >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise bad_value(DistillError, "warmup_steps", self.warmup_steps, f"an integer in [0, steps={self.steps}]")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise bad_value(DistillError, "cfg_dropout", self.cfg_dropout, "a fraction in [0, 1)")
        if not (self.lr > 0 and 0.0 <= self.min_lr_ratio <= 1.0):
            raise bad_value(DistillError, "lr/min_lr_ratio", (self.lr, self.min_lr_ratio), "lr > 0, ratio in [0, 1]")
        if self.ce_weight < 0:
            raise bad_value(DistillError, "ce_weight", self.ce_weight, "a weight >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise DistillError(f"unknown DistillConfig key {key!r}{close_matches(key, known)}; valid: {sorted(known)}")
        return cls(**d)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Data: codes with captions, and MusicGen's delay pattern
# --------------------------------------------------------------------------------------------------


class CodesDataset:
    """Codec codes ``[N, K, T]`` of equal-length clips with one caption each.

    Stored as ``codes.safetensors`` (tensor ``codes``, int16 on disk) and ``texts.json`` in a folder.
    """

    def __init__(self, codes: torch.Tensor, texts: list[str]):
        if codes.ndim != 3:
            raise bad_value(DistillError, "codes.shape", tuple(codes.shape), "[N, K, T]")
        if len(texts) != codes.shape[0]:
            raise bad_value(DistillError, "len(texts)", len(texts), f"one caption per clip ({codes.shape[0]})")
        self.codes = codes.long()
        self.texts = list(texts)

    def __len__(self) -> int:
        return self.codes.shape[0]

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with _atomic_path(folder / "codes.safetensors") as tmp:
            save_file({"codes": self.codes.to(torch.int16).contiguous()}, str(tmp))
        _atomic_write_text(folder / "texts.json", json.dumps(self.texts))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CodesDataset:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "codes.safetensors").exists() or not (folder / "texts.json").exists():
            raise bad_value(DistillError, "data", str(folder), "a folder with codes.safetensors and texts.json",
                            "write one with CodesDataset(codes, texts).save(folder)")
        return cls(load_file(str(folder / "codes.safetensors"))["codes"], json.loads((folder / "texts.json").read_text()))


def delay_pattern(codes: torch.Tensor, *, bos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay codes out with MusicGen's delay pattern for teacher-forced training.

    The mini world's ``musicgen.lm.delayed_batch`` does the layout (one implementation for LM
    pretraining and distillation); this wraps it in the ``[B, K, S]`` shapes the trainer uses.

    Args:
        codes: ``[B, K, T]`` codec codes.
        bos_token_id: the decoder start token (MusicGen: 2048).
        pad_token_id: the pattern's padding token (MusicGen: 2048).

    Returns:
        ``(inputs, labels, mask)``, each ``[B, K, T + K - 1]``: ``labels[:, k, k + t] = codes[:, k, t]``
        and padding elsewhere; ``inputs`` is ``labels`` shifted right by one with BOS in front;
        ``mask`` is True where the label is a real code (the positions that count).
    """
    from musicgen.lm import delayed_batch

    b, k, t = codes.shape
    dec_in, labels, mask = delayed_batch(codes, pad_id=pad_token_id)
    inputs = dec_in.reshape(b, k, t + k - 1).clone()
    inputs[..., 0] = bos_token_id
    return inputs, labels.masked_fill(~mask, pad_token_id), mask.contiguous()


def load_codes(path: str | Path) -> CodesDataset:
    """A ``CodesDataset`` folder, or a mini-world token file (``musicgen.lm.TokenDataset``, ``.safetensors``)."""
    path = Path(path)
    if path.is_file():
        from musicgen.lm import TokenDataset

        ds = TokenDataset.load(path)
        return CodesDataset(ds.codes, list(ds.captions))
    return CodesDataset.load(path)


def example_indices(step: int, *, global_batch: int, n: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step ``step``'s global batch (a fresh permutation every epoch)."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(i, n)
        out.append(int(_permutation(n, seed, epoch)[pos]))
    return out


_PERMS: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERMS:
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return _PERMS[key]


def condition_dropout(step: int, *, global_batch: int, p: float, seed: int) -> torch.Tensor:
    """Bool ``[global_batch]``: which clips of step ``step`` lose their text condition."""
    g = torch.Generator().manual_seed(seed * 104729 + 1 + step)
    return torch.rand(global_batch, generator=g) < p


# --------------------------------------------------------------------------------------------------
# MusicGen adapter: frozen text encoder, teacher-forced decoder logits
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text-encoder states with dropped conditions made null the way generation does it."""
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = (~drop).to(hidden.dtype)
    return hidden * keep[:, None, None], attention_mask * (~drop).to(attention_mask.dtype)[:, None]


def decoder_logits(model, inputs: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``[B, K, S, V]`` of a ``MusicgenForConditionalGeneration`` (or its DDP wrapper)."""
    b, k, s = inputs.shape
    out = model(
        attention_mask=attention_mask,
        encoder_outputs=(hidden,),
        decoder_input_ids=inputs.reshape(b * k, s),
        use_cache=False,
    )
    return out.logits.reshape(b, k, s, -1)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the decoder (and the text-to-decoder projection); return what trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, p in model.named_parameters():
        if name.startswith("decoder.") or name.startswith("enc_to_dec_proj."):
            p.requires_grad_(True)
            names.append((name, p))
    return names


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over masked-in positions, computed in fp32."""
    v = logits.shape[-1]
    target = labels.masked_fill(~mask, -100).reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, v).float(), target, ignore_index=-100, reduction="sum")
    return total / mask.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _atomic_path:
    """Context manager: yields a temp path next to ``target``; renames it over ``target`` on success."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_UMASK)
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.target)
            _fsync_dir(self.target.parent)
        else:
            self.tmp.unlink(missing_ok=True)


def _atomic_write_text(target: Path, text: str) -> None:
    with _atomic_path(target) as tmp:
        tmp.write_text(text)


def save_checkpoint(folder: Path, *, step: int, params: list[tuple[str, torch.nn.Parameter]],
                    optimizer: torch.optim.Optimizer, state: dict, keep: int) -> Path:
    """Write ``folder/step-N`` (weights, AdamW state, JSON state) atomically, then point ``latest.json`` at it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step:08d}.", suffix=".tmp"))
    save_file({n: p.detach().contiguous().cpu() for n, p in params}, str(tmp / "weights.safetensors"))
    opt = optimizer.state_dict()
    tensors, meta = {}, {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                meta[f"{idx}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups, "optimizer_meta": meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(tmp, 0o777 & ~_UMASK)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    _atomic_write_text(folder / "latest.json", json.dumps({"step": step, "path": final.name}))
    done = sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, *, params: list[tuple[str, torch.nn.Parameter]],
                    optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore the checkpoint ``latest.json`` names (weights and AdamW state); its JSON state, or None."""
    from safetensors.torch import load_file

    latest = folder / "latest.json"
    if not latest.exists():
        return None
    path = folder / json.loads(latest.read_text())["path"]
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    names = [n for n, _ in params]
    if sorted(weights) != sorted(names):
        raise DistillError(f"checkpoint {path} holds weights {len(weights)} tensors that do not match the model's "
                           f"{len(names)} trainable ones; resume with the same student, or use a fresh --out")
    with torch.no_grad():
        for n, p in params:
            p.copy_(weights[n])
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    for key, value in state["optimizer_meta"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    d = _dist()
    if d is not None:
        d.all_reduce(x, op=d.ReduceOp.SUM)
    return x


def _barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _stage_name(kd, step: int) -> str:
    """What the loss leans on at ``step``: the component with the largest weight."""
    weights = kd.weights_at(step)
    return max(weights, key=weights.get)


def _build_kd(config: DistillConfig):
    from kdq.losses import StageMixedKL

    kwargs = dict(config.kd)
    kwargs.setdefault("total_steps", config.steps)
    return StageMixedKL(**kwargs)


def _time_bf16(step_fn, device: torch.device) -> bool:
    """Time one step-sized forward+backward with and without bf16 autocast (alternating); True if faster."""
    times = {False: [], True: []}
    for _ in range(2):
        for use in (False, True):
            t0 = time.perf_counter()
            step_fn(use)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[use].append(time.perf_counter() - t0)
    return min(times[True]) < 0.95 * min(times[False])


def distill(student, teacher, data: CodesDataset, tokenizer, config: DistillConfig, out: str | Path, *,
            device: str | torch.device = "cpu", progress: bool = True, throttle: float = 0.0) -> dict:
    """Train ``student``'s decoder on ``data`` against ``teacher`` (``mode="kd"``) or the codes (``"ce"``).

    Resumes from ``out/checkpoints`` when a checkpoint is there. Under ``torch.distributed`` (DDP)
    each process takes its share of every global batch. Writes ``out/curve.jsonl`` (one line per
    optimizer step: loss, lr, temperature, stage, components), ``out/model/`` (the student,
    ``save_pretrained``) and ``out/summary.json`` (rank 0).

    Args:
        student: a ``MusicgenForConditionalGeneration``; trained in place (decoder only).
        teacher: the teacher model for ``mode="kd"`` (ignored, may be None, for ``"ce"``).
        data: the training clips.
        tokenizer: tokenizes the captions for both text encoders.
        config: the run's settings.
        out: output folder.
        device: where to train.
        progress: show a tqdm bar (rank 0).
        throttle: seconds to sleep after each optimizer step (tests use it to kill a run mid-way).

    Returns:
        The summary dict (also written to ``out/summary.json``).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    device = torch.device(device)
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    if config.mode == "kd" and teacher is None:
        raise bad_value(DistillError, "teacher", None, "a teacher model for mode='kd'", "pass one or use mode='ce'")
    global_batch = config.micro_batch * config.grad_accum * world
    if len(data) < 1:
        raise bad_value(DistillError, "data", len(data), "at least one clip")
    dec = student.config.decoder
    bos, pad = dec.bos_token_id, dec.pad_token_id
    if data.codes.shape[1] != dec.num_codebooks:
        raise bad_value(DistillError, "data codebooks", data.codes.shape[1], f"the student's {dec.num_codebooks}")

    student.to(device)
    params = trainable_parameters(student)
    student.train()
    student.text_encoder.eval()
    student.audio_encoder.eval()
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    kd = _build_kd(config) if config.mode == "kd" else None

    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas, eps=1e-8,
    )
    model = student
    if d is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)

    ckpt_dir = out / "checkpoints"
    start = 0
    bf16 = {"on": True, "off": False}.get(config.bf16)
    state = load_checkpoint(ckpt_dir, params=params, optimizer=optimizer)
    if state is not None:
        saved = DistillConfig.from_dict(state["config"])
        ignore = {"checkpoint_every", "keep_checkpoints", "log_every", "bf16"}
        changed = {k for k, v in config.to_dict().items() if k not in ignore and saved.to_dict()[k] != v}
        finished = state["step"] >= config.steps  # a finished run may be reopened by any number of processes
        if changed or (state["global_batch"] != global_batch and not finished):
            raise DistillError(f"{ckpt_dir} holds a run with different settings ({sorted(changed) or 'global batch'}); "
                               "resume with the same settings, or use a fresh --out")
        start, bf16 = state["step"], state["bf16"]

    def micro_batches(step: int):
        idx = example_indices(step, global_batch=global_batch, n=len(data), seed=config.seed)
        drop = condition_dropout(step, global_batch=global_batch, p=config.cfg_dropout, seed=config.seed)
        for a in range(config.grad_accum):
            lo = (a * world + rank) * config.micro_batch
            sel = idx[lo : lo + config.micro_batch]
            codes = data.codes[sel].to(device)
            tok = tokenizer([data.texts[i] for i in sel], return_tensors="pt", padding=True)
            yield codes, tok["input_ids"].to(device), tok["attention_mask"].to(device), drop[lo : lo + config.micro_batch].to(device)

    def loss_of(step: int, codes, ids, attn, drop, use_bf16: bool):
        inputs, labels, mask = delay_pattern(codes, bos_token_id=bos, pad_token_id=pad)
        with _autocast(use_bf16, device):
            hs, am = encode_text(student, ids, attn, drop=drop)
            s_logits = decoder_logits(model, inputs, hs, am)
            if kd is None:
                return masked_ce(s_logits, labels, mask), s_logits, None, labels, mask
            with torch.no_grad():
                ht, at = encode_text(teacher, ids, attn, drop=drop)
                t_logits = decoder_logits(teacher, inputs, ht, at)
        loss = kd(s_logits, t_logits, step=step, mask=mask, labels=labels.masked_fill(~mask, -100))
        if config.ce_weight > 0:
            loss = loss + config.ce_weight * masked_ce(s_logits, labels, mask)
        return loss, s_logits, t_logits, labels, mask

    if bf16 is None:  # "auto": measure on this machine, on the first batch, then decide once
        first = next(iter(micro_batches(start)))

        def trial(use: bool) -> None:
            with model.no_sync() if d is not None else nullcontext():
                loss_of(start, *first, use)[0].backward()
            optimizer.zero_grad(set_to_none=True)

        faster = _time_bf16(trial, device)
        flag = torch.tensor([1.0 if faster else 0.0])
        bf16 = bool(_all_reduce_sum(flag).item() >= world)  # on only if faster everywhere

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    curve_path = out / "curve.jsonl"
    if rank == 0 and curve_path.exists():  # drop lines written after the checkpoint we resume from
        kept = [ln for ln in curve_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < start]
        _atomic_write_text(curve_path, "".join(ln + "\n" for ln in kept))
    curve = open(curve_path, "a") if rank == 0 else None

    run_state = {"config": config.to_dict(), "global_batch": global_batch, "world_size": world, "bf16": bf16,
                 "torch": torch.__version__}
    bar = tqdm(total=config.steps, initial=start, disable=(rank != 0 or not progress), desc=f"distill[{config.mode}]",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    tokens = 0
    for step in range(start, config.steps):
        torch.manual_seed(config.seed * 1_000_003 + step * 1009 + rank)
        batches = list(micro_batches(step))
        counts = [float(delay_pattern(c, bos_token_id=bos, pad_token_id=pad)[2].sum()) for c, *_ in batches]
        n_global = float(_all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64)).item())
        loss_sum = torch.zeros((), dtype=torch.float64)
        parts = None
        for a, (mb, n_mb) in enumerate(zip(batches, counts)):
            last = a == len(batches) - 1
            sync = nullcontext() if (d is None or last) else model.no_sync()
            with sync:
                loss, s_logits, t_logits, labels, mask = loss_of(step, *mb, bf16)
                (loss * (n_mb * world / n_global)).backward()
            loss_sum += float(loss.detach()) * n_mb
            tokens += int(mask.sum())
            if last and rank == 0 and kd is not None and (step % config.log_every == 0 or step == config.steps - 1):
                with torch.no_grad():
                    parts = kd.components(s_logits.detach(), t_logits, step=step, mask=mask,
                                          labels=labels.masked_fill(~mask, -100))
        loss_value = float(_all_reduce_sum(loss_sum).item() / n_global)
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = None
        if config.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if rank == 0:
            entry = {"step": step, "loss": loss_value, "lr": lr, "mode": config.mode, "grad_norm": grad_norm,
                     "time_s": round(time.perf_counter() - t_start, 4)}
            if kd is not None:
                entry["temperature"] = float(kd.temperature_at(step))
                entry["stage"] = _stage_name(kd, step)
                if parts is not None:
                    entry["components"] = {n: {"weight": float(w), "value": float(v)} for n, (w, v) in parts.items()}
            curve.write(json.dumps(entry) + "\n")
            curve.flush()
            post = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}"}
            if kd is not None:
                post.update(T=f"{entry['temperature']:.2f}", stage=entry["stage"])
            bar.set_postfix(post)
            bar.update(1)
        if done % config.checkpoint_every == 0 or done == config.steps:
            if rank == 0:
                save_checkpoint(ckpt_dir, step=done, params=params, optimizer=optimizer, state=run_state,
                                keep=config.keep_checkpoints)
            _barrier()
        if throttle:
            time.sleep(throttle)
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"mode": config.mode, "steps": config.steps, "resumed_from": start, "world_size": world,
               "global_batch": global_batch, "bf16": bf16, "wall_s": round(elapsed, 3),
               "tokens_per_s": round(tokens * world / elapsed, 1) if elapsed > 0 and tokens else None,
               "config": config.to_dict()}
    if curve is not None:
        curve.close()
    if rank == 0:
        student.save_pretrained(out / "model")
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    _barrier()
    return summary


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def load_musicgen(path: str | Path):
    """``MusicgenForConditionalGeneration.from_pretrained`` of a local folder (or hub id) in eval mode."""
    from transformers import MusicgenForConditionalGeneration

    return MusicgenForConditionalGeneration.from_pretrained(str(path)).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Distil a MusicGen teacher into a student (StageMixedKL), or fine-tune with CE.")
    p.add_argument("--student", required=True, help="student model folder (or hub id)")
    p.add_argument("--teacher", help="teacher model folder (or hub id); required for --mode kd")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the student's)")
    p.add_argument("--data", required=True, help="CodesDataset folder (codes.safetensors + texts.json) or a mini-world "
                   "token file (musicgen.lm.TokenDataset .safetensors)")
    p.add_argument("--out", required=True, help="output folder (resumes from its checkpoints)")
    p.add_argument("--config", help="JSON file with DistillConfig fields; flags below override it")
    for f in fields(DistillConfig):
        if f.name in ("kd", "betas"):
            continue
        kind = type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f"DistillConfig.{f.name}")
    p.add_argument("--kd", help="JSON object of StageMixedKL keyword arguments")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


@flush_denormals
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = json.loads(Path(args.config).read_text()) if args.config else {}
    for f in fields(DistillConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("kd", "betas"):
            cfg[f.name] = value
    if args.kd:
        cfg["kd"] = json.loads(args.kd)
    config = DistillConfig.from_dict(cfg)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        from transformers import AutoTokenizer

        student = load_musicgen(args.student)
        teacher = load_musicgen(args.teacher) if config.mode == "kd" else None
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.student)
        summary = distill(student, teacher, load_codes(args.data), tokenizer, config, args.out,
                          device=device, progress=not args.no_progress, throttle=args.throttle)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
