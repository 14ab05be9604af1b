"""Distillation from a cached teacher (kdq.losses.sparse, kdq.losses.cache): the top-k bound and its
equality cases, the sampled estimator's unbiasedness (with a check that the test can fail), masks
and reductions, re-tempering, StageMixedKL on sparse targets, the safetensors cache (round trip,
atomic write, corruption), errors that name the argument, and the figures docs/cached_teacher.md
quotes."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import runpy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch.utils.data import DataLoader

from kdq.losses import (
    CachedTeacherDataset,
    LogitsShapeError,
    MaskError,
    ReductionError,
    SparseTarget,
    SparseTargetError,
    StageMixedKL,
    TeacherCacheError,
    TemperatureError,
    collate_targets,
    reference,
    sampled_target,
    sparse_forward_kl,
    sparse_reverse_kl,
    sparse_skewed_forward_kl,
    sparse_skewed_reverse_kl,
    topk_target,
    write_cache,
)
from kdq.losses.cache import payload_bytes_per_position

ROOT = Path(__file__).resolve().parents[1]
PROP = settings(max_examples=25, deadline=None)

# name -> (sparse function, dense reference per-position function, takes alpha)
TERMS = {
    "forward_kl": (sparse_forward_kl, lambda s, t, T, a: reference.forward_kl(s, t, T), False),
    "reverse_kl": (sparse_reverse_kl, lambda s, t, T, a: reference.reverse_kl(s, t, T), False),
    "skewed_forward_kl": (sparse_skewed_forward_kl, lambda s, t, T, a: reference.skewed_forward_kl(s, t, a, T), True),
    "skewed_reverse_kl": (sparse_skewed_reverse_kl, lambda s, t, T, a: reference.skewed_reverse_kl(s, t, a, T), True),
}


def _randn(shape, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _sparse(name, s, target, a=0.1, **kw):
    fn, _, skew = TERMS[name]
    return fn(s, target, **({"alpha": a} if skew else {}), **kw)


def _dense(name, s, t, T, a=0.1):
    return TERMS[name][1](s, t, T, a)


# ---------------------------------------------------------------------------------------------
# the builders
# ---------------------------------------------------------------------------------------------


def test_topk_target_keeps_the_top_tokens_and_the_tail_mass():
    z = _randn((2, 3, 11), seed=0)
    t = topk_target(z, 4, temperature=1.7)
    lp = torch.log_softmax(z / 1.7, dim=-1)
    assert t.kind == "topk" and t.shape == (2, 3) and t.size == 4 and t.vocab == 11 and t.temperature == 1.7
    assert torch.equal(t.indices, lp.topk(4, dim=-1).indices)
    torch.testing.assert_close(t.log_probs, lp.gather(-1, t.indices))
    # the k + 1 buckets are a distribution: the tail is the log of the rest
    torch.testing.assert_close(torch.logsumexp(torch.cat([t.log_probs, t.tail[..., None]], -1), -1),
                               torch.zeros(2, 3, dtype=torch.float64))
    assert torch.isneginf(topk_target(z, 11).tail).all()  # k = V: nothing left over


def test_sampled_target_weights_are_counts_over_n_when_the_proposal_is_the_teacher():
    z = _randn((4, 5, 9), seed=1, scale=1.0)
    t = sampled_target(z, 12, temperature=1.3, generator=torch.Generator().manual_seed(0))
    assert t.kind == "sampled" and t.size == 12 and t.n == 12 and t.self_proposal
    counts = t.weights * 12
    assert torch.equal(counts, counts.round())
    assert torch.equal(counts.sum(-1), torch.full((4, 5), 12.0, dtype=counts.dtype))
    used = t.weights > 0
    for row_i, row_w in zip(t.indices.reshape(-1, 12), used.reshape(-1, 12)):
        drawn = row_i[row_w]
        assert len(set(drawn.tolist())) == len(drawn)  # distinct tokens, each once, with its count
    lp = torch.log_softmax(z / 1.3, dim=-1)
    torch.testing.assert_close(t.log_probs, lp.gather(-1, t.indices))
    again = sampled_target(z, 12, temperature=1.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, t.indices)  # a generator makes the draws reproducible
    tempered = sampled_target(z, 12, temperature=1.3, proposal_temperature=3.0,
                              generator=torch.Generator().manual_seed(0))
    assert not tempered.self_proposal and (tempered.weights >= 0).all()


# ---------------------------------------------------------------------------------------------
# the top-k bound (data processing) and its equality cases
# ---------------------------------------------------------------------------------------------

rows = st.integers(1, 6)
vocab = st.integers(2, 40)
seeds = st.integers(0, 2**31 - 1)
temps = st.sampled_from([0.25, 0.7, 1.0, 2.0, 5.0])
alphas = st.sampled_from([0.0, 0.1, 0.5, 0.9])
scales = st.sampled_from([0.5, 2.0, 6.0])


@PROP
@given(rows, vocab, st.data(), seeds, temps, alphas, scales, st.sampled_from(list(TERMS)))
def test_bucketed_divergence_is_a_lower_bound_of_the_dense_one(n, v, data, seed, T, a, scale, name):
    k = data.draw(st.integers(1, v))
    z, s = _randn((n, v), seed, scale), _randn((n, v), seed + 1, scale)
    bucketed = _sparse(name, s, topk_target(z, k, temperature=T), a, reduction="none")
    dense = _dense(name, s, z, T, a)
    assert (bucketed <= dense + 1e-6).all(), (bucketed, dense)
    assert (bucketed >= -1e-12).all()


@PROP
@given(rows, vocab, st.data(), seeds, temps, alphas, scales, st.sampled_from(list(TERMS)))
def test_bucketed_equals_dense_when_the_tail_is_empty_or_proportional(n, v, data, seed, T, a, scale, name):
    z, s = _randn((n, v), seed, scale), _randn((n, v), seed + 1, scale)
    torch.testing.assert_close(_sparse(name, s, topk_target(z, v, temperature=T), a, reduction="none"),
                               _dense(name, s, z, T, a), atol=1e-9, rtol=1e-9)  # k = V
    k = data.draw(st.integers(1, v))
    target = topk_target(z, k, temperature=T)
    # the student's tail is the teacher's (same logits there): p(.|tail) = q(.|tail), nothing is lost
    s_prop = z.clone().scatter(-1, target.indices, s.gather(-1, target.indices))
    torch.testing.assert_close(_sparse(name, s_prop, target, a, reduction="none"),
                               _dense(name, s_prop, z, T, a), atol=1e-9, rtol=1e-9)


@PROP
@given(rows, vocab, st.data(), seeds, temps, alphas, st.floats(-50.0, 50.0), st.sampled_from(list(TERMS)))
def test_bucketed_is_zero_at_the_teacher_and_blind_to_a_logit_shift(n, v, data, seed, T, a, c, name):
    k = data.draw(st.integers(1, v))
    z, s = _randn((n, v), seed), _randn((n, v), seed + 1)
    target = topk_target(z, k, temperature=T)
    assert _sparse(name, z, target, a, reduction="none").abs().max() < 1e-9
    torch.testing.assert_close(_sparse(name, s + c, target, a, reduction="none"),
                               _sparse(name, s, target, a, reduction="none"), atol=1e-9, rtol=1e-7)


def test_bucketed_gradient_is_the_dense_gradient_when_k_is_the_vocabulary():
    z = _randn((3, 4, 5, 13), seed=3)  # an odd shape
    s = _randn((3, 4, 5, 13), seed=4).requires_grad_()
    for name in TERMS:
        g_sparse, = torch.autograd.grad(_sparse(name, s, topk_target(z, 13, temperature=1.5)), s)
        g_dense, = torch.autograd.grad(_dense(name, s, z, 1.5).mean(), s)
        torch.testing.assert_close(g_sparse, g_dense, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# the sampled estimator: unbiased for the KL and its gradient; the check can fail
# ---------------------------------------------------------------------------------------------

DRAWS = 2000


def _agrees(samples: torch.Tensor, exact: torch.Tensor, z: float = 4.0) -> bool:
    """Every coordinate of the mean of ``samples`` (draws on axis 0) within ``z`` standard errors."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((mean - exact).abs() <= z * se + 1e-9).all())


