"""kdq.distributed: an FSDP2-sharded teacher gives the unsharded teacher's logits, loss and training.

Two CPU processes (gloo) run this file as a script (``_worker``): each shards the same tiny
teacher, computes its logits and a ``StageMixedKL`` loss on its half of the global batch, trains a
DDP student for a few steps, and measures the teacher's parameter bytes at rest and during forward.
The test process compares all of it with a single unsharded process. Run with ``-s`` to see the
measured bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdq.distributed import (
    ShardingError,
    local_parameter_bytes,
    prepare_teacher,
    shard_teacher,
    teacher_blocks,
    teacher_logits,
)
from kdq.losses import StageMixedKL

WORLD = 2
VOCAB, SEQ, BATCH, STEPS, LR = 37, 9, 4, 4, 0.5  # BATCH is the global batch; odd sizes shard unevenly
TOL = 1e-5
TIMEOUT_S = 120


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """Embedding, ``n`` residual MLP blocks with a causal running mean, head: ``[B, T] -> [B, T, V]``."""

    def __init__(self, d: int, h: int, n: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return manual_forward(self, ids)


def manual_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The forward written against sub-modules, the way the MusicGen example reads its teacher."""
    x = model.embed(ids)
    steps = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype)[:, None]
    for block in model.blocks:
        x = block(x.cumsum(1) / steps)
    return model.head(model.norm(x))


def make_teacher() -> TinyLM:
    return TinyLM(30, 61, 4, seed=0)


def make_student() -> TinyLM:
    return TinyLM(16, 24, 2, seed=1)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def rank_slice(x: torch.Tensor, rank: int) -> torch.Tensor:
    per = x.shape[0] // WORLD
    return x[rank * per:(rank + 1) * per]


