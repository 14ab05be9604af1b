"""StageMixedKL: the contract of issue 2 (components, weights, T**2, stateless, config round-trip),
fast path vs the naive reference composition, codebook/time weighting, cross-entropy, errors."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from _loss_helpers import assert_close, logits, random_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from kdq.errors import KdqError
from kdq.losses import (
    AlphaError,
    LogitsShapeError,
    MaskError,
    StageMixedKL,
    StageMixedKLConfigError,
    TemperatureError,
    forward_kl,
    paper_config,
    reference,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
)
from kdq.schedules import Constant, Cosine, Linear, Schedule, Staged

PUBLIC = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "skewed_forward_kl": skewed_forward_kl,
          "skewed_reverse_kl": skewed_reverse_kl}


def delay_mask(b: int, k: int, t: int) -> torch.Tensor:
    """MusicGen's delay pattern: codebook k is shifted by k steps, so frames < k are padding."""
    frames = torch.arange(t)[None, :]
    return (frames >= torch.arange(k)[:, None]).expand(b, k, t).clone()


def naive_loss(kd: StageMixedKL, s, t, step, mask):
    """The naive composition (each term on its own, reference implementations) the benchmark times."""
    return reference.naive_composition(s, t, kd.weights_at(step), kd.temperature_at(step), kd.alpha, mask)


STEPS = [0, 150, 300, 512, 700, 999, 1000, 1500]


@pytest.mark.parametrize("step", STEPS)
def test_loss_is_sum_of_components_and_components_are_the_functions(step):
    kd = StageMixedKL(1000)
    shape = (2, 4, 9, 50)
    s, t = logits(shape, seed=1), logits(shape, seed=2)
    mask = delay_mask(2, 4, 9) & random_mask(shape[:-1], seed=3)
    loss = kd(s, t, step=step, mask=mask)
    parts = kd.components(s, t, step=step, mask=mask)
    assert list(parts) == ["forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl"]
    total = sum(w * v for w, v in parts.values())
    assert loss.shape == () and torch.allclose(loss, total, rtol=1e-5, atol=1e-7)
    T = kd.temperature_at(step)
    for name, (w, v) in parts.items():
        kw = {"alpha": kd.alpha} if name.startswith("skewed") else {}
        assert torch.equal(v, PUBLIC[name](s, t, temperature=T, mask=mask, reduction="mean", **kw)) or \
            torch.allclose(v, PUBLIC[name](s, t, temperature=T, mask=mask, **kw), rtol=1e-6, atol=1e-7)
        assert w == pytest.approx(kd.weights_at(step)[name])
    # gradients of the fused loss == gradients of the sum of the components
    g1 = torch.autograd.grad(loss, s)[0]
    g2 = torch.autograd.grad(total, s)[0]
    assert_close(g1, g2)


@pytest.mark.parametrize(
    "shape, dtype",
    [((2, 4, 8, 40), torch.float64), ((3, 47, 31, 123), torch.float32), ((1, 3, 5, 7), torch.float32)],
    ids=["fp64", "odd-fp32", "tiny-fp32"],
)
def test_fast_path_matches_naive_reference_composition(shape, dtype):
    kd = StageMixedKL(100, chunk_elements=shape[-1] * 37)  # several chunks, last one partial
    s, t = logits(shape, seed=4, dtype=dtype), logits(shape, seed=5, dtype=dtype)
    mask = random_mask(shape[:-1], seed=6)
    for step in (10, 55, 90):
        fast = kd(s, t, step=step, mask=mask)
        naive = naive_loss(kd, s, t, step, mask)
        assert_close(fast, naive)
        for a, b in zip(torch.autograd.grad(fast, (s, t)), torch.autograd.grad(naive, (s, t))):
            assert_close(a, b)


ALL_TERMS = {"forward_kl": 0.5, "reverse_kl": 0.3, "skewed_forward_kl": 0.2, "skewed_reverse_kl": 0.4,
             "adaptive_kl": 0.6, "cross_entropy": 0.7}


def naive_loss_with_ce(kd: StageMixedKL, s, t, step, mask, labels):
    """The reference composition plus the cross-entropy term (mean over counted, labelled positions)."""
    weights = kd.weights_at(step)
    ce_w = weights.pop("cross_entropy")
    keep = mask & (labels != kd.ignore_index)
    ce = reference.cross_entropy(s, labels, kd.ignore_index)
    return (reference.naive_composition(s, t, weights, kd.temperature_at(step), kd.alpha, mask, kd.head_mass)
            + ce_w * ce[keep].sum() / keep.sum())