def _estimates(name, s, target, **kw):
    """Per-draw values [R, P] and student gradients [R, P, V] for targets of leading shape [R, P]."""
    sr = s.detach().expand(target.shape[0], *s.shape).clone().requires_grad_()
    values = _sparse(name, sr, target, reduction="none", **kw)
    values.sum().backward()
    return values.detach(), sr.grad


def _dense_value_and_grad(name, s, z, T):
    s = s.detach().clone().requires_grad_()
    d = _dense(name, s, z, T)
    d.sum().backward()
    return d.detach(), s.grad


@pytest.mark.parametrize("name,proposal", [("forward_kl", None), ("forward_kl", 2.5), ("skewed_forward_kl", None)])
def test_sampled_estimator_is_unbiased_for_the_dense_kl_and_its_gradient(name, proposal):
    z, s, T = _randn((3, 16), seed=5, scale=1.0), _randn((3, 16), seed=6, scale=1.0), 1.3
    target = sampled_target(z.expand(DRAWS, 3, 16), 4, temperature=T, proposal_temperature=proposal,
                            generator=torch.Generator().manual_seed(7))
    values, grads = _estimates(name, s, target)
    d, g = _dense_value_and_grad(name, s, z, T)
    assert _agrees(values, d) and _agrees(grads, g)


