"""The one training loop of the example: codec, text encoder, teacher, student_base and distillation.

``train(model, objective, cfg, out)`` runs ``cfg.steps`` optimizer steps. What is trained and how
the loss is computed is the *objective*'s business (``musicgen.train.objectives``); the loop owns
everything else, once:

- **Batches.** Step ``s`` takes ``micro_batch x grad_accum x world_size`` example indices from a
  fresh permutation of the dataset every epoch (seeded by ``(seed, epoch)``); each example of the
  global batch gets its own generator seeded by ``(seed, step, its slot in the global batch)`` for
  its random choices (crops, gains, condition dropout), so the choices do not depend on how the
  batch is split into micro-batches and processes; torch's global RNG is reseeded every step.
  Nothing random depends on history, so a resumed run takes exactly the steps an uninterrupted one takes.
- **One loss whatever the split.** The objective returns each micro-batch's mean loss and how many
  items it averages (tokens, clips); the loop weights each micro-batch by its share of the global
  batch's items before ``backward``, so one process with batch B, two accumulated micro-batches of
  B/2 and two DDP processes of B/2 take the same step (tested).
- **Optimizer.** AdamW (decoupled weight decay on matrices only), the learning rate from
  ``kdq.schedules``: linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio x lr``;
  gradient clipping; optional bf16 autocast (``"auto"`` times both on the first batch).
- **Checkpoints** (``musicgen.train.checkpoint``): atomic and checksummed every ``checkpoint_every``
  steps and at the end; the run resumes from the newest intact one and refuses one made with
  different settings. ``curve.jsonl`` has one line per step (loss, lr, gradient norm, the objective's
  scalars; costly ones every ``log_every`` steps) and is trimmed to the checkpoint on resume.
- **DDP** under ``torch.distributed`` (gloo on CPU, NCCL on GPUs); rank 0 writes.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from kdq._io import atomic_write_text
from kdq.errors import KdqError
from kdq.schedules import Constant, Cosine, Linear, Schedule, Staged
from musicgen.config import TrainConfig, key_of
from musicgen.train.checkpoint import load_checkpoint, save_checkpoint


class TrainError(KdqError):
    """A run that cannot start or resume."""


class Objective:
    """What the loop needs from an objective; the defaults suit a model trained whole (``musicgen.train.objectives``).

    Subclasses implement ``__len__`` (examples in the dataset) and ``loss`` (a micro-batch's mean
    loss and a dict of scalars for the curve), and override the rest where they differ.
    """

    name = "objective"

    def __len__(self) -> int:
        raise NotImplementedError

    def loss(self, model, indices: list[int], *, step: int, rngs: list[torch.Generator],
             log: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mean loss of the examples ``indices`` (``rngs``: one generator each); ``log``: add costly scalars."""
        raise NotImplementedError

    def parameters(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        """What trains (default: every parameter that requires a gradient)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def extra_state(self, model) -> dict[str, torch.Tensor]:
        """Buffers the run updates, checkpointed with the parameters (default: none)."""
        return {}

    def settings(self) -> dict:
        """What a resumed run must share with the one it resumes (JSON data)."""
        return {}

    def count(self, indices: list[int]) -> float:
        """How many items a micro-batch's mean loss averages (default: its examples)."""
        return float(len(indices))

    def train_mode(self, model) -> None:
        """Put the model in training mode (frozen parts may stay in eval mode)."""
        model.train()

    def before_step(self, model, step: int) -> None:
        """Called before step ``step`` (default: nothing)."""


def lr_schedule(cfg: TrainConfig) -> Schedule:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr``, then cosine decay to ``min_lr_ratio x lr``."""
    floor = cfg.lr * cfg.min_lr_ratio
    decay = Cosine(cfg.lr, floor, max(cfg.steps - cfg.warmup_steps, 1), begin=cfg.warmup_steps) \
        if cfg.steps > cfg.warmup_steps else Constant(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    if cfg.warmup_steps == 1:
        warm: Schedule = Constant(cfg.lr)
    else:
        warm = Linear(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps - 1)
    return Staged((warm, decay), boundaries=(cfg.warmup_steps,), transition="step")


def example_indices(step: int, *, global_batch: int, n: int, seed: int) -> list[int]:
    """Dataset indices of step ``step``'s global batch: a fresh permutation every epoch."""
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


def generator(seed: int, *parts: int) -> torch.Generator:
    """A generator seeded by ``(seed, *parts)``: the loop's only source of randomness."""
    value = seed
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


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


def _optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.ndim >= 2]
    flat = [p for _, p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": flat, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)


def _bf16_faster(step_fn) -> bool:
    """Time a step with and without bf16 autocast (alternating, twice); True if bf16 is 5% faster."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for use in (False, True):
            t0 = time.perf_counter()
            step_fn(use)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[use].append(time.perf_counter() - t0)
    return min(times[True]) < 0.95 * min(times[False])


def train(model, objective: Objective, cfg: TrainConfig, out: str | Path, *, device: str | torch.device = "cpu",
          progress: bool = True, throttle: float = 0.0, max_seconds: float | None = None) -> dict:
    """Train ``model`` with ``objective`` (see the module docstring); return the run's summary.

    Writes ``out/checkpoints/``, ``out/curve.jsonl`` and ``out/summary.json`` (rank 0). The caller
    saves the trained model. ``throttle`` sleeps after each step and ``max_seconds`` stops after a
    checkpoint once exceeded (both for tests of interruption and resume).
    """
    from tqdm.auto import tqdm

    out, device = Path(out), torch.device(device)
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    if len(objective) < 1:
        raise TrainError(f"{objective.name}: the dataset is empty")
    params = objective.parameters(model)
    if not params:
        raise TrainError(f"{objective.name}: nothing to train (no parameter requires a gradient)")
    saved = {**{f"param.{n}": p for n, p in params}, **{f"buffer.{n}": b for n, b in objective.extra_state(model).items()}}
    optimizer = _optimizer(params, cfg)
    wrapped = model
    if d is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    settings = json.loads(json.dumps({"train": key_of(cfg), "objective": objective.settings()}))
    state = load_checkpoint(out / "checkpoints", tensors=saved, optimizer=optimizer)
    start, bf16 = 0, {"on": True, "off": False}.get(cfg.bf16)
    if state is not None:
        finished = state["step"] >= cfg.steps  # a finished run may be reopened by any number of processes
        if state["settings"] != settings or (state["global_batch"] != global_batch and not finished):
            changed = sorted(k for k in settings["train"] if state["settings"]["train"].get(k) != settings["train"][k])
            raise TrainError(f"{out / 'checkpoints'} holds a run with other settings ({changed or 'objective or global batch'}); "
                             "resume with the same settings, or start in a fresh folder")
        start, bf16 = state["step"], state["bf16"]
    schedule = lr_schedule(cfg)

    def micro_batches(step: int) -> list[tuple[list[int], list[torch.Generator]]]:
        """(dataset indices, one generator per example) of each of this process's micro-batches."""
        idx = example_indices(step, global_batch=global_batch, n=len(objective), seed=cfg.seed)
        out = []
        for a in range(cfg.grad_accum):
            slots = range((a * world + rank) * cfg.micro_batch, (a * world + rank + 1) * cfg.micro_batch)
            out.append(([idx[i] for i in slots], [generator(cfg.seed, step, i) for i in slots]))
        return out

    def autocast(use: bool):
        return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()

    if bf16 is None:  # "auto": measure here, on the first batch, then decide once (stored in checkpoints)
        first, rngs = micro_batches(start)[0]

        def trial(use: bool) -> None:
            with autocast(use), (wrapped.no_sync() if d is not None else nullcontext()):
                objective.loss(wrapped, first, step=start, rngs=rngs, log=False)[0].backward()
            optimizer.zero_grad(set_to_none=True)

        flag = torch.tensor([1.0 if _bf16_faster(trial) else 0.0])
        bf16 = bool(_all_reduce_sum(flag).item() >= world)  # on only if faster everywhere

    curve_path = out / "curve.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if curve_path.exists():  # drop lines written after the checkpoint we resume from
            kept = [ln for ln in curve_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < start]
            atomic_write_text(curve_path, "".join(ln + "\n" for ln in kept))
    _barrier()
    curve = open(curve_path, "a") if rank == 0 else None  # noqa: SIM115 - closed below
    run_state = {"settings": settings, "global_batch": global_batch, "world_size": world, "bf16": bf16,
                 "torch": torch.__version__}
    objective.train_mode(model)
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0 or not progress, desc=objective.name, dynamic_ncols=True)
    t_start, items, done, loss_value = time.perf_counter(), 0.0, start, float("nan")
    for step in range(start, cfg.steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        objective.before_step(model, step)
        batches = micro_batches(step)
        counts = [float(objective.count(b)) for b, _ in batches]
        n_global = float(_all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64)).item())
        log = rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1)
        loss_sum, scalars = torch.zeros((), dtype=torch.float64), {}
        for a, ((indices, rngs), n_mb) in enumerate(zip(batches, counts)):
            last = a == len(batches) - 1
            with (nullcontext() if d is None or last else wrapped.no_sync()), autocast(bf16):
                loss, scalars_a = objective.loss(wrapped, indices, step=step, rngs=rngs, log=log and last)
            (loss * (n_mb * world / n_global)).backward()
            loss_sum += float(loss.detach()) * n_mb
            scalars = scalars_a or scalars
        items += sum(counts)
        loss_value = float(_all_reduce_sum(loss_sum).item() / n_global)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if rank == 0:
            entry = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "time_s": round(time.perf_counter() - t_start, 4), **scalars}
            curve.write(json.dumps(entry) + "\n")
            curve.flush()
            bar.set_postfix({"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}",
                             **{k: v for k, v in scalars.items() if isinstance(v, str)}})
            bar.update(1)
        early = max_seconds is not None and time.perf_counter() - t_start > max_seconds and done < cfg.steps
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or early:
            if rank == 0:
                save_checkpoint(out / "checkpoints", step=done, tensors=saved, optimizer=optimizer, state=run_state,
                                keep=cfg.keep_checkpoints)
            _barrier()
        if early:
            break
        if throttle:
            time.sleep(throttle)
    bar.close()
    if curve is not None:
        curve.close()
    model.eval()
    elapsed = time.perf_counter() - t_start
    summary = {"objective": objective.name, "steps": cfg.steps, "steps_done": done, "resumed_from": start,
               "world_size": world, "global_batch": global_batch, "bf16": bf16, "wall_s": round(elapsed, 3),
               "items_per_s": round(items * world / elapsed, 1) if elapsed > 0 and items else None,
               "final_loss": loss_value if done > start else None, "stopped_early": done < cfg.steps}
    if rank == 0:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    _barrier()
    return summary


def read_curve(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a ``curve.jsonl`` (empty when absent)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