@pytest.mark.parametrize("w", [1.0, 0.37, -2.5])
def test_gradients_follow_the_upstream_gradient(w):
    # (w * loss).backward() for every term, head_mass != 0.5, student and teacher gradients, against
    # the reference: the fused backward hands over its stored gradient when w == 1 and scales it
    # otherwise; components() recomputes each chunk in its backward
    shape = (2, 4, 7, 33)
    kd = StageMixedKL(100, weights=ALL_TERMS, alpha=0.2, head_mass=0.35, chunk_elements=33 * 5)
    mask = random_mask(shape[:-1], seed=47)
    labels = torch.randint(0, 33, shape[:-1], generator=torch.Generator().manual_seed(48))
    labels[:, :, 0] = -100
    runs = {}
    for how in ("forward", "components", "reference"):
        s, t = logits(shape, seed=49, dtype=torch.float64), logits(shape, seed=50, dtype=torch.float64)
        if how == "forward":
            loss = kd(s, t, step=60, mask=mask, labels=labels)
        elif how == "components":
            loss = sum(wt * v for wt, v in kd.components(s, t, step=60, mask=mask, labels=labels).values())
        else:
            loss = naive_loss_with_ce(kd, s, t, 60, mask, labels)
        (w * loss).backward()
        runs[how] = (loss.detach(), s.grad, t.grad)
    for how in ("forward", "components"):
        for a, b in zip(runs[how], runs["reference"]):
            assert_close(a, b)


def test_gradient_accumulation_gives_the_full_batch_gradient():
    # Micro-batches weighted by their share of the counted positions, accumulated into the same
    # parameters ((loss * n_mb / n).backward(), as the example's training loop does), give the
    # full batch's gradient: values and norm, student and teacher parameters, against the
    # reference composition on the full batch. Equal micro-batches without a mask, each
    # backpropagated with an upstream of 1 (the hand-over path), add up to k times the gradient.
    g = torch.Generator().manual_seed(51)
    x = torch.randn(5, 4, 6, 12, generator=g, dtype=torch.float64)
    student = torch.nn.Linear(12, 40).double()
    teacher = torch.nn.Linear(12, 40).double()
    mask = delay_mask(5, 4, 6) & random_mask((5, 4, 6), seed=52)
    labels = torch.randint(0, 40, (5, 4, 6), generator=g).masked_fill(~mask, -100)
    kd = StageMixedKL(100, weights=ALL_TERMS, alpha=0.15, chunk_elements=40 * 9)
    params = [*student.parameters(), *teacher.parameters()]
    ref = naive_loss_with_ce(kd, student(x), teacher(x), 70, mask, labels)
    want = torch.autograd.grad(ref, params)
    n = int(mask.sum())
    for p in params:
        p.grad = None
    for lo, hi in ((0, 1), (1, 4), (4, 5)):  # uneven micro-batches
        mb = slice(lo, hi)
        loss = kd(student(x[mb]), teacher(x[mb]), step=70, mask=mask[mb], labels=labels[mb])
        (loss * (int(mask[mb].sum()) / n)).backward()
    for p, w_ in zip(params, want):
        assert_close(p.grad, w_)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert norm.item() == pytest.approx(torch.sqrt(sum((w_**2).sum() for w_ in want)).item(), rel=1e-10)
    assert norm > 0
    full = kd(student(x[:4]), teacher(x[:4]), step=70, labels=labels[:4].clamp_min(0))
    want = torch.autograd.grad(2.0 * full, params)
    for p in params:
        p.grad = None
    for mb in (slice(0, 2), slice(2, 4)):
        kd(student(x[mb]), teacher(x[mb]), step=70, labels=labels[mb].clamp_min(0)).backward()
    for p, w_ in zip(params, want):
        assert_close(p.grad, w_)