def test_the_unbiasedness_check_fails_for_estimators_that_drop_the_tail():
    z, s, T, k = _randn((3, 16), seed=5, scale=1.0), _randn((3, 16), seed=6, scale=1.0), 1.3, 4
    d, g = _dense_value_and_grad("forward_kl", s, z, T)
    lp = torch.log_softmax(z / T, dim=-1)
    top = lp.topk(k, dim=-1).indices
    # (a) tokens drawn from the teacher renormalised on its top-k (the tail is never drawn), counts / n
    truncated = torch.full_like(z, -math.inf).scatter(-1, top, z.gather(-1, top))
    biased = sampled_target(truncated.expand(DRAWS, 3, 16), 4, temperature=T,
                            generator=torch.Generator().manual_seed(7))
    biased = biased.replace(log_probs=lp.expand(DRAWS, 3, 16).gather(-1, biased.indices))
    values, grads = _estimates("forward_kl", s, biased)
    assert not _agrees(values, d) and not _agrees(grads, g)
    # (b) the deterministic top-k renormalised estimate: no variance, and still the wrong mean
    p_renorm = torch.log_softmax(lp.gather(-1, top), dim=-1)
    srep = s.detach().expand(DRAWS, 3, 16).clone().requires_grad_()
    lq = torch.log_softmax(srep / T, dim=-1).gather(-1, top.expand(DRAWS, 3, k))
    fixed = (p_renorm.exp() * (p_renorm - lq)).sum(-1)
    fixed.sum().backward()
    assert not _agrees(fixed.detach(), d) and not _agrees(srep.grad, g)


# ---------------------------------------------------------------------------------------------
# masks and reductions, as the dense losses
# ---------------------------------------------------------------------------------------------