def train_student(teacher: nn.Module, student: nn.Module, rank: int | None) -> tuple[list[float], nn.Module]:
    """``STEPS`` SGD steps of ``student`` on StageMixedKL; ``rank`` None: the whole global batch."""
    kd = StageMixedKL(STEPS)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step in range(STEPS):
        ids = batch(step) if rank is None else rank_slice(batch(step), rank)
        loss = kd(student(ids), teacher_logits(teacher, ids), step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, student


# ------------------------------------------------------------------------------- the worker
def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['KDQ_TEST_PORT']}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    res: dict = {"rank": rank}
    teacher = make_teacher()
    res["full_bytes"] = local_parameter_bytes(teacher)
    errors = {}
    for label, kwargs in {"mesh": {"mesh": "cpu"}, "modules": {"modules": ["blocks.7"]}}.items():
        try:
            shard_teacher(make_teacher(), **kwargs)
        except ShardingError as exc:
            errors[label] = str(exc)
    teacher = prepare_teacher(teacher, shard=True)
    try:
        shard_teacher(teacher)
    except ShardingError as exc:
        errors["twice"] = str(exc)
    res["errors"] = errors
    res["rest_bytes"] = local_parameter_bytes(teacher)
    res["all_dtensor"] = all(isinstance(p, DTensor) for p in teacher.parameters())
    res["requires_grad"] = any(p.requires_grad for p in teacher.parameters())
    res["training"] = teacher.training

    # Parameter bytes alive during forward: the shards (always held) plus whatever is gathered.
    peak = [0]

    def measure(*_):
        gathered = sum(p.numel() * p.element_size() for p in teacher.parameters() if not isinstance(p, DTensor))
        peak[0] = max(peak[0], res["rest_bytes"] + gathered)

    handles = [m.register_forward_pre_hook(measure) for m in teacher.modules()]
    handles += [m.register_forward_hook(measure) for m in teacher.modules() if not list(m.children())]
    gathers = [0]
    all_gather = dist.all_gather_single

    def counting(*args, **kwargs):
        gathers[0] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather_single = counting
    ids = rank_slice(batch(0), rank)
    logits = teacher_logits(teacher, ids)
    res["gathers_per_forward"] = gathers[0]
    dist.all_gather_single = all_gather
    logits_call = teacher_logits(teacher, ids, call=manual_forward)
    for h in handles:
        h.remove()
    res["peak_bytes"] = peak[0]
    res["rest_bytes_after"] = local_parameter_bytes(teacher)
    res["loss0"] = float(StageMixedKL(STEPS)(make_student()(ids), logits, step=0).detach())

    student = DistributedDataParallel(make_student())
    res["losses"], _ = train_student(teacher, student, rank)
    try:  # a sub-module called outside teacher_logits(call=...) still holds shards
        teacher.head(torch.zeros(1, 30))
        res["direct_call"] = "no error"
    except Exception as exc:  # noqa: BLE001 - recorded for the test to check
        res["direct_call"] = f"{type(exc).__name__}: {exc}"[:300]
    torch.save({"logits": logits, "logits_call": logits_call, "student": student.module.state_dict()},
               out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    root = str(Path(__file__).resolve().parents[1])  # kdq importable in the workers, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "KDQ_TEST_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n" + "\n".join(logs)
    return [(json.loads((out / f"rank{r}.json").read_text()), torch.load(out / f"rank{r}.pt"))
            for r in range(WORLD)]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------- the tests
def test_logits_and_loss_match_unsharded(ranks):
    teacher = prepare_teacher(make_teacher())
    for rank, (res, tensors) in enumerate(ranks):
        ids = rank_slice(batch(0), rank)
        ref = teacher(ids)
        d = _maxdiff(tensors["logits"], ref)
        d_call = _maxdiff(tensors["logits_call"], ref)
        ref_loss = float(StageMixedKL(STEPS)(make_student()(ids), ref, step=0).detach())
        print(f"rank {rank}: logits max |diff| {d:.2e} (forward), {d_call:.2e} (call=); "
              f"loss {res['loss0']:.8f} vs {ref_loss:.8f}")
        assert d <= TOL and d_call <= TOL
        assert abs(res["loss0"] - ref_loss) <= TOL


def test_student_trained_against_sharded_teacher_matches_single_process(ranks):
    init = make_student().state_dict()
    losses, student = train_student(prepare_teacher(make_teacher()), make_student(), None)
    ref = student.state_dict()
    assert max(_maxdiff(ref[k], init[k]) for k in ref) > 1e-2  # the student did move
    for rank, (res, tensors) in enumerate(ranks):
        d = max(_maxdiff(tensors["student"][k], ref[k]) for k in ref)
        print(f"rank {rank}: student weights after {STEPS} steps, max |diff| {d:.2e}")
        assert d <= TOL
    # DDP averages the ranks' gradients: the global loss is the mean of the ranks' losses.
    mean = [sum(r[0]["losses"][s] for r in ranks) / WORLD for s in range(STEPS)]
    assert max(abs(a - b) for a, b in zip(mean, losses)) <= TOL


def test_each_rank_holds_half_the_teacher(ranks):
    t = make_teacher()
    blocks = teacher_blocks(t)
    block_bytes = max(local_parameter_bytes(t.get_submodule(b)) for b in blocks)
    root_bytes = local_parameter_bytes(t) - sum(local_parameter_bytes(t.get_submodule(b)) for b in blocks)
    for rank, (res, _) in enumerate(ranks):
        full, rest, peak = res["full_bytes"], res["rest_bytes"], res["peak_bytes"]
        print(f"rank {rank}: teacher parameters {full} B unsharded, {rest} B at rest ({rest / full:.3f}), "
              f"{peak} B peak during forward ({peak / full:.3f}); {res['gathers_per_forward']} all-gathers "
              f"per forward")
        assert 0.45 <= rest / full <= 0.55
        assert res["rest_bytes_after"] == rest  # everything freed after the forward
        assert peak - rest == root_bytes + block_bytes  # the root and one block gathered, never more
        assert res["gathers_per_forward"] == len(blocks) + 1  # each block, and the root
        assert res["all_dtensor"] and not res["requires_grad"] and not res["training"]
    assert sum(r[0]["rest_bytes"] for r in ranks) == ranks[0][0]["full_bytes"]  # shards tile the teacher


def test_errors_inside_a_process_group(ranks):
    for res, _ in ranks:
        err = res["errors"]
        assert "mesh='cpu'" in err["mesh"] and "DeviceMesh" in err["mesh"]
        assert "modules='blocks.7'" in err["modules"] and "named_modules" in err["modules"]
        assert "already" in err["twice"]
        print(f"rank {res['rank']}: sub-module called outside call=: {res['direct_call'][:120]}")
        assert "DTensor" in res["direct_call"], res["direct_call"]


# --------------------------------------------------------------------- single-process checks
def test_no_process_group_is_a_clear_error():
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(ShardingError, match=r"torch.distributed.is_initialized\(\)=False.*init_process_group"):
        shard_teacher(make_teacher())
    with pytest.raises(ShardingError, match="init_process_group"):
        prepare_teacher(make_teacher(), shard=True)


def test_block_selection():
    t = make_teacher()
    default = [f"blocks.{i}" for i in range(4)]
    assert teacher_blocks(t) == default
    assert teacher_blocks(t, Block) == teacher_blocks(t, "blocks") == teacher_blocks(t, [Block, "blocks.0"]) == default
    assert teacher_blocks(t, ["blocks.2", "head"]) == ["blocks.2", "head"]
    plain = prepare_teacher(make_teacher())
    assert not plain.training and not any(p.requires_grad for p in plain.parameters())
    ids = batch(0)
    assert torch.equal(teacher_logits(plain, ids), teacher_logits(plain, ids, call=manual_forward))


@pytest.mark.parametrize("modules, pattern", [
    (["blokcs"], r"modules='blokcs'.*did you mean 'blocks'"),
    ("blocks.9", r"modules='blocks.9'.*named_modules\(\).*did you mean"),
    ("", r"root is always sharded"),
    (nn.Conv1d, r"modules='Conv1d'.*classes are \['Block', 'Embedding', 'LayerNorm', 'Linear', 'ModuleList'\]"),
    ([], r"modules=\[\] is not allowed"),
    ([3], r"modules item=3 is not allowed: a module name"),
])
def test_bad_modules_name_the_argument(modules, pattern):
    with pytest.raises(ShardingError, match=pattern):
        teacher_blocks(make_teacher(), modules)
    with pytest.raises(ShardingError, match=pattern):  # caught before any process group is needed
        prepare_teacher(make_teacher(), shard=False, modules=modules)


def test_other_bad_input():
    with pytest.raises(ShardingError, match=r"has no nn.ModuleList.*modules=\[BlockClass\]"):
        teacher_blocks(nn.Linear(3, 3))
    with pytest.raises(ShardingError, match="teacher='str' is not allowed"):
        teacher_blocks("model")
    with pytest.raises(ShardingError, match="shard='yes'"):
        prepare_teacher(make_teacher(), shard="yes")
    with pytest.raises(ShardingError, match="call='str'"):
        teacher_logits(make_teacher(), batch(0), call="forward")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