REFERENCE_TERMS = {
    "forward_kl": lambda s, t, kd, T: reference.forward_kl(s, t, T),
    "reverse_kl": lambda s, t, kd, T: reference.reverse_kl(s, t, T),
    "skewed_forward_kl": lambda s, t, kd, T: reference.skewed_forward_kl(s, t, kd.alpha, T),
    "skewed_reverse_kl": lambda s, t, kd, T: reference.skewed_reverse_kl(s, t, kd.alpha, T),
    "adaptive_kl": lambda s, t, kd, T: reference.adaptive_kl(s, t, kd.head_mass, T),
}


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler (the kernel falls back to eager)")
def test_compiled_kernel_at_the_mini_preset_size(monkeypatch):
    # What real runs execute: compile="auto" on bf16 (autocast) logits of the mini preset's size,
    # [8 clips, 4 codebooks, 203 frames, 1024 codes] = 6.65M elements >= 2**22, the delay-pattern
    # mask, every term including cross-entropy, the teacher's gradient too, two padded vocabulary
    # entries at -inf in both; against the reference term by term (fp32 leaves holding the same
    # values). About 40 s on a 2-core CPU, most of it the two compilations.
    from torch._dynamo.utils import counters

    from kdq.losses import fused

    monkeypatch.setattr(fused, "_compiled_kernel", None)
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.delenv("KDQ_COMPILE", raising=False)
    b, k, frames, v = 8, 4, 203, 1024
    s = logits((b, k, frames, v), seed=90, dtype=torch.bfloat16, grad=False)
    t = logits((b, k, frames, v), seed=91, dtype=torch.bfloat16, grad=False)
    s[..., -2:] = float("-inf")
    t[..., -2:] = float("-inf")
    s.requires_grad_()
    t.requires_grad_()
    mask = delay_mask(b, k, frames) & random_mask((b, k, frames), seed=92, p=0.1)
    labels = torch.randint(0, v - 2, (b, k, frames), generator=torch.Generator().manual_seed(93)).masked_fill(~mask, -100)
    kd = StageMixedKL(300, weights=ALL_TERMS)
    assert kd.compile == "auto" and s.numel() >= 1 << 22
    step = 120
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would hide the compile
        loss = kd(s, t, step=step, mask=mask, labels=labels)
        gs, gt = torch.autograd.grad(loss, (s, t))
        with torch.no_grad():  # how the training loop logs them
            parts = kd.components(s, t, step=step, mask=mask, labels=labels)
    assert counters["stats"]["unique_graphs"] >= graphs + 2 and not fused._compile_failed
    assert gs.dtype == gt.dtype == torch.bfloat16
    s32, t32 = s.detach().float().requires_grad_(), t.detach().float().requires_grad_()
    temperature, n = kd.temperature_at(step), mask.sum()
    ref_gs, ref_gt, ref_loss = torch.zeros_like(s32), torch.zeros_like(t32), 0.0
    for name, w in kd.weights_at(step).items():
        if name == "cross_entropy":
            keep = mask & (labels != -100)
            value = reference.cross_entropy(s32, labels)[keep].sum() / keep.sum()
        else:
            value = REFERENCE_TERMS[name](s32, t32, kd, temperature)[mask].sum() / n
        g_s, g_t = torch.autograd.grad(w * value, (s32, t32), allow_unused=True)
        ref_gs += g_s
        ref_gt += 0.0 if g_t is None else g_t
        ref_loss += w * value.item()
        assert parts[name][1].item() == pytest.approx(value.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    for got, want in ((gs, ref_gs), (gt, ref_gt)):
        # bf16 gradients: each element within two bf16 roundings of the reference, the whole
        # within 0.4% in norm (one bf16 rounding is 2**-9 = 0.2% relative)
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=2**-6, atol=2**-8 * scale)
        assert ((got.float() - want).norm() / want.norm()).item() < 4e-3
        assert (got[..., -2:] == 0).all()


def test_default_config_is_the_documented_reconstruction():
    n = 1000
    kd = StageMixedKL(n)
    assert kd.alpha == 0.1 and kd.t2_scale is True
    assert kd.temperature_at(0) == pytest.approx(2.0) and kd.temperature_at(n) == pytest.approx(1.0)
    temps = [kd.temperature_at(s) for s in range(0, n + 1, 10)]
    assert all(b <= a for a, b in zip(temps, temps[1:]))  # anneals monotonically
    early, late = kd.weights_at(0), kd.weights_at(n)
    assert early["forward_kl"] > 0.5 * sum(early.values())  # early: forward KL leads
    assert early["reverse_kl"] == 0 and early["skewed_reverse_kl"] == 0
    assert late["reverse_kl"] + late["skewed_reverse_kl"] + late["skewed_forward_kl"] > 0.8 * sum(late.values())
    for step in range(0, n + 1, 25):  # stage weights sum to 1; the rest is T**2
        assert sum(kd.weights_at(step).values()) == pytest.approx(kd.temperature_at(step) ** 2)