def _targets(z, T=1.0):
    return {"topk": topk_target(z, 5, temperature=T),
            "sampled": sampled_target(z, 6, temperature=T, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("shape", [(2, 7, 11), (3, 4, 5, 13)])
def test_masked_positions_contribute_nothing_and_mean_is_over_counted_ones(kind, shape):
    z = _randn(shape, seed=8)
    target = _targets(z)[kind]
    mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(9)) > 0.3
    s = _randn(shape, seed=10, dtype=torch.float32).requires_grad_()
    clean = sparse_forward_kl(s, target, reduction="none")
    # garbage where masked: NaN student logits, out-of-range indices, NaN stored values
    s_bad = torch.where(mask[..., None], s.detach(), math.nan).requires_grad_()
    bad = {"indices": torch.where(mask[..., None], target.indices, -7),
           "log_probs": torch.where(mask[..., None], target.log_probs, math.nan)}
    bad.update({"tail": torch.where(mask, target.tail, math.nan)} if kind == "topk"
               else {"weights": torch.where(mask[..., None], target.weights, math.nan)})
    target_bad = target.replace(**bad)
    none = sparse_forward_kl(s_bad, target_bad, mask=mask, reduction="none")
    assert torch.equal(none[~mask], torch.zeros_like(none[~mask]))
    torch.testing.assert_close(none[mask], clean[mask].detach())
    mean = sparse_forward_kl(s_bad, target_bad, mask=mask)
    torch.testing.assert_close(mean, clean.detach()[mask].sum() / mask.sum())
    torch.testing.assert_close(sparse_forward_kl(s_bad, target_bad, mask=mask, reduction="sum"),
                               clean.detach()[mask].sum())
    mean.backward()
    assert torch.equal(s_bad.grad[~mask], torch.zeros_like(s_bad.grad[~mask]))  # exactly zero, not NaN
    assert torch.isfinite(s_bad.grad).all()
    nothing = sparse_forward_kl(s_bad, target_bad, mask=torch.zeros_like(mask))
    assert nothing.item() == 0.0  # 0, not NaN, when no position counts


def test_values_are_float32_at_least_and_gradients_come_back_in_the_input_dtype():
    z = _randn((2, 3, 17), seed=11)
    for kind, target in _targets(z).items():
        s16 = _randn((2, 3, 17), seed=12, dtype=torch.float16).requires_grad_()
        v = sparse_forward_kl(s16, target)
        assert v.dtype == torch.float32, kind
        v.backward()
        assert s16.grad.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# temperature: one per target, and explicit re-tempering of top-k targets
# ---------------------------------------------------------------------------------------------


@PROP
@given(rows, st.integers(3, 40), st.data(), seeds, temps, temps)
def test_retempered_is_exact_on_the_kept_tokens_and_bounds_the_tail(n, v, data, seed, T0, T):
    k = data.draw(st.integers(1, v - 1))
    z = _randn((n, v), seed)
    approx = topk_target(z, k, temperature=T0).retempered(T)
    exact = topk_target(z, k, temperature=T)
    assert torch.equal(approx.indices, exact.indices) and approx.temperature == T
    # kept tokens: ratios exact
    torch.testing.assert_close(approx.log_probs - approx.log_probs[..., :1], exact.log_probs - exact.log_probs[..., :1],
                               atol=1e-9, rtol=1e-9)
    # tail: uniform assumption overestimates when softening, underestimates when sharpening (power means)
    if T > T0:
        assert (approx.tail >= exact.tail - 1e-9).all()
    elif T < T0:
        assert (approx.tail <= exact.tail + 1e-9).all()
    # a flat tail is re-tempered exactly
    flat = z.clone().scatter(-1, exact.indices, 0.0)
    flat = torch.where(flat == 0.0, z, -3.0 * z.abs().max() - 1.0)  # every tail logit equal and below the top k
    torch.testing.assert_close(topk_target(flat, k, temperature=T0).retempered(T).tail,
                               topk_target(flat, k, temperature=T).tail, atol=1e-9, rtol=1e-9)


def test_a_temperature_other_than_the_targets_is_refused():
    z = _randn((2, 9), seed=13)
    s = _randn((2, 9), seed=14)
    target = topk_target(z, 3, temperature=2.0)
    assert sparse_forward_kl(s, target) == sparse_forward_kl(s, target, temperature=2.0)
    with pytest.raises(TemperatureError, match=r"temperature=1\.0.*target's temperature 2.*retempered"):
        sparse_forward_kl(s, target, temperature=1.0)
    with pytest.raises(SparseTargetError, match="target.kind='sampled'.*cannot be re-tempered"):
        sampled_target(z, 4).retempered(2.0)


# ---------------------------------------------------------------------------------------------
# StageMixedKL with a cached teacher
# ---------------------------------------------------------------------------------------------


def test_stage_mixed_kl_takes_a_topk_target_and_is_the_sum_of_its_sparse_components():
    shape = (2, 3, 5, 19)
    z, s = _randn(shape, seed=15), _randn(shape, seed=16, dtype=torch.float32).requires_grad_()
    mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(17)) > 0.2
    labels = torch.randint(0, 19, shape[:-1], generator=torch.Generator().manual_seed(18))
    labels[0, 0, 0] = -100
    target = topk_target(z, 6, temperature=1.5)
    weights = {"forward_kl": 0.5, "reverse_kl": 0.2, "skewed_forward_kl": 0.1, "skewed_reverse_kl": 0.15,
               "cross_entropy": 0.05}
    kd = StageMixedKL(100, weights=weights, temperature=1.5, alpha=0.2)
    loss = kd(s, target, step=10, mask=mask, labels=labels)
    w = kd.weights_at(10)
    expected = sum(w[n] * _sparse(n, s, target, 0.2, mask=mask) for n in TERMS)
    ce = reference.cross_entropy(s, labels)
    counted = mask & (labels != -100)
    expected = expected + w["cross_entropy"] * ce[counted].sum() / counted.sum()
    torch.testing.assert_close(loss, expected)
    parts = kd.components(s, target, step=10, mask=mask, labels=labels)
    torch.testing.assert_close(sum(wt * v for wt, v in parts.values()), expected)
    g_kd, = torch.autograd.grad(loss, s)
    g_ref, = torch.autograd.grad(expected, s)
    torch.testing.assert_close(g_kd, g_ref)
    # an annealed schedule: re-temper explicitly, step by step
    annealed = StageMixedKL(100, weights={"forward_kl": 1.0})
    t_step = annealed.temperature_at(30)
    torch.testing.assert_close(annealed(s, target.retempered(t_step), step=30),
                               t_step**2 * sparse_forward_kl(s, target.retempered(t_step)))


