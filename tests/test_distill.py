"""The training loop and the distillation trainer: delay pattern, schedule, data order, loss accounting,
the one cross-entropy, exact resume, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from musicgen.config import ConfigError, DistillConfig, TrainConfig
from musicgen.data.tokens import TokenDataset, delay_pattern
from musicgen.distill import run_distill
from musicgen.models.tiny import build_tiny_musicgen, build_word_tokenizer, save_tiny_musicgen
from musicgen.train.loop import TrainError, example_indices, generator, lr_schedule
from musicgen.train.objectives import LMObjective, codebook_ce, decoder_logits, encode_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "musicgen" / "distill.py"
TEACHER = dict(decoder_hidden=48, decoder_layers=2)
STUDENT = dict(decoder_hidden=32, decoder_layers=1)
CAPTIONS = ["slow piano chorale", "fast bright violin dance", "calm organ", "lively folk tune with flute"]


def _dataset(n: int = 16, t: int = 12, seed: int = 0) -> TokenDataset:
    g = torch.Generator().manual_seed(seed)
    return TokenDataset(torch.randint(0, 2048, (n, 4, t), generator=g), [CAPTIONS[i % 4] for i in range(n)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_world")
    save_tiny_musicgen(root / "teacher", seed=1, **TEACHER)
    save_tiny_musicgen(root / "student", seed=2, **STUDENT)
    _dataset().save(root / "data.safetensors")
    return root


def _distill(world: Path, out: Path, mode: str = "kd", data: TokenDataset | None = None, **train) -> dict:
    if data is not None:
        data.save(out.parent / f"{out.name}.safetensors")
    cfg = DistillConfig(train=TrainConfig(**{"steps": 2, "micro_batch": 4, "warmup_steps": 0, "min_lr_ratio": 0.1,
                                             "checkpoint_every": 100, **train}))
    return run_distill(mode, cfg, student=world / "student", teacher=world / "teacher" if mode == "kd" else None,
                       data=out.parent / f"{out.name}.safetensors" if data is not None else world / "data.safetensors",
                       out=out, progress=False)


def _cli(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--student", str(world / "student"), "--teacher", str(world / "teacher"),
            "--data", str(world / "data.safetensors"), "--out", str(out), "--no-progress", *extra]


def _set(**kw) -> list[str]:
    return ["--set", *(f"train.{k}={v}" for k, v in kw.items())]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'examples'}")
    env.pop("WORLD_SIZE", None)
    return env


# ---------------------------------------------------------------------------------------------- data


def test_delay_pattern_matches_transformers():
    model = build_tiny_musicgen(0, **STUDENT)
    codes = torch.randint(0, 2048, (2, 4, 7))
    inputs, labels, mask = delay_pattern(codes, bos=2048, pad=2048)
    assert inputs.shape == labels.shape == mask.shape == (2, 4, 10)
    # transformers' own pattern for a BOS prompt and max_length = T + K: -1 marks positions to predict
    bos = torch.full((2 * 4, 1), 2048)
    _, pattern = model.decoder.build_delay_pattern_mask(bos, pad_token_id=2048, max_length=7 + 4)
    pattern = pattern.reshape(2, 4, -1)
    assert torch.equal(pattern[..., 1:] == -1, mask)  # position j of labels is sequence position j + 1
    assert torch.equal(inputs[..., 0], torch.full((2, 4), 2048))
    assert torch.equal(inputs[..., 1:], labels[..., :-1])
    for k in range(4):
        assert torch.equal(labels[:, k, k : k + 7], codes[:, k])
        assert (labels[:, k][~mask[:, k]] == 2048).all()
    assert int(mask.sum()) == 2 * 4 * 7


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 13), gb=st.integers(1, 9), seed=st.integers(0, 5))
def test_every_clip_once_per_epoch(n, gb, seed):
    steps = math.ceil(3 * n / gb)
    seen = [i for s in range(steps) for i in example_indices(s, global_batch=gb, n=n, seed=seed)]
    for epoch in range(len(seen) // n):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert example_indices(2, global_batch=gb, n=n, seed=seed) == example_indices(2, global_batch=gb, n=n, seed=seed)


def test_condition_dropout_rate_and_determinism():
    model, idx = build_tiny_musicgen(0, **STUDENT), list(range(64))

    def drops(step: int, p: float = 0.2) -> torch.Tensor:
        rngs = [generator(3, step, i) for i in idx]
        return LMObjective(_dataset(64), None, cfg_dropout=p).batch(model, idx, rngs)[2]

    d = torch.stack([drops(s) for s in range(50)])
    assert abs(d.float().mean().item() - 0.2) < 0.03
    assert torch.equal(d[7], drops(7))
    assert not torch.equal(d[7], d[8])
    assert not drops(0, p=0.0).any()


def test_dropped_condition_is_generations_null_condition():
    model = build_tiny_musicgen(0, **STUDENT)
    tok = build_word_tokenizer()
    enc = tok(["slow piano chorale", "fast bright violin dance"], return_tensors="pt", padding=True)
    codes = torch.randint(0, 2048, (2, 4, 6))
    inputs, _, _ = delay_pattern(codes, bos=2048, pad=2048)
    with torch.no_grad():
        h, m = encode_text(model, enc["input_ids"], enc["attention_mask"], drop=torch.tensor([True, False]))
        logits = decoder_logits(model, inputs, h, m)
        # what generate() feeds its unconditional rows: zero hidden states, zero attention mask
        hz = torch.zeros_like(h[:1])
        null = decoder_logits(model, inputs[:1], hz, torch.zeros_like(enc["attention_mask"][:1]))
        h2, m2 = encode_text(model, enc["input_ids"], enc["attention_mask"], drop=torch.tensor([False, False]))
        cond = decoder_logits(model, inputs, h2, m2)
    assert torch.allclose(logits[0], null[0], atol=1e-6)
    assert torch.allclose(logits[1], cond[1], atol=1e-6)
    assert (logits[0] - cond[0]).abs().max() > 1e-3  # the condition really matters in this model


def test_codebook_ce_matches_transformers_loss():
    model = build_tiny_musicgen(0, **STUDENT)
    tok = build_word_tokenizer()
    enc = tok(["calm organ", "lively folk tune"], return_tensors="pt", padding=True)
    codes = torch.randint(0, 2048, (2, 4, 9))
    inputs, labels, mask = delay_pattern(codes, bos=2048, pad=2048)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    decoder_input_ids=inputs.reshape(8, -1), labels=labels.transpose(1, 2))
        ours = codebook_ce(out.logits.reshape(2, 4, 12, -1), labels, mask)
    # transformers averages per codebook, then over codebooks; every codebook has 2 x 9 labels here
    assert torch.allclose(ours, out.loss, atol=1e-5)


def test_ce_control_uses_the_pretraining_cross_entropy(world, tmp_path):
    """Regression (ablation confound): student_ce must be fine-tuned on the very loss student_base was
    pretrained with, the per-codebook mean, not a mean pooled over every position."""
    logits = torch.randn(2, 4, 6, 50)
    labels = torch.randint(0, 50, (2, 4, 6))
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[:, 0, 3:] = False  # codebooks with different numbers of targets: the two means differ
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none").view(2, 4, 6)
    per_codebook = torch.stack([ce[:, k][mask[:, k]].mean() for k in range(4)]).mean()
    pooled = ce[mask].mean()
    assert torch.allclose(codebook_ce(logits, labels, mask), per_codebook) and not torch.allclose(per_codebook, pooled)
    # the ce mode's first logged loss is codebook_ce of its first batch (no dropout, no warm-up effect)
    data = _dataset(4, t=6)
    s = _distill(world, tmp_path / "ce", mode="ce", data=data, steps=1)
    assert s["objective"] == "distill[ce]"
    from musicgen.models.musicgen import load_musicgen

    model, tok = load_musicgen(world / "student"), build_word_tokenizer()
    obj = LMObjective(data, tok, cfg_dropout=0.2)
    first = json.loads((tmp_path / "ce" / "curve.jsonl").read_text().splitlines()[0])
    idx = example_indices(0, global_batch=4, n=4, seed=0)
    with torch.no_grad():
        loss, _ = obj.loss(model, idx, step=0, rngs=[generator(0, 0, i) for i in range(4)], log=False)
    assert first["loss"] == pytest.approx(float(loss), rel=1e-5)


# -------------------------------------------------------------------------------------------- config


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    sched = lr_schedule(cfg)
    lrs = [sched(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert sched(100) == pytest.approx(1e-4)
    assert lr_schedule(TrainConfig(steps=10, warmup_steps=0, lr=1e-3))(0) == pytest.approx(1e-3)
    assert lr_schedule(TrainConfig(steps=10, warmup_steps=1, lr=1e-3))(0) == pytest.approx(1e-3)
    cfg = DistillConfig(train=cfg, kd={"alpha": 0.2})
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "kwargs, word",
    [({"steps": 0}, "steps"), ({"bf16": "yes"}, "bf16"), ({"warmup_steps": 500, "steps": 10}, "warmup_steps"),
     ({"lr": float("nan")}, "lr"), ({"betas": (0.9, 1.5)}, "betas")],
)
def test_bad_config_names_the_argument(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        TrainConfig(**kwargs)
    with pytest.raises(ConfigError, match="cfg_dropout"):
        DistillConfig(cfg_dropout=1.0)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        TrainConfig.from_dict({"step": 3})


def test_kd_needs_a_teacher(world, tmp_path):
    with pytest.raises(ConfigError, match="teacher"):
        run_distill("kd", DistillConfig(), student=world / "student", teacher=None, data=world / "data.safetensors",
                    out=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="mode"):
        run_distill("mse", DistillConfig(), student=world / "student", teacher=None, data=world / "data.safetensors",
                    out=tmp_path, progress=False)


# ----------------------------------------------------------------------------------------- training


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "model.safetensors"))


def _kl_to_teacher(student, teacher, data: TokenDataset, tok) -> float:
    from kdq.losses import forward_kl

    inputs, _, mask = delay_pattern(data.codes, bos=2048, pad=2048)
    enc = tok(data.captions, return_tensors="pt", padding=True)
    no = torch.zeros(len(data), dtype=torch.bool)
    with torch.no_grad():
        s = decoder_logits(student, inputs, *encode_text(student, enc["input_ids"], enc["attention_mask"], drop=no))
        t = decoder_logits(teacher, inputs, *encode_text(teacher, enc["input_ids"], enc["attention_mask"], drop=no))
    return float(forward_kl(s, t, mask=mask))


def _curve(folder: Path) -> list[dict]:
    return [json.loads(ln) for ln in (folder / "curve.jsonl").read_text().splitlines()]


def test_grad_accum_equals_one_big_batch_and_kd_learns(world, tmp_path):
    """Two micro-batches of 2 take the same step as one batch of 4; KL to the teacher goes down."""
    from musicgen.models.musicgen import load_musicgen

    data, tok = _dataset(8, t=8), build_word_tokenizer()
    teacher = load_musicgen(world / "teacher")
    kl_before = _kl_to_teacher(load_musicgen(world / "student"), teacher, data, tok)
    for name, mb, acc in (("big", 4, 1), ("acc", 2, 2)):
        summary = _distill(world, tmp_path / name, data=data, steps=6, micro_batch=mb, grad_accum=acc, warmup_steps=1, lr=5e-3)
        assert summary["global_batch"] == 4
    big, acc = _curve(tmp_path / "big"), _curve(tmp_path / "acc")
    assert [e["step"] for e in big] == list(range(6))
    for a, b in zip(big, acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    wa, wb = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    e = big[-1]
    assert {"temperature", "stage", "components", "lr", "grad_norm"} <= set(e)
    assert e["loss"] == pytest.approx(sum(c["weight"] * c["value"] for c in e["components"].values()), rel=1e-4)
    assert _kl_to_teacher(load_musicgen(tmp_path / "big" / "model"), teacher, data, tok) < 0.9 * kl_before


def test_ce_mode_needs_no_teacher_and_lowers_nll(world, tmp_path):
    data = _dataset(8, t=10)
    # a learnable signal: every clip repeats one code pattern
    data.codes[:] = torch.arange(10).repeat(8, 4, 1) * 37
    _distill(world, tmp_path / "ce", mode="ce", data=data, steps=15, warmup_steps=1, lr=1e-2)
    curve = _curve(tmp_path / "ce")
    assert "temperature" not in curve[0]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]


def test_resume_refuses_changed_settings_and_ignores_half_written_checkpoints(world, tmp_path):
    out = tmp_path / "run"
    _distill(world, out, steps=2, checkpoint_every=1)
    # a checkpoint folder that a killed process left half-written is never read
    junk = out / "checkpoints" / ".step-00000003.abc.tmp"
    junk.mkdir()
    (junk / "weights.safetensors").write_bytes(b"\0garbage")
    with pytest.raises(TrainError, match="other settings"):
        _distill(world, out, steps=2, checkpoint_every=1, lr=5e-3)
    with pytest.raises(TrainError, match="other settings"):
        _distill(world, out, steps=3, checkpoint_every=1)
    s = _distill(world, out, steps=2, checkpoint_every=1)
    assert s["resumed_from"] == 2
    assert not junk.exists() or json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_exact(world, tmp_path):
    """A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""
    args = _set(steps=8, micro_batch=4, warmup_steps=2, checkpoint_every=2, lr=3e-3)
    ref = subprocess.run(_cli(world, tmp_path / "ref", *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(world, out, "--throttle", "0.4", *args), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    curve = out / "curve.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it after step 4 was logged: after a checkpoint, before the end
        if curve.exists() and len(curve.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] in (2, 4, 6)  # mid-way

    res = subprocess.run(_cli(world, out, *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["resumed_from"] < 8
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(ln)["loss"] for ln in (tmp_path / "ref" / "curve.jsonl").read_text().splitlines()]
    lb = [json.loads(ln)["loss"] for ln in curve.read_text().splitlines()]
    assert la == lb  # the curve was trimmed to the checkpoint and continued: one line per step


@pytest.mark.slow
def test_ddp_two_processes_match_one(world, tmp_path):
    """torchrun with 2 CPU processes on gloo (micro-batch 2 each) = 1 process with micro-batch 4."""
    def args(mb: int) -> list[str]:
        return ["--device", "cpu", *_set(steps=4, warmup_steps=1, checkpoint_every=10, lr=3e-3, micro_batch=mb)]

    one = subprocess.run(_cli(world, tmp_path / "one", *args(4)), env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = _cli(world, tmp_path / "two", *args(2))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29500 + os.getpid() % 1000)]
    two = subprocess.run(torchrun + cmd[1:], env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["global_batch"] == 4
    l1 = [json.loads(ln)["loss"] for ln in (tmp_path / "one" / "curve.jsonl").read_text().splitlines()]
    l2 = [json.loads(ln)["loss"] for ln in (tmp_path / "two" / "curve.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-5)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    w0 = load_file(str(world / "student" / "model.safetensors"))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1 if k.startswith("decoder.")) > 1e-4  # it trained