def test_t2_convention_lives_in_the_weights_and_keeps_gradient_scale():
    shape = (4, 3, 6, 30)
    s, t = logits(shape, seed=7, scale=0.3), logits(shape, seed=8, scale=0.3)
    norms = {}
    for t2 in (True, False):
        for T in (4.0, 8.0):
            kd = StageMixedKL(10, weights={"forward_kl": 1.0}, temperature=T, t2_scale=t2)
            assert kd.weights_at(3)["forward_kl"] == pytest.approx(T * T if t2 else 1.0)
            (g,) = torch.autograd.grad(kd(s, t, step=3), s)
            norms[t2, T] = g.norm().item()
    # Hinton: with T**2 the gradient size barely moves with T; without it, it falls as 1/T**2
    assert norms[True, 8.0] / norms[True, 4.0] == pytest.approx(1.0, rel=0.05)
    assert norms[False, 8.0] / norms[False, 4.0] == pytest.approx(0.25, rel=0.05)


def test_codebook_weights():
    shape = (2, 4, 7, 25)
    s, t = logits(shape, seed=9), logits(shape, seed=10)
    mask = random_mask(shape[:-1], seed=11)
    kd = StageMixedKL(10, weights={"forward_kl": 1.0, "reverse_kl": 0.5}, codebook_weights=[1, 0, 0, 0],
                      temperature=1.5)
    parts = kd.components(s, t, step=0, mask=mask)
    assert list(parts) == ["weighted_forward_kl", "weighted_reverse_kl"]
    only0 = mask.clone()
    only0[:, 1:] = False
    assert torch.allclose(parts["weighted_forward_kl"][1], forward_kl(s, t, temperature=1.5, mask=only0))
    loss = kd(s, t, step=0, mask=mask)
    assert torch.allclose(loss, sum(w * v for w, v in parts.values()), rtol=1e-6)
    g = torch.autograd.grad(loss, s)[0]
    assert (g[:, 1:] == 0).all() and (g[:, 0] != 0).any()
    # general weights: a weighted mean over positions
    kd2 = StageMixedKL(10, weights={"reverse_kl": 1.0}, codebook_weights=[1.0, 0.5, 0.25, 2.0], t2_scale=False,
                      temperature=1.0)
    w = torch.tensor([1.0, 0.5, 0.25, 2.0])[None, :, None] * mask
    per = reverse_kl(s, t, reduction="none")
    assert torch.allclose(kd2(s, t, step=0, mask=mask), (per * w).sum() / w.sum(), rtol=1e-6)


def test_time_weighting():
    shape = (2, 3, 10, 20)
    s, t = logits(shape, seed=12), logits(shape, seed=13)
    mask = random_mask(shape[:-1], seed=14)
    tw = Linear(1.0, 0.1, 9)
    kd = StageMixedKL(10, weights={"skewed_forward_kl": 1.0}, time_weighting=tw, t2_scale=False, temperature=1.0)
    w = torch.tensor([tw(i) for i in range(10)]) * mask
    per = skewed_forward_kl(s, t, alpha=0.1, reduction="none")
    want = (per * w).sum() / w.sum()
    assert torch.allclose(kd(s, t, step=0, mask=mask), want, rtol=1e-6)
    assert torch.allclose(kd.components(s, t, step=0, mask=mask)["weighted_skewed_forward_kl"][1], want, rtol=1e-6)
    flat = StageMixedKL(10, weights={"skewed_forward_kl": 1.0}, time_weighting=Constant(1.0), t2_scale=False,
                        temperature=1.0)
    assert torch.allclose(flat(s, t, step=0, mask=mask), skewed_forward_kl(s, t, mask=mask), rtol=1e-6)