def test_stage_mixed_kl_with_a_sampled_target_and_the_divergences_it_refuses():
    z, s = _randn((2, 4, 23), seed=19), _randn((2, 4, 23), seed=20, dtype=torch.float32)
    target = sampled_target(z, 12, generator=torch.Generator().manual_seed(0))
    kd = StageMixedKL(10, weights={"forward_kl": 1.0, "skewed_forward_kl": 0.5}, temperature=1.0, t2_scale=False)
    torch.testing.assert_close(kd(s, target, step=0),
                               sparse_forward_kl(s, target) + 0.5 * sparse_skewed_forward_kl(s, target))
    with pytest.raises(SparseTargetError, match=r"divergence='reverse_kl'.*expectation under the student"):
        StageMixedKL(10, temperature=1.0)(s, target, step=0)  # the paper's weights include reverse KL
    with pytest.raises(SparseTargetError, match=r"divergence='adaptive_kl'"):
        StageMixedKL(10, weights={"adaptive_kl": 1.0}, temperature=1.0)(s, topk_target(z, 4), step=0)
    with pytest.raises(TemperatureError, match=r"temperature schedule at step 0.*temperature=1 \(a constant\)"):
        StageMixedKL(10, weights={"forward_kl": 1.0})(s, target, step=0)  # default schedule starts at 2.0


# ---------------------------------------------------------------------------------------------
# errors name the argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda z: topk_target(z, 0), r"k=0 .*\[1, 8\]"),
    (lambda z: topk_target(z, 9), r"k=9 .*\[1, 8\]"),
    (lambda z: topk_target(z, True), r"k=True"),
    (lambda z: topk_target(z, 2.0), r"k=2\.0"),
    (lambda z: sampled_target(z, 0), r"n=0 .*>= 1"),
    (lambda z: sampled_target(z, -3), r"n=-3"),
    (lambda z: sampled_target(z, 4, generator=0), r"generator=0"),
    (lambda z: topk_target(torch.full_like(z, math.nan), 2), r"logits=.*finite logits"),
])
def test_builders_refuse_bad_arguments_by_name(call, match):
    with pytest.raises(SparseTargetError, match=match):
        call(_randn((3, 8), seed=21))