def test_cross_entropy_on_labels_with_ignore_index():
    shape = (2, 4, 6, 30)
    s, t = logits(shape, seed=15, dtype=torch.float64), logits(shape, seed=16, dtype=torch.float64)
    labels = torch.randint(0, 30, shape[:-1], generator=torch.Generator().manual_seed(17))
    labels[:, :, :2] = -100
    mask = random_mask(shape[:-1], seed=18)
    kd = StageMixedKL(10, weights={"forward_kl": 1.0, "cross_entropy": 0.5}, temperature=2.0)
    parts = kd.components(s, t, step=0, mask=mask, labels=labels)
    keep = mask & (labels != -100)
    want_ce = F.cross_entropy(s[keep], labels[keep])
    assert_close(parts["cross_entropy"][1], want_ce)
    assert parts["cross_entropy"][0] == 0.5 and parts["forward_kl"][0] == 4.0  # CE never gets T**2
    loss = kd(s, t, step=0, mask=mask, labels=labels)
    ref = 4.0 * reference.forward_kl(s, t, 2.0)[mask].mean() + 0.5 * want_ce
    assert_close(loss, ref)
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0])


def test_adaptive_component_against_the_reference():
    # head_mass 0.4 against the reference written from the definition (it compared the fast path
    # with itself), forward and components, values and gradients
    shape = (2, 2, 5, 16)
    s, t = logits(shape, seed=19, dtype=torch.float64), logits(shape, seed=20, dtype=torch.float64)
    kd = StageMixedKL(10, weights={"adaptive_kl": 1.0}, temperature=1.7, t2_scale=False, head_mass=0.4)
    want = reference.adaptive_kl(s, t, 0.4, 1.7).mean()
    (w, v), = kd.components(s, t, step=0).values()
    loss = kd(s, t, step=0)
    assert w == 1.0
    for got in (v, loss):
        assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (s, t)), torch.autograd.grad(want, (s, t), retain_graph=True)):
            assert_close(a, b)


def test_stateless_in_step():
    kd = StageMixedKL(1000)
    assert list(kd.parameters()) == [] and list(kd.buffers()) == []
    s, t = logits((2, 4, 5, 12), seed=21), logits((2, 4, 5, 12), seed=22)
    a = kd(s, t, step=5)
    kd(s, t, step=900)
    kd(s, t, step=torch.tensor(400))
    assert torch.equal(a, kd(s, t, step=5))
    # micro-batches of an accumulation with the same step add up to the full batch (mean of means)
    full = kd(s, t, step=640)
    halves = (kd(s[:1], t[:1], step=640) + kd(s[1:], t[1:], step=640)) / 2
    assert torch.allclose(full, halves, rtol=1e-6)


def test_config_round_trip_through_json():
    kd = StageMixedKL(500, alpha=0.2, codebook_weights=[1, 0.5], time_weighting=Linear(1.0, 0.5, 10),
                      weights={"forward_kl": Linear(1.0, 0.0, 500), "reverse_kl": 0.3, "cross_entropy": 0.1},
                      temperature=Constant(1.5), ignore_index=-1, chunk_elements=1000, compile=False)
    data = json.loads(json.dumps(kd.to_dict()))
    back = StageMixedKL.from_dict(data)
    assert back.to_dict() == kd.to_dict()
    assert repr(back) == repr(kd)
    s, t = logits((2, 2, 10, 9), seed=23), logits((2, 2, 10, 9), seed=24)
    labels = torch.randint(0, 9, (2, 2, 10), generator=torch.Generator().manual_seed(25))
    assert torch.equal(kd(s, t, step=123, labels=labels), back(s, t, step=123, labels=labels))
    default = StageMixedKL(77)
    assert StageMixedKL.from_dict(json.loads(json.dumps(default.to_dict()))).to_dict() == default.to_dict()


def test_repr_prints_formula_with_current_weights():
    kd = StageMixedKL(1000)
    text = repr(kd)
    assert "loss(step=0) = 3.2*forward_kl + 0*reverse_kl + 0.8*skewed_forward_kl + 0*skewed_reverse_kl" in text
    assert "T=2" in text and "T^2=4" in text and "Cosine(2 -> 1 over steps [0, 1000])" in text
    s, t = logits((1, 4, 3, 8), seed=26), logits((1, 4, 3, 8), seed=27)
    kd(s, t, step=1000)
    assert "loss(step=1000) = 0.1*forward_kl + 0.4*reverse_kl + 0.2*skewed_forward_kl + 0.3*skewed_reverse_kl" \
        in repr(kd)