def test_builder_temperatures_are_checked():
    z = _randn((3, 8), seed=21)
    with pytest.raises(TemperatureError, match="temperature=0"):
        topk_target(z, 2, temperature=0)
    with pytest.raises(TemperatureError, match="proposal_temperature=-1"):
        sampled_target(z, 2, proposal_temperature=-1)


def test_losses_refuse_bad_inputs_by_name():
    z = _randn((2, 5, 8), seed=22)
    t = topk_target(z, 3)
    s = _randn((2, 5, 8), seed=23)
    with pytest.raises(LogitsShapeError, match=r"target=SparseTarget.*leading shape of student_logits \(2, 4\)"):
        sparse_forward_kl(s[:, :4], t)
    with pytest.raises(LogitsShapeError, match=r"student_logits='tensor\(shape=\(2, 5, 9\).*vocabulary of 8"):
        sparse_forward_kl(_randn((2, 5, 9), seed=24), t)
    with pytest.raises(MaskError, match=r"mask='tensor\(shape=\(2, 4\)"):
        sparse_forward_kl(s, t, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(MaskError, match="mask="):
        sparse_forward_kl(s, t, mask=torch.ones(2, 5))
    with pytest.raises(ReductionError, match="reduction='avg'"):
        sparse_forward_kl(s, t, reduction="avg")
    with pytest.raises(SparseTargetError, match=r"target='tensor"):
        sparse_forward_kl(s, z)
    with pytest.raises(SparseTargetError, match=r"target.indices=.*containing 8.*\[0, 8\)"):
        sparse_forward_kl(s, t.replace(indices=t.indices.clamp_min(0) * 0 + torch.tensor([8, 0, 1])))
    with pytest.raises(SparseTargetError, match=r"target.indices='a top-k row with a repeated index'"):
        sparse_forward_kl(s, t.replace(indices=torch.zeros_like(t.indices)))
    sampled = sampled_target(z, 4)
    for fn in (sparse_reverse_kl, sparse_skewed_reverse_kl):
        with pytest.raises(SparseTargetError, match=r"divergence='(skewed_)?reverse_kl'.*top-k target"):
            fn(s, sampled)
    with pytest.raises(SparseTargetError, match=r"tail=None"):
        SparseTarget("topk", t.indices, t.log_probs, 8, 1.0)
    with pytest.raises(SparseTargetError, match=r"vocab=2"):
        SparseTarget("topk", t.indices, t.log_probs, 2, 1.0, tail=t.tail)
    with pytest.raises(SparseTargetError, match=r"kind='dense'"):
        SparseTarget("dense", t.indices, t.log_probs, 8, 1.0)


# ---------------------------------------------------------------------------------------------
# the cache on disk
# ---------------------------------------------------------------------------------------------


def _items(kind, *, vocab=21, seed=30, proposal=None, T=1.0):
    """Items of shape [2, T_i], T_i varying, of one kind."""
    out = []
    for i, steps in enumerate((3, 5, 1, 4, 2)):
        z = _randn((2, steps, vocab), seed + i, dtype=torch.float32)
        if kind == "topk":
            out.append(topk_target(z, 6, temperature=T))
        else:
            out.append(sampled_target(z, 7, temperature=T, proposal_temperature=proposal,
                                      generator=torch.Generator().manual_seed(seed + i)))
    return out


TOL = {"fp32": {"atol": 0.0, "rtol": 0.0}, "fp16": {"atol": 1e-6, "rtol": 2**-11},
       "bf16": {"atol": 1e-6, "rtol": 2**-8}}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind,proposal", [("topk", None), ("sampled", None), ("sampled", 2.0)])
def test_cache_round_trip(tmp_path, dtype, kind, proposal):
    items = _items(kind, proposal=proposal, T=1.25)
    index = write_cache(tmp_path / "cache", iter(items), shard_positions=8, dtype=dtype)
    assert len(index["shards"]) > 1  # several shards, read back by index
    ds = CachedTeacherDataset(tmp_path / "cache", verify="sha256")
    assert len(ds) == len(items) and ds.positions == sum(math.prod(t.shape) for t in items)
    for i in [*range(len(items)), -1]:
        got, want = ds[i], items[i]
        assert (got.kind, got.shape, got.vocab, got.temperature, got.n, got.proposal_temperature) == \
               (want.kind, want.shape, want.vocab, want.temperature, want.n, want.proposal_temperature)
        assert torch.equal(got.indices, want.indices) and got.indices.dtype == torch.int64
        for name, value in got.tensors().items():
            if name == "indices":
                continue
            tol = TOL["fp32"] if name == "weights" else TOL[dtype]  # weights: counts, or fp32
            torch.testing.assert_close(value.float(), want.tensors()[name].float(), **tol)
    if dtype == "fp32":
        s = _randn((2, 4, 21), seed=40, dtype=torch.float32)
        assert torch.equal(sparse_forward_kl(s, ds[3]), sparse_forward_kl(s, items[3]))
    with pytest.raises(IndexError):
        ds[len(items)]


def test_cache_index_records_what_it_holds(tmp_path):
    items = _items("topk")
    index = write_cache(tmp_path / "c", items, shard_positions=10, dtype="fp16")
    on_disk = json.loads((tmp_path / "c" / "index.json").read_text())
    assert on_disk == index
    assert (index["format"], index["kind"], index["k"], index["vocab"], index["temperature"]) == \
           ("kdq-cached-teacher", "topk", 6, 21, 1.0)
    assert index["dtypes"] == {"indices": "int16", "log_probs": "float16", "tail": "float16"}
    assert index["items"] == 5 and index["positions"] == 30
    for shard in index["shards"]:
        data = (tmp_path / "c" / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        with safe_open(str(tmp_path / "c" / shard["file"]), "pt") as f:  # plain safetensors, no pickle
            assert f.metadata()["format"] == "kdq-cached-teacher"
    bpp = index["bytes_per_position"]
    assert bpp["payload"] == 6 * (2 + 2) + 2 and bpp["files"] > bpp["payload"] and bpp["dense_fp16_logits"] == 42
    sampled = write_cache(tmp_path / "s", _items("sampled"), dtype="fp16")
    assert sampled["dtypes"] == {"indices": "int16", "log_probs": "float16", "counts": "uint8"}
    assert (sampled["n"], sampled["proposal_temperature"]) == (7, 1.0)


def test_reading_an_item_opens_only_its_shard(tmp_path):
    write_cache(tmp_path / "c", _items("topk"), shard_positions=1)  # one item per shard
    ds = CachedTeacherDataset(tmp_path / "c")
    for shard in ds.index["shards"][1:]:
        (tmp_path / "c" / shard["file"]).unlink()  # only shard 0 is left
    assert ds[0].shape == (2, 3)
    with pytest.raises(TeacherCacheError, match="shard-00001"):
        ds[1]


def test_dataloader_batches_items_of_one_shape(tmp_path):
    z = _randn((6, 3, 17), seed=50, dtype=torch.float32)
    write_cache(tmp_path / "c", (topk_target(z[i], 4) for i in range(6)), shard_positions=7)
    ds = CachedTeacherDataset(tmp_path / "c")
    ds[0]
    ds_copy = copy.deepcopy(ds)  # what DataLoader workers get: open shards are not carried over
    assert ds_copy._open == {} and torch.equal(ds_copy[5].indices, ds[5].indices)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_targets))
    assert len(batches) == 3 and batches[0].shape == (2, 3)
    s = _randn((2, 3, 17), seed=51, dtype=torch.float32)
    torch.testing.assert_close(sparse_forward_kl(s, batches[1]),
                               sparse_forward_kl(s, topk_target(z[2:4], 4)))