def test_masked_positions_get_zero_gradient_and_half_inputs_are_finite():
    shape = (2, 4, 6, 32)
    mask = delay_mask(2, 4, 6)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        s0 = (torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(28))) * 1e4).to(dtype)
        t0 = (torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(29))) * 1e4).to(dtype)
        s0[~mask] = float("nan")
        s = s0.requires_grad_()
        t = t0.requires_grad_()
        kd = StageMixedKL(100, weights={"forward_kl": 1.0, "reverse_kl": 1.0, "skewed_forward_kl": 1.0,
                                        "skewed_reverse_kl": 1.0, "adaptive_kl": 1.0})
        loss = kd(s, t, step=50, mask=mask)
        assert torch.isfinite(loss)
        gs, gt = torch.autograd.grad(loss, (s, t))
        assert gs.dtype == dtype
        assert (gs[~mask] == 0).all() and (gt[~mask] == 0).all()
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    empty = StageMixedKL(10)(logits(shape, seed=1), logits(shape, seed=2), step=0,
                             mask=torch.zeros(shape[:-1], dtype=torch.bool))
    assert empty.item() == 0.0


def test_neg_inf_logits_banned_entries():
    shape = (2, 4, 6, 20)
    mask = delay_mask(2, 4, 6)
    kd = StageMixedKL(1000, weights={**{n: w for n, w in paper_config(1000)["weights"].items()},
                                      "adaptive_kl": 0.3, "cross_entropy": 0.5})
    labels = torch.randint(0, 17, shape[:-1], generator=torch.Generator().manual_seed(42))
    s0 = logits(shape, seed=40, dtype=torch.float64, grad=False)
    t0 = logits(shape, seed=41, dtype=torch.float64, grad=False)
    # The same entries banned in both (padded vocabulary): the loss is the loss over the other 17
    # entries, and the banned entries get exactly zero gradient, at every stage.
    s = s0.clone().index_fill_(-1, torch.arange(17, 20), float("-inf")).requires_grad_()
    t = t0.clone().index_fill_(-1, torch.arange(17, 20), float("-inf")).requires_grad_()
    s17, t17 = s0[..., :17].clone().requires_grad_(), t0[..., :17].clone().requires_grad_()
    for step in (0, 500, 1000):
        loss = kd(s, t, step=step, mask=mask, labels=labels)
        want = kd(s17, t17, step=step, mask=mask, labels=labels)
        assert_close(loss, want)
        (gs, gt), (ws, wt) = torch.autograd.grad(loss, (s, t)), torch.autograd.grad(want, (s17, t17))
        assert_close(gs[..., :17], ws)
        assert_close(gt[..., :17], wt)
        assert (gs[..., 17:] == 0).all() and (gt[..., 17:] == 0).all()
    # Banned in the teacher only: KL(q || p) is +inf. At step 0 the reverse terms have weight 0,
    # so the loss and its gradients are the other terms' (0 * inf = 0), equal to the reference
    # composition; once reverse KL has weight the loss is +inf and the student's gradient on the
    # counted positions is NaN (it has no finite limit), while the teacher's stays finite.
    kd = StageMixedKL(1000)
    t = t0.clone().index_fill_(-1, torch.arange(17, 20), float("-inf")).requires_grad_()
    s = s0.clone().requires_grad_()
    assert kd.weights_at(0)["reverse_kl"] == 0 and kd.weights_at(0)["skewed_reverse_kl"] == 0
    loss = kd(s, t, step=0, mask=mask)
    naive = naive_loss(kd, s, t, 0, mask)
    assert torch.isfinite(loss)
    assert_close(loss, naive)
    for a, b in zip(torch.autograd.grad(loss, (s, t)), torch.autograd.grad(naive, (s, t))):
        assert torch.isfinite(a).all()
        assert_close(a, b)
    late = kd(s, t, step=900, mask=mask)
    assert late == float("inf")
    gs, gt = torch.autograd.grad(late, (s, t))
    assert torch.isnan(gs[mask]).all() and (gs[~mask] == 0).all()
    assert torch.isfinite(gt).all()


def test_tiny_temperatures_are_refused_not_a_zero_loss():
    # the reproduction: at T = 1e-39 the T**2 weight underflowed to 0 and the loss was exactly 0
    s, t = logits((2, 4, 5, 10), seed=43), logits((2, 4, 5, 10), seed=44)
    for T in (1e-39, 5e-324):
        _err(TemperatureError, "temperature", lambda: StageMixedKL(10, temperature=T)(s, t, step=0))
    # 1/T is finite but T**2 is below float32's range: the T**2 weight would round to 0
    msg = _err(TemperatureError, "temperature", lambda: StageMixedKL(10, temperature=1e-20)(s, t, step=0))
    assert "t2_scale" in msg
    loss = StageMixedKL(10, temperature=1e-20, t2_scale=False)(s, t, step=0)
    assert not torch.isnan(loss) and loss > 0


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(2, 30), st.integers(0, 2**31 - 1),
       st.floats(0, 1200), st.floats(0.0, 0.9))
def test_prop_loss_equals_sum_of_components(b, k, t_len, v, seed, step, alpha):
    shape = (b, k, t_len, v)
    s, t = logits(shape, seed=seed), logits(shape, seed=seed + 1)
    mask = random_mask(shape[:-1], seed=seed)
    kd = StageMixedKL(1000, alpha=alpha, chunk_elements=v * 3)
    loss = kd(s, t, step=step, mask=mask)
    total = sum(w * v_ for w, v_ in kd.components(s, t, step=step, mask=mask).values())
    assert torch.allclose(loss, total, rtol=1e-5, atol=1e-6)
    assert loss.item() >= -1e-6


def _err(exc_type, arg, fn):
    with pytest.raises(exc_type) as info:
        fn()
    assert isinstance(info.value, KdqError) and isinstance(info.value, ValueError)
    assert arg in str(info.value)
    return str(info.value)


def test_errors():
    s, t = logits((2, 4, 5, 10), seed=30), logits((2, 4, 5, 10), seed=31)
    _err(StageMixedKLConfigError, "total_steps", lambda: StageMixedKL(0))
    _err(StageMixedKLConfigError, "total_steps", lambda: StageMixedKL(10.5))
    _err(StageMixedKLConfigError, "weights key", lambda: StageMixedKL(10, weights={"forward_k": 1.0}))
    _err(StageMixedKLConfigError, "weights", lambda: StageMixedKL(10, weights={}))
    _err(StageMixedKLConfigError, "weights['reverse_kl']", lambda: StageMixedKL(10, weights={"reverse_kl": "x"}))
    _err(AlphaError, "alpha", lambda: StageMixedKL(10, alpha=1.0))
    _err(StageMixedKLConfigError, "compile", lambda: StageMixedKL(10, compile="yes"))
    _err(StageMixedKLConfigError, "codebook_weights", lambda: StageMixedKL(10, codebook_weights=[0, 0]))
    _err(StageMixedKLConfigError, "codebook_weights", lambda: StageMixedKL(10, codebook_weights=[1, -1]))
    _err(StageMixedKLConfigError, "head_mass", lambda: StageMixedKL(10, head_mass=0))
    _err(StageMixedKLConfigError, "chunk_elements", lambda: StageMixedKL(10, chunk_elements=0))
    _err(StageMixedKLConfigError, "config key", lambda: StageMixedKL.from_dict({"total_steps": 5, "alfa": 0.1}))
    kd = StageMixedKL(10)
    _err(StageMixedKLConfigError, "step", lambda: kd(s, t, step=-1))
    _err(StageMixedKLConfigError, "step", lambda: kd(s, t, step=float("nan")))
    _err(LogitsShapeError, "teacher_logits", lambda: kd(s, t[..., :9], step=0))
    empty = torch.zeros(2, 4, 5, 0)  # V = 0 raised a raw RuntimeError from reshape
    _err(LogitsShapeError, "student_logits", lambda: kd(empty, empty, step=0))
    _err(MaskError, "mask", lambda: kd(s, t, step=0, mask=torch.ones(2, 4, 5, 10, dtype=torch.bool)))
    _err(TemperatureError, "temperature", lambda: StageMixedKL(10, temperature=Linear(1.0, -1.0, 10)))
    _err(LogitsShapeError, "codebook_weights", lambda: StageMixedKL(10, codebook_weights=[1, 1, 1])(s, t, step=0))
    ce = StageMixedKL(10, weights={"cross_entropy": 1.0})
    _err(StageMixedKLConfigError, "labels", lambda: ce(s, t, step=0))
    bad = torch.full((2, 4, 5), 10)
    _err(LogitsShapeError, "labels", lambda: ce(s, t, step=0, labels=bad))
    _err(LogitsShapeError, "labels", lambda: ce(s, t, step=0, labels=torch.zeros(2, 4, dtype=torch.long)))
    _err(MaskError, "labels", lambda: ce(s, t, step=0, labels=torch.zeros(2, 4, 5)))
    _err(StageMixedKLConfigError, "time_weighting", lambda: StageMixedKL(10, time_weighting=Linear(1.0, -1.0, 2)))
    _err(TemperatureError, "temperature", lambda: StageMixedKL(10, temperature=Linear(1.0, 0.0, 10)))
    assert math.isfinite(StageMixedKL(10)(s, t, step=10**6).item())  # past the end: schedules hold