def test_an_interrupted_write_leaves_no_partial_cache(tmp_path):
    def broken():
        yield from _items("topk")[:3]
        raise RuntimeError("teacher crashed")

    parent = tmp_path / "caches"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        write_cache(parent / "c", broken(), shard_positions=1)  # shards were already written
    assert list(parent.iterdir()) == []  # neither the cache nor its temporary folder
    write_cache(parent / "c", _items("topk"))
    with pytest.raises(RuntimeError):
        write_cache(parent / "c", broken(), overwrite=True)
    assert len(CachedTeacherDataset(parent / "c")) == 5  # the old cache is intact
    assert sorted(p.name for p in parent.iterdir()) == ["c"]


def test_write_cache_refuses_bad_arguments_by_name(tmp_path):
    write_cache(tmp_path / "c", _items("topk"))
    with pytest.raises(TeacherCacheError, match=r"folder=.*does not exist yet.*overwrite=True"):
        write_cache(tmp_path / "c", _items("topk"))
    assert write_cache(tmp_path / "c", _items("topk")[:2], overwrite=True)["items"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TeacherCacheError, match="does not delete folders it did not write"):
        write_cache(tmp_path / "other", _items("topk"), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(TeacherCacheError, match=r"targets\[1\]=.*kind: 'sampled' vs 'topk'"):
        write_cache(tmp_path / "d", [_items("topk")[0], _items("sampled")[0]])
    with pytest.raises(TeacherCacheError, match=r"targets\[1\]=.*temperature: 2\.0 vs 1\.0"):
        write_cache(tmp_path / "d", [_items("topk")[0], _items("topk", T=2.0)[0]])
    with pytest.raises(TeacherCacheError, match=r"targets\[0\]='Tensor'"):
        write_cache(tmp_path / "d", [torch.zeros(3)])
    with pytest.raises(TeacherCacheError, match="targets='an empty iterable'"):
        write_cache(tmp_path / "d", [])
    with pytest.raises(TeacherCacheError, match="dtype='int8'"):
        write_cache(tmp_path / "d", _items("topk"), dtype="int8")
    with pytest.raises(TeacherCacheError, match="shard_positions=0"):
        write_cache(tmp_path / "d", _items("topk"), shard_positions=0)
    assert not (tmp_path / "d").exists()


def test_a_corrupt_or_foreign_cache_is_refused(tmp_path):
    write_cache(tmp_path / "c", _items("topk"), shard_positions=10)
    shard = tmp_path / "c" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    CachedTeacherDataset(tmp_path / "c")  # the size check passes
    with pytest.raises(TeacherCacheError, match="SHA-256 differs"):
        CachedTeacherDataset(tmp_path / "c", verify="sha256")
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(TeacherCacheError, match="truncated"):
        CachedTeacherDataset(tmp_path / "c")
    with pytest.raises(TeacherCacheError, match=r"folder=.*index.json"):
        CachedTeacherDataset(tmp_path / "nowhere")
    (tmp_path / "c" / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TeacherCacheError, match="this kdq reads"):
        CachedTeacherDataset(tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# the figures and the snippet of docs/cached_teacher.md
# ---------------------------------------------------------------------------------------------


def test_bytes_per_position_quoted_in_the_docs(tmp_path):
    figures = {("topk", 8): 34, ("topk", 32): 130, ("topk", 64): 258, ("sampled", 12): 60}
    for (kind, size), expected in figures.items():
        assert payload_bytes_per_position(kind, size, vocab=2048, dtype="fp16") == expected
    assert payload_bytes_per_position("sampled", 12, vocab=2048, dtype="fp16", self_proposal=False) == 96
    doc = (ROOT / "docs" / "cached_teacher.md").read_text()
    for expected in figures.values():
        assert f"| {expected} |" in doc
    # measured: the files of a cache of ten [K=4, T=50] items at vocab 2048 stay within 2% of the payload
    z = _randn((10, 4, 50, 2048), seed=60, dtype=torch.float32)
    idx = write_cache(tmp_path / "c", (topk_target(z[i], 8) for i in range(10)), dtype="fp16")
    assert idx["bytes_per_position"]["payload"] <= idx["bytes_per_position"]["files"] <= 1.02 * 34


def test_docs_snippet_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "cached_teacher.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "snippet.py"
    script.write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(script), run_name="__main__")
    assert ns["student_logits"].grad is not None and len(ns["dataset"]) == 8