@pytest.mark.parametrize(
    "weight",
    [-1.0, Constant(-0.1), Linear(1.0, -1.0, 10), Cosine(0.5, -0.5, 100, begin=20),
     Staged((Constant(1.0), Linear(0.5, -0.2, 10, begin=5)), (5,), width=2),
     {"kind": "linear", "start": 0.2, "end": -0.2, "steps": 4}],
    ids=["number", "constant", "linear", "cosine", "staged", "dict"],
)
def test_negative_weight_schedules_are_refused(weight):
    # the reproduction: weights={"forward_kl": -1.0} (or a schedule that decreases below zero)
    # was accepted and the loss maximised the divergence
    msg = _err(StageMixedKLConfigError, "weights['reverse_kl']",
               lambda: StageMixedKL(10, weights={"forward_kl": 1.0, "reverse_kl": weight}))
    assert ">= 0" in msg
    _err(StageMixedKLConfigError, "weights['reverse_kl']",
         lambda: StageMixedKL.from_dict({"total_steps": 10, "weights": {"reverse_kl": weight}}))


@dataclass(frozen=True, repr=False)
class _Dip(Schedule):
    """A kind with no stated lower bound that goes negative from step 5."""

    kind: ClassVar[str] = "test_dip"

    def __call__(self, step: float) -> float:
        return 1.0 if step < 5 else -0.5


def test_negative_weight_at_a_step_is_refused_when_no_bound_is_known():
    s, t = logits((2, 3, 4, 8), seed=45), logits((2, 3, 4, 8), seed=46)
    kd = StageMixedKL(10, weights={"forward_kl": 1.0, "skewed_forward_kl": _Dip()})
    assert torch.isfinite(kd(s, t, step=4))
    msg = _err(StageMixedKLConfigError, "weights['skewed_forward_kl'] at step 5", lambda: kd(s, t, step=5))
    assert "-0.5" in msg
    _err(StageMixedKLConfigError, "weights['skewed_forward_kl'] at step 7", lambda: kd.weights_at(7))
    _err(StageMixedKLConfigError, "weights['skewed_forward_kl'] at step 6", lambda: kd.components(s, t, step=6))


def test_from_dict_with_a_bad_staged_schedule_names_the_key():
    bad = {"kind": "staged", "pieces": 5, "boundaries": []}
    _err(StageMixedKLConfigError, "pieces", lambda: StageMixedKL.from_dict({"total_steps": 10, "weights": {"forward_kl": bad}}))
    _err(StageMixedKLConfigError, "pieces", lambda: StageMixedKL.from_dict({"total_steps": 10, "temperature": bad}))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
CONFIG_VALUES = {
    "weights": st.dictionaries(st.sampled_from(["forward_kl", "reverse_kl", "forward_k"]),
                               JSON | st.floats(-1, 1), max_size=3) | JSON,
    "temperature": JSON | st.floats(-1, 3),
    "alpha": JSON,
    "t2_scale": JSON,
    "head_mass": JSON,
    "ignore_index": JSON,
    "codebook_weights": JSON,
    "time_weighting": JSON,
    "chunk_elements": JSON,
    "compile": JSON,
}


@settings(max_examples=150, deadline=None)
@given(st.integers(-2, 100) | JSON, st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_prop_from_dict_refuses_garbage_with_typed_errors_only(total_steps, config):
    # a config file is user input: anything that is not a valid config is a KdqError
    try:
        kd = StageMixedKL.from_dict({"total_steps": total_steps, **config})
    except KdqError:
        return
    assert StageMixedKL.from_dict(json.loads(json.dumps(kd.to_dict()))).to_dict() == kd.to_dict()
