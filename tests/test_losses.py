"""kdq.losses divergences: fused fast path vs plain reference (values and gradients), numerics,
masks, reductions, errors, and hypothesis properties."""

from __future__ import annotations

import math
import shutil

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
    LossInputError,
    MaskError,
    ReductionError,
    TemperatureError,
    adaptive_kl,
    forward_kl,
    fused,
    generalized_jsd,
    reference,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
)

# name -> (public fast function, reference per-position function, extra kwargs)
CASES = {
    "forward_kl": (forward_kl, lambda s, t, T, a: reference.forward_kl(s, t, T), False),
    "reverse_kl": (reverse_kl, lambda s, t, T, a: reference.reverse_kl(s, t, T), False),
    "skewed_forward_kl": (skewed_forward_kl, lambda s, t, T, a: reference.skewed_forward_kl(s, t, a, T), True),
    "skewed_reverse_kl": (skewed_reverse_kl, lambda s, t, T, a: reference.skewed_reverse_kl(s, t, a, T), True),
    "adaptive_kl": (adaptive_kl, lambda s, t, T, a: reference.adaptive_kl(s, t, 0.5, T), False),
    "generalized_jsd": (generalized_jsd, lambda s, t, T, a: reference.generalized_jsd(s, t, a, T), "beta"),
}

SHAPES = [(2, 7, 11), (5, 64), (3, 47, 31, 123), (1, 2, 3, 4, 9)]


def _call(name, s, t, *, T=1.0, a=0.1, **kw):
    fn, _, skew = CASES[name]
    if skew is True:
        kw["alpha"] = a
    elif skew == "beta":
        kw["beta"] = a
    return fn(s, t, temperature=T, **kw)


def _ref(name, s, t, *, T=1.0, a=0.1, mask=None, reduction="mean"):
    v = CASES[name][1](s, t, T, a)
    if mask is not None:
        v = torch.where(mask, v, 0.0)
    if reduction == "none":
        return v
    if reduction == "sum":
        return v.sum()
    n = v.numel() if mask is None else int(mask.sum())
    return v.sum() / max(n, 1)


# --------------------------------------------------------------------------------------------
# fast path == reference, values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name, shape):
    T, a = (2.5, 0.3) if len(shape) % 2 else (1.0, 0.1)
    s, t = logits(shape, seed=1), logits(shape, seed=2)
    mask = random_mask(shape[:-1], seed=3)
    got = _call(name, s, t, T=T, a=a, mask=mask, reduction="none")
    want = _ref(name, s, t, T=T, a=a, mask=mask, reduction="none")
    assert got.dtype == torch.float32
    assert_close(got, want)
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(4))
    g_got = torch.autograd.grad((got * w).sum(), (s, t))
    g_want = torch.autograd.grad((want * w).sum(), (s, t))
    for a_, b_ in zip(g_got, g_want):
        assert_close(a_, b_)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp64_tight(name):
    s = logits((4, 6, 29), seed=5, dtype=torch.float64)
    t = logits((4, 6, 29), seed=6, dtype=torch.float64)
    got = _call(name, s, t, T=0.7, a=0.25)
    want = _ref(name, s, t, T=0.7, a=0.25)
    assert got.dtype == torch.float64
    assert_close(got, want)
    for a_, b_ in zip(torch.autograd.grad(got, (s, t)), torch.autograd.grad(want, (s, t))):
        assert_close(a_, b_)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_follow_the_upstream_gradient(name):
    # (w * loss).backward() with w != 1, and a random non-scalar upstream for reduction="none":
    # student and teacher gradients against the reference (an upstream of 1 is not special)
    shape = (3, 5, 29)
    mask = random_mask(shape[:-1], seed=62)
    upstream = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(63), dtype=torch.float64)
    for reduction, w in (("mean", 0.37), ("mean", -2.5), ("sum", 0.37), ("none", upstream)):
        s, t = logits(shape, seed=60, dtype=torch.float64), logits(shape, seed=61, dtype=torch.float64)
        s_ref, t_ref = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        got = _call(name, s, t, T=1.7, a=0.2, mask=mask, reduction=reduction)
        want = _ref(name, s_ref, t_ref, T=1.7, a=0.2, mask=mask, reduction=reduction)
        (w * got).sum().backward()
        (w * want).sum().backward()
        assert_close(s.grad, s_ref.grad)
        assert_close(t.grad, t_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["forward_kl", "skewed_forward_kl", "skewed_reverse_kl", "generalized_jsd"])
def test_half_inputs_match_reference(name, dtype):
    s = logits((3, 5, 40), seed=7, dtype=dtype)
    t = logits((3, 5, 40), seed=8, dtype=dtype)
    got = _call(name, s, t, T=1.5)
    want = _ref(name, s, t, T=1.5)
    assert got.dtype == torch.float32  # computed in fp32 whatever the input dtype
    assert_close(got, want)
    g_got = torch.autograd.grad(got, (s, t))
    g_want = torch.autograd.grad(want, (s, t))
    for a_, b_ in zip(g_got, g_want):
        assert a_.dtype == dtype
        assert_close(a_, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_huge_logits_finite(name, dtype):
    # |logits| = 1e4: softmaxes are one-hot to working precision, log-probabilities are -2e4.
    shape = (2, 3, 17)
    s = (torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(9))) * 1e4).to(dtype)
    t = (torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(10))) * 1e4).to(dtype)
    s.requires_grad_(True)
    t.requires_grad_(True)
    for T in (1.0, 0.5):
        v = _call(name, s, t, T=T, reduction="none")
        assert torch.isfinite(v).all()
        assert (v >= -1e-6).all()
        gs, gt = torch.autograd.grad(v.sum(), (s, t))
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_huge_logits_values_are_right():
    # teacher one-hot on token 0, student one-hot on token 1, T = 1: KL(p||q) = 2e4 exactly-ish,
    # skewed forward KL = -log(alpha) (p is one-hot and q has no mass there).
    s = torch.full((1, 4), -1e4)
    s[0, 1] = 1e4
    t = torch.full((1, 4), -1e4)
    t[0, 0] = 1e4
    assert forward_kl(s, t).item() == pytest.approx(2e4, rel=1e-6)
    assert skewed_forward_kl(s, t, alpha=0.1).item() == pytest.approx(-math.log(0.1), rel=1e-5)
    assert skewed_reverse_kl(s, t, alpha=0.1).item() == pytest.approx(-math.log(0.1), rel=1e-5)


# --------------------------------------------------------------------------------------------
# adaptive KL by hand; the skew's alpha -> 0 limit
# --------------------------------------------------------------------------------------------

LN2 = math.log(2.0)


def _adaptive_everywhere(s, t, head_mass):
    """Adaptive KL by the public fast path, the reference, and kd_terms (one position each)."""
    fast = adaptive_kl(s, t, head_mass=head_mass, reduction="none")
    ref = reference.adaptive_kl(s, t, head_mass)
    terms = fused.kd_terms(s, t, ("adaptive_kl",), head_mass=head_mass)[..., 0]
    return fast, ref, terms


@pytest.mark.parametrize(
    "head_mass, head_weight, value",
    [
        # p = [1/2, 1/4, 1/8, 1/8], q = [1/8, 1/2, 1/4, 1/8]; |p - q| = [3/8, 1/4, 1/8, 0]
        # KL(p||q) = 1/2 ln 4 + 1/4 ln 1/2 + 1/8 ln 1/2 + 1/8 ln 1 = (1 - 1/4 - 1/8) ln 2 = 5/8 ln 2
        # KL(q||p) = 1/8 ln 1/4 + 1/2 ln 2 + 1/4 ln 2 + 1/8 ln 1 = (-1/4 + 1/2 + 1/4) ln 2 = 1/2 ln 2
        # teacher mass before each token, in decreasing order of p: 0, 1/2, 3/4, 7/8
        (0.2, 1 / 2, 9 / 16 * LN2),   # head {0} (the top token always): g = 3/8 | 3/8, (5/8 + 1/2) / 2
        (0.5, 1 / 2, 9 / 16 * LN2),   # head {0}: the prefix {0} reaches 1/2 exactly, token 1 is tail
        (0.6, 5 / 6, 29 / 48 * LN2),  # head {0, 1}: g = 5/8 | 1/8, 5/6 * 5/8 + 1/6 * 1/2 = 29/48
        (0.75, 5 / 6, 29 / 48 * LN2),  # head {0, 1}: the prefix {0, 1} reaches 3/4 exactly
        (0.9, 1.0, 5 / 8 * LN2),      # all head: g_tail = 0, forward KL alone
        (1.0, 1.0, 5 / 8 * LN2),      # all head (7/8 before the last token is below 1)
    ],
)
def test_adaptive_kl_by_hand_dyadic(head_mass, head_weight, value):
    # logits chosen so that float64 softmaxes are exactly the dyadic p and q (checked), so that the
    # ties of the cumulative mass with head_mass at 0.5 and 0.75 are exact
    t = torch.tensor([[0.0, -LN2, -2 * LN2, -2 * LN2]], dtype=torch.float64)
    s = torch.tensor([[0.0, 2 * LN2, LN2, 0.0]], dtype=torch.float64)
    assert torch.softmax(t, -1).tolist() == [[0.5, 0.25, 0.125, 0.125]]
    assert torch.softmax(s, -1).tolist() == [[0.125, 0.5, 0.25, 0.125]]
    w_head, w_tail = reference.adaptive_ratios(s, t, head_mass)
    assert w_head.item() == pytest.approx(head_weight, rel=1e-15)
    assert (w_head + w_tail).item() == 1.0
    for got in _adaptive_everywhere(s, t, head_mass):
        assert got.item() == pytest.approx(value, rel=1e-14)


@pytest.mark.parametrize(
    "head_mass, value",
    [
        # p = [0.7, 0.2, 0.1], q = [0.2, 0.5, 0.3]; |p - q| = [0.5, 0.3, 0.2]
        # KL(p||q) = 0.7 ln 3.5 + 0.2 ln 0.4 + 0.1 ln(1/3)
        #          = 0.876934078 - 0.183258146 - 0.109861229 = 0.583814703
        # KL(q||p) = 0.2 ln(2/7) + 0.5 ln 2.5 + 0.3 ln 3
        #          = -0.250552594 + 0.458145366 + 0.329583687 = 0.537176459
        # teacher mass before each token: 0, 0.7, 0.9
        (0.2, 0.5604955807717762),  # head {0}: g = 0.5 | 0.5, (0.583814703 + 0.537176459) / 2
        (0.5, 0.5604955807717762),  # head {0}
        (0.8, 0.5744870539317797),  # head {0, 1}: g = 0.8 | 0.2, 0.8 * 0.583814703 + 0.2 * 0.537176459
        (0.95, 0.5838147027051154),  # all head: forward KL
    ],
)
def test_adaptive_kl_by_hand_three_tokens(head_mass, value):
    t = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64).log()
    s = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    for got in _adaptive_everywhere(s, t, head_mass):
        assert got.item() == pytest.approx(value, rel=1e-12)
    # the teacher at temperature 2 is flatter: p = softmax(log p / 2) = sqrt(p) / sum(sqrt(p))
    p2 = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).sqrt()
    q2 = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).sqrt()
    p2, q2 = p2 / p2.sum(), q2 / q2.sum()
    gap = (p2 - q2).abs()
    head = 2 if head_mass == 0.8 else (3 if head_mass == 0.95 else 1)  # p2 = 0.49, 0.26, 0.25: before 0, .49, .75
    wh = gap[:head].sum() / gap.sum()
    want = wh * (p2 * (p2 / q2).log()).sum() + (1 - wh) * (q2 * (q2 / p2).log()).sum()
    got = adaptive_kl(s, t, head_mass=head_mass, temperature=2.0, reduction="none")
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("head_mass", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_adaptive_kl_any_head_mass_matches_the_reference(head_mass):
    # the fast path against the reference written from the definition, values and gradients
    shape = (3, 7, 23)
    s, t = logits(shape, seed=70, dtype=torch.float64), logits(shape, seed=71, dtype=torch.float64)
    got = adaptive_kl(s, t, head_mass=head_mass, temperature=1.4, reduction="none")
    want = reference.adaptive_kl(s, t, head_mass, 1.4)
    assert_close(got, want)
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(72), dtype=torch.float64)
    for a_, b_ in zip(torch.autograd.grad((got * w).sum(), (s, t)), torch.autograd.grad((want * w).sum(), (s, t))):
        assert_close(a_, b_)


@pytest.mark.parametrize("name", ["skewed_forward_kl", "skewed_reverse_kl"])
def test_skew_tends_to_the_unskewed_divergence(name):
    # alpha = 0 is short-cut to the unskewed kernel in both paths, so equality there proves
    # nothing. The limit alpha -> 0 does. KL(p || p + (1 - alpha)(q - p)) - KL(p || q)
    # = -sum p log(1 + alpha (p/q - 1)) = alpha (1 - sum p^2 / q) + O(alpha^2) (swap p and q for the
    # reverse one): the value's gap divided by alpha must approach that coefficient, and the gap of
    # the gradients must close linearly in alpha.
    plain = {"skewed_forward_kl": forward_kl, "skewed_reverse_kl": reverse_kl}[name]
    fn = CASES[name][0]
    T = 1.3
    # logits of scale 1: p / q stays moderate, so the O(alpha) terms are small at alpha = 1e-6
    s = logits((4, 7, 31), seed=73, scale=1.0, dtype=torch.float64)
    t = logits((4, 7, 31), seed=74, scale=1.0, dtype=torch.float64)
    p, q = torch.softmax(t.detach() / T, -1), torch.softmax(s.detach() / T, -1)
    if name == "skewed_reverse_kl":
        p, q = q, p
    slope = 1.0 - (p * p / q).sum(-1)
    base = plain(s, t, temperature=T, reduction="none")
    g_base = torch.autograd.grad(base.sum(), (s, t))
    g_gaps = []
    for a in (1e-4, 1e-5, 1e-6):
        v = fn(s, t, alpha=a, temperature=T, reduction="none")
        g = torch.autograd.grad(v.sum(), (s, t))
        torch.testing.assert_close((v.detach() - base.detach()) / a, slope, rtol=200 * a * slope.abs().max().item(), atol=0)
        g_gaps.append(max((x - y).abs().max().item() for x, y in zip(g, g_base)))
    assert g_gaps[-1] < 1e-4 * max(x.abs().max().item() for x in g_base)
    for g1, g2 in zip(g_gaps, g_gaps[1:]):
        assert 8 < g1 / g2 < 12  # first order in alpha


# --------------------------------------------------------------------------------------------
# masks and reductions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_masked_positions_exactly_zero_gradient_even_with_nan(name):
    shape = (2, 6, 13)
    mask = random_mask(shape[:-1], seed=11, p=0.5)
    s0, t0 = logits(shape, seed=12, grad=False), logits(shape, seed=13, grad=False)
    s0[~mask] = float("nan")  # padding garbage must not leak
    t0[~mask] = float("inf")
    s, t = s0.requires_grad_(), t0.requires_grad_()
    for reduction in ("none", "sum", "mean"):
        v = _call(name, s, t, T=1.3, mask=mask, reduction=reduction)
        assert torch.isfinite(v).all()
        if reduction == "none":
            assert (v[~mask] == 0).all()
        gs, gt = torch.autograd.grad(v.sum(), (s, t))
        assert (gs[~mask] == 0).all() and (gt[~mask] == 0).all()
        assert torch.isfinite(gs[mask]).all() and (gs[mask] != 0).any()


def test_reductions_and_empty_mask():
    s, t = logits((3, 4, 9), seed=14), logits((3, 4, 9), seed=15)
    mask = random_mask((3, 4), seed=16)
    per = forward_kl(s, t, mask=mask, reduction="none")
    assert per.shape == (3, 4)
    assert torch.allclose(forward_kl(s, t, mask=mask, reduction="sum"), per.sum())
    assert torch.allclose(forward_kl(s, t, mask=mask, reduction="mean"), per.sum() / mask.sum())
    assert torch.allclose(forward_kl(s, t), forward_kl(s, t, reduction="none").mean())
    none = torch.zeros(3, 4, dtype=torch.bool)
    v = forward_kl(s, t, mask=none)
    assert v.item() == 0.0 and not torch.isnan(v)
    (g,) = torch.autograd.grad(v, s)
    assert (g == 0).all()


def test_no_t2_factor_in_functions():
    # forward_kl at T=2 is exactly KL of the softened distributions: no T**2 applied.
    s, t = logits((4, 10), seed=17, grad=False), logits((4, 10), seed=18, grad=False)
    p = torch.softmax(t / 2, -1)
    q = torch.softmax(s / 2, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert forward_kl(s, t, temperature=2.0).item() == pytest.approx(want.item(), rel=1e-5)


def test_fast_terms_chunked_equals_one_chunk_all_terms():
    s, t = logits((6, 5, 21), seed=19), logits((6, 5, 21), seed=20)
    labels = torch.randint(0, 21, (6, 5), generator=torch.Generator().manual_seed(21))
    kw = dict(temperature=1.7, alpha=0.2, labels=labels)
    one = fused.kd_terms(s, t, fused.TERMS, chunk_elements=10**9, **kw)
    many = fused.kd_terms(s, t, fused.TERMS, chunk_elements=21 * 4, **kw)
    assert torch.equal(one, many)  # same arithmetic per row, whatever the chunking


@pytest.mark.parametrize("w", [1.0, 0.37, -2.5])
def test_kd_loss_gradient_matches_reference_with_cross_entropy(w):
    # every term, random per-position coefficients, student and teacher gradients, and an upstream
    # gradient w: 1 takes the backward's hand-over of the stored gradient, the others scale it
    shape = (3, 4, 7, 33)
    s, t = logits(shape, seed=22, dtype=torch.float64), logits(shape, seed=23, dtype=torch.float64)
    labels = torch.randint(0, 33, shape[:-1], generator=torch.Generator().manual_seed(24))
    coef = torch.rand(*shape[:-1], len(fused.TERMS), generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    loss, values = fused.kd_loss(s, t, fused.TERMS, coef, temperature=1.9, alpha=0.15, head_mass=0.3,
                                 labels=labels, chunk_elements=33 * 5)
    ref = torch.stack([reference.forward_kl(s, t, 1.9), reference.reverse_kl(s, t, 1.9),
                       reference.skewed_forward_kl(s, t, 0.15, 1.9), reference.skewed_reverse_kl(s, t, 0.15, 1.9),
                       reference.adaptive_kl(s, t, 0.3, 1.9), reference.cross_entropy(s, labels)], -1)
    ref_loss = (coef * ref).sum()
    assert_close(loss, ref_loss)
    assert_close(values, ref.detach())
    for a_, b_ in zip(torch.autograd.grad(w * loss, (s, t)), torch.autograd.grad(w * ref_loss, (s, t))):
        assert_close(a_, b_)


def test_kd_loss_backward_runs_once_per_call():
    # The gradient is computed in the forward pass and released at the first backward (handed
    # over to .grad when the upstream is 1). A second backward through a retained graph used to
    # return that tensor again although .grad now shared its memory: accumulating twice then
    # failed with a version-counter error (for logits of rank >= 3 only). It is refused clearly.
    s, t = logits((2, 3, 4, 9), seed=64), logits((2, 3, 4, 9), seed=65)
    coef = torch.rand(2, 3, 4, 1, generator=torch.Generator().manual_seed(66))
    for w in (1.0, 0.5):
        s.grad = None
        loss, _ = fused.kd_loss(s, t, ("forward_kl",), coef)
        (w * loss).backward(retain_graph=True)
        first = s.grad.clone()
        s.grad.mul_(2.0)  # in place, as clip_grad_norm_ and zero_grad(set_to_none=False) do
        with pytest.raises(RuntimeError, match="second time"):
            (w * loss).backward()
        assert torch.equal(s.grad, 2.0 * first)
        # accumulation over separate calls is unaffected
        s.grad = None
        for _ in range(3):
            (w * fused.kd_loss(s, t, ("forward_kl",), coef)[0]).backward()
        assert_close(s.grad, 3.0 * first)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler (the kernel falls back to eager)")
def test_compiled_kernel_matches_eager():
    import warnings

    shape = (2, 3, 5, 37)
    s, t = logits(shape, seed=26), logits(shape, seed=27)
    coef = torch.rand(*shape[:-1], 4, generator=torch.Generator().manual_seed(28))
    terms = fused.TERMS[:4]
    eager = fused.kd_loss(s, t, terms, coef, temperature=2.0, alpha=0.1, chunk_elements=37 * 7)[0]
    (g_eager,) = torch.autograd.grad(eager, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would hide the compile
        for T in (2.0, 1.4):  # a new temperature must not need a new kernel
            comp = fused.kd_loss(s, t, terms, coef, temperature=T, alpha=0.1, chunk_elements=37 * 7,
                                 compile=True)[0]
            want = fused.kd_loss(s, t, terms, coef, temperature=T, alpha=0.1, chunk_elements=37 * 7)[0]
            assert_close(comp, want)
    assert not fused._compile_failed
    (g_comp,) = torch.autograd.grad(
        fused.kd_loss(s, t, terms, coef, temperature=2.0, alpha=0.1, chunk_elements=37 * 7, compile=True)[0], s)
    assert_close(g_comp, g_eager)


@pytest.fixture
def fresh_compile_state(monkeypatch):
    """A process with no compiled kernel yet and no earlier compilation failure (restored after)."""
    monkeypatch.setattr(fused, "_compiled_kernel", None)
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.delenv("KDQ_COMPILE", raising=False)


def _kd_loss_grads(compile, **kw):
    s, t = logits((2, 3, 5, 37), seed=80, **kw), logits((2, 3, 5, 37), seed=81, **kw)
    coef = torch.rand(2, 3, 5, len(fused.TERMS), generator=torch.Generator().manual_seed(82), dtype=s.dtype)
    labels = torch.randint(0, 37, (2, 3, 5), generator=torch.Generator().manual_seed(83))
    loss, values = fused.kd_loss(s, t, fused.TERMS, coef, temperature=1.6, alpha=0.2, labels=labels,
                                 chunk_elements=37 * 7, compile=compile)
    return (loss, values, *torch.autograd.grad(loss, (s, t)))


@pytest.mark.parametrize("when", ["wrapping", "first call"])
def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, fresh_compile_state, when):
    # torch.compile can refuse when asked (no compiler, unsupported platform): that used to escape
    # the fallback, which only covered failures inside the compiled call
    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    if when == "wrapping":
        monkeypatch.setattr(torch, "compile", refuse)
    else:
        monkeypatch.setattr(fused, "_compiled_kernel", refuse)
    with pytest.warns(RuntimeWarning, match=r"torch\.compile of the fused loss failed \(RuntimeError: no C\+\+ compiler"):
        got = _kd_loss_grads(True, dtype=torch.float64)
    assert fused._compile_failed
    assert not fused.compile_enabled("auto") and not fused.compile_enabled(True)  # no retry in this process
    want = _kd_loss_grads(False, dtype=torch.float64)
    for a_, b_ in zip(got, want):
        assert torch.equal(a_, b_)  # the eager path's values, bit for bit
    # and the eager path is right: the reference, student and teacher gradients
    s, t = logits((2, 3, 5, 37), seed=80, dtype=torch.float64), logits((2, 3, 5, 37), seed=81, dtype=torch.float64)
    coef = torch.rand(2, 3, 5, len(fused.TERMS), generator=torch.Generator().manual_seed(82), dtype=torch.float64)
    labels = torch.randint(0, 37, (2, 3, 5), generator=torch.Generator().manual_seed(83))
    ref = torch.stack([reference.forward_kl(s, t, 1.6), reference.reverse_kl(s, t, 1.6),
                       reference.skewed_forward_kl(s, t, 0.2, 1.6), reference.skewed_reverse_kl(s, t, 0.2, 1.6),
                       reference.adaptive_kl(s, t, 0.5, 1.6), reference.cross_entropy(s, labels)], -1)
    ref_loss = (coef * ref).sum()
    assert_close(got[0], ref_loss)
    for a_, b_ in zip(got[2:], torch.autograd.grad(ref_loss, (s, t))):
        assert_close(a_, b_)


def test_kdq_compile_switch(monkeypatch, fresh_compile_state):
    # StageMixedKL(compile="auto") compiles for logits of at least AUTO_COMPILE_MIN_ELEMENTS (2**22)
    # elements unless KDQ_COMPILE=0; an explicit compile=True compiles whatever KDQ_COMPILE says.
    # A spy stands in for torch.compile; the threshold is lowered to keep the logits small.
    from kdq.losses import StageMixedKL, stage_mixed

    assert stage_mixed.AUTO_COMPILE_MIN_ELEMENTS == 1 << 22
    monkeypatch.setattr(stage_mixed, "AUTO_COMPILE_MIN_ELEMENTS", 2 * 4 * 8 * 64)
    calls = []

    def spy(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    s, t = logits((2, 4, 8, 64), seed=84, grad=False), logits((2, 4, 8, 64), seed=85, grad=False)
    kd = StageMixedKL(10, weights={"forward_kl": 1.0})
    want = StageMixedKL(10, weights={"forward_kl": 1.0}, compile=False)(s, t, step=0)
    monkeypatch.setenv("KDQ_COMPILE", "0")
    assert torch.equal(kd(s, t, step=0), want) and calls == []
    assert torch.equal(StageMixedKL(10, weights={"forward_kl": 1.0}, compile=True)(s, t, step=0), want)
    assert calls == [{"dynamic": False}]
    monkeypatch.setattr(fused, "_compiled_kernel", None)
    calls.clear()
    monkeypatch.setenv("KDQ_COMPILE", "1")
    kd(s[:, :, 1:], t[:, :, 1:], step=0)
    assert calls == []  # below the threshold: not worth a compilation
    assert torch.equal(kd(s, t, step=0), want)
    assert calls == [{"dynamic": False}]
    monkeypatch.delenv("KDQ_COMPILE")
    assert fused.compile_enabled("auto") and not fused.compile_enabled(False)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _check_error(exc_type, arg, fn, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, KdqError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, LossInputError)
    assert arg in str(info.value)
    return str(info.value)


def test_errors():
    s, t = logits((2, 3, 8), seed=29), logits((2, 3, 8), seed=30)
    msg = _check_error(LogitsShapeError, "teacher_logits", forward_kl, s, logits((2, 3, 9), seed=1))
    assert "vocabulary" in msg and "(2, 3, 8)" in msg
    _check_error(LogitsShapeError, "teacher_logits", reverse_kl, s, logits((2, 4, 8), seed=1))
    _check_error(LogitsShapeError, "student_logits", forward_kl, torch.ones(2, 3, 8, dtype=torch.long), t)
    _check_error(LogitsShapeError, "teacher_logits", forward_kl, s, [1.0])
    msg = _check_error(LogitsShapeError, "student_logits", forward_kl, torch.zeros(2, 0), torch.zeros(2, 0))
    assert "V >= 1" in msg  # an empty vocabulary raised a raw RuntimeError from reshape
    msg = _check_error(MaskError, "mask", forward_kl, s, t, mask=torch.ones(2, 3, 8, dtype=torch.bool))
    assert "(2, 3)" in msg
    _check_error(MaskError, "mask", forward_kl, s, t, mask=torch.ones(2, 3))
    for bad in (0.0, -1.0, float("nan"), float("inf"), "hot"):
        _check_error(TemperatureError, "temperature", skewed_forward_kl, s, t, temperature=bad)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        msg = _check_error(AlphaError, "alpha", skewed_forward_kl, s, t, alpha=bad)
        assert "[0, 1)" in msg
        _check_error(AlphaError, "alpha", skewed_reverse_kl, s, t, alpha=bad)
    msg = _check_error(ReductionError, "reduction", forward_kl, s, t, reduction="avg")
    assert "'mean'" in msg
    for bad in (0.0, 1.0):
        _check_error(AlphaError, "beta", generalized_jsd, s, t, beta=bad)
    _check_error(LossInputError, "head_mass", adaptive_kl, s, t, head_mass=0.0)


# --------------------------------------------------------------------------------------------
# hypothesis properties
# --------------------------------------------------------------------------------------------

PROP = settings(max_examples=25, deadline=None)
rows = st.integers(1, 6)
vocab = st.integers(2, 40)
seeds = st.integers(0, 2**31 - 1)
temps = st.floats(0.3, 5.0)
alphas = st.floats(0.01, 0.95)
scales = st.floats(0.1, 20.0)


@PROP
@given(rows, vocab, seeds, temps, alphas, scales, st.sampled_from(list(CASES)))
def test_prop_nonnegative_and_minimal_when_equal(n, v, seed, T, a, scale, name):
    s, t = logits((n, v), seed=seed, scale=scale, grad=False), logits((n, v), seed=seed + 1, scale=scale, grad=False)
    val = _call(name, s, t, T=T, a=a, reduction="none")
    assert (val >= -1e-6).all()
    # student == teacher is a minimum: value 0 AND gradient 0 for both logits (a zero value alone
    # holds for many wrong formulas, e.g. any multiple of log p - log q; a zero gradient does not)
    s2, t2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    same = _call(name, s2, t2, T=T, a=a, reduction="none")
    assert same.abs().max() <= 1e-5
    for g in torch.autograd.grad(same.sum(), (s2, t2)):
        assert g.abs().max() <= 1e-5 * (1 + 1 / T)


@PROP
@given(rows, vocab, seeds, temps, alphas, scales)
def test_prop_skew_limits(n, v, seed, T, a, scale):
    s, t = logits((n, v), seed=seed, scale=scale, grad=False), logits((n, v), seed=seed + 1, scale=scale, grad=False)
    kw = dict(temperature=T, reduction="none")
    # KL(p || a p + (1 - a) q) is convex in a and 0 at a = 1: it does not increase with a, from the
    # unskewed value at a = 0 (likewise the reverse one)
    a2 = a + (1.0 - a) / 2
    for skewed, plain in ((skewed_forward_kl, forward_kl), (skewed_reverse_kl, reverse_kl)):
        lo, hi = skewed(s, t, alpha=a2, **kw), skewed(s, t, alpha=a, **kw)
        assert (lo <= hi + 1e-5 * (1 + hi)).all()
        assert (hi <= plain(s, t, **kw) * (1 + 1e-5) + 1e-5).all()
    bound = -math.log(a) + 1e-5
    assert (skewed_forward_kl(s, t, alpha=a, **kw) <= bound).all()
    assert (skewed_reverse_kl(s, t, alpha=a, **kw) <= bound).all()
    hb = -a * math.log(a) - (1 - a) * math.log1p(-a) + 1e-5  # binary entropy bounds the JSD
    assert (generalized_jsd(s, t, beta=a, **kw) <= hb).all()


@PROP
@given(rows, vocab, seeds, temps, alphas, st.sampled_from(list(CASES)), st.floats(-50.0, 50.0))
def test_prop_shift_invariance(n, v, seed, T, a, name, c):
    s, t = logits((n, v), seed=seed, grad=False), logits((n, v), seed=seed + 1, grad=False)
    shift = torch.linspace(-1.0, 1.0, n)[:, None] * c  # a different constant per position
    base = _call(name, s, t, T=T, a=a, reduction="none")
    moved = _call(name, s + shift, t - 0.5 * shift, T=T, a=a, reduction="none")
    assert torch.allclose(base, moved, atol=2e-4, rtol=1e-3)


@PROP
@given(st.integers(2, 6), vocab, seeds, temps, alphas, st.sampled_from(list(CASES)))
def test_prop_masked_positions_change_neither_value_nor_gradient(n, v, seed, T, a, name):
    mask = random_mask((n,), seed=seed)
    mask[0] = True
    s, t = logits((n, v), seed=seed), logits((n, v), seed=seed + 1)
    s2 = torch.where(mask[:, None], s.detach(), torch.randn(n, v) * 100).requires_grad_()
    t2 = torch.where(mask[:, None], t.detach(), torch.randn(n, v) * 100).requires_grad_()
    v1 = _call(name, s, t, T=T, a=a, mask=mask)
    v2 = _call(name, s2, t2, T=T, a=a, mask=mask)
    assert torch.equal(v1, v2)
    g1 = torch.autograd.grad(v1, (s, t))
    g2 = torch.autograd.grad(v2, (s2, t2))
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)


@PROP
@given(st.integers(1, 30), vocab, seeds, temps, alphas, st.integers(1, 12))
def test_prop_chunked_equals_unchunked(n, v, seed, T, a, rows_per_chunk):
    s, t = logits((n, v), seed=seed), logits((n, v), seed=seed + 1)
    coef = torch.rand(n, 5, generator=torch.Generator().manual_seed(seed))
    terms = fused.TERMS[:5]
    kw = dict(temperature=T, alpha=a)
    l1, v1 = fused.kd_loss(s, t, terms, coef, chunk_elements=10**9, **kw)
    l2, v2 = fused.kd_loss(s, t, terms, coef, chunk_elements=rows_per_chunk * v, **kw)
    assert torch.equal(v1, v2)
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.autograd.grad(l1, s)[0], torch.autograd.grad(l2, s)[0])


# --------------------------------------------------------------------------------------------
# -inf logits (banned or padded vocabulary entries): 0 log 0 = 0
# --------------------------------------------------------------------------------------------

NEG_INF = float("-inf")
#: A finite logit far enough below the rest that its probability is exactly 0 in float32 and
#: float64: the divergences at -inf are the limit of their values at FAR, and so are the gradients.
FAR = -1e4


def _with(x: torch.Tensor, banned: torch.Tensor, value: float) -> torch.Tensor:
    return x.detach().masked_fill(banned, value).requires_grad_()


def test_teacher_neg_inf_is_kl_div_not_nan():
    # the reproduction: forward_kl(s, t) with t[..., -2:] = -inf returned NaN (0 * inf)
    s = logits((2, 3, 8), seed=40, dtype=torch.float64)
    t0 = logits((2, 3, 8), seed=41, dtype=torch.float64, grad=False)
    banned = torch.zeros(2, 3, 8, dtype=torch.bool)
    banned[..., -2:] = True
    t, t_far = _with(t0, banned, NEG_INF), _with(t0, banned, FAR)
    for T in (1.0, 0.7):
        got = forward_kl(s, t, temperature=T, reduction="none")
        want = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1)
        assert_close(got, want)
        gs, gt = torch.autograd.grad(got.sum(), (s, t))
        assert_close(gs, torch.autograd.grad(want.sum(), s)[0])
        # F.kl_div's own teacher gradient is NaN here; the limit is the gradient at FAR
        (gt_far,) = torch.autograd.grad(reference.forward_kl(s, t_far, T).sum(), t_far)
        assert_close(gt, gt_far)
        assert (gt[banned] == 0).all()


PATTERNS = ("teacher", "student", "both", "same")


def _banned(n: int, v: int, seed: int, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random -inf patterns (student, teacher), at least one finite entry per row of each."""
    g = torch.Generator().manual_seed(seed)
    ban_s = torch.rand(n, v, generator=g) < 0.5
    ban_t = torch.rand(n, v, generator=g) < 0.5
    ban_s.scatter_(1, torch.randint(0, v, (n, 1), generator=g), False)
    ban_t.scatter_(1, torch.randint(0, v, (n, 1), generator=g), False)
    if pattern == "teacher":
        ban_s.zero_()
    elif pattern == "student":
        ban_t.zero_()
    elif pattern == "same":
        ban_s = ban_t.clone()
    return ban_s, ban_t


def _infinite_rows(name, ban_s, ban_t, s, t, T) -> torch.Tensor:
    """Rows whose divergence is +inf: the second distribution of a KL has no mass where the first
    has some (the skewed divergences with alpha > 0 and the JSD are always finite; adaptive KL is
    infinite where an infinite KL has a weight > 0, which rounding can make exactly 0)."""
    student_short = (ban_s & ~ban_t).any(-1)  # KL(p || q) = inf
    teacher_short = (ban_t & ~ban_s).any(-1)  # KL(q || p) = inf
    if name == "adaptive_kl":
        w_head, w_tail = reference.adaptive_ratios(s, t, 0.5, T)
        return (student_short & (w_head > 0)) | (teacher_short & (w_tail > 0))
    return {"forward_kl": student_short, "reverse_kl": teacher_short}.get(name, torch.zeros_like(student_short))


@settings(max_examples=60, deadline=None)
@given(rows, vocab, seeds, temps, alphas, st.sampled_from(list(CASES)), st.sampled_from(PATTERNS))
def test_prop_neg_inf_entries_are_the_limit(n, v, seed, T, a, name, pattern):
    ban_s, ban_t = _banned(n, v, seed, pattern)
    s0, t0 = logits((n, v), seed=seed, grad=False), logits((n, v), seed=seed + 1, grad=False)
    s, t = _with(s0, ban_s, NEG_INF), _with(t0, ban_t, NEG_INF)
    s_far, t_far = _with(s0.double(), ban_s, FAR), _with(t0.double(), ban_t, FAR)
    got = _call(name, s, t, T=T, a=a, reduction="none")
    lim = _ref(name, s_far, t_far, T=T, a=a, reduction="none")
    ref = _ref(name, s.double(), t.double(), T=T, a=a, reduction="none")  # the reference's own -inf handling
    inf_rows = _infinite_rows(name, ban_s, ban_t, s, t, T)
    inf_rows64 = _infinite_rows(name, ban_s, ban_t, s.double(), t.double(), T)
    assert not torch.isnan(got).any() and not torch.isnan(ref).any()
    assert torch.equal(torch.isinf(got), inf_rows) and (got[inf_rows] > 0).all()
    assert torch.equal(torch.isinf(ref), inf_rows64)
    fin = ~inf_rows & ~inf_rows64  # they differ only where adaptive KL's weight rounds to 0
    assert_close(got[fin], lim[fin].float())
    assert_close(ref[fin], lim[fin].detach())
    if pattern == "same":  # equal to the divergence over the remaining entries, row by row
        for r in range(n):
            keep = ~ban_t[r]
            alone = _ref(name, s0[r, keep][None].double(), t0[r, keep][None].double(), T=T, a=a, reduction="none")
            assert_close(got[r : r + 1], alone.float())
    # gradients of the finite rows: finite, and the limit's (exactly 0 where both are -inf)
    w = torch.where(fin, torch.rand(n, generator=torch.Generator().manual_seed(seed)), 0.0)
    g_got = torch.autograd.grad((got * w).sum(), (s, t))
    g_lim = torch.autograd.grad((lim * w.double()).sum(), (s_far, t_far))
    for x, y in zip(g_got, g_lim):
        assert torch.isfinite(x).all()
        assert_close(x, y.float())
        assert (x[ban_s & ban_t] == 0).all()


def test_infinite_divergence_value_and_gradients():
    # Row 1: the student is -inf where the teacher has mass, KL(p || q) = +inf.
    # Row 2: the teacher is -inf where the student has mass, KL(q || p) = +inf.
    # kdq returns +inf for such a row; the gradient with respect to the logits that are -inf is
    # the finite limit (F.kl_div's: (q - p) / T for the student of KL(p || q)); the gradient with
    # respect to the other logits has no finite limit and is NaN on that row; other rows are
    # untouched.
    T = 1.3
    s0, t0 = logits((3, 6), seed=50, dtype=torch.float64, grad=False), logits((3, 6), seed=51, dtype=torch.float64, grad=False)
    s0[1, 2] = NEG_INF
    t0[2, 4] = NEG_INF
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    q, p = torch.softmax(s0 / T, -1), torch.softmax(t0 / T, -1)
    for name, bad, other, finite_grad in (("forward_kl", 1, 2, lambda: (q - p) / T),
                                          ("reverse_kl", 2, 1, lambda: (p - q) / T)):
        fn = CASES[name][0]
        v = fn(s, t, temperature=T, reduction="none")
        assert v[bad] == float("inf") and torch.isfinite(v[[0, other]]).all()
        gs, gt = torch.autograd.grad(v.sum(), (s, t))
        g_finite, g_nan = (gs, gt) if name == "forward_kl" else (gt, gs)
        assert_close(g_finite[bad], finite_grad()[bad])
        assert torch.isnan(g_nan[bad]).all()
        ref = CASES[name][1](s, t, T, 0.0)
        assert_close(v[[0, other]], ref[[0, other]])
        for x, y in zip((gs, gt), torch.autograd.grad(ref[[0, other]].sum(), (s, t))):
            assert_close(x[[0, other]], y[[0, other]])
        # the mean is +inf; its gradient is NaN only on the infinite row
        m = fn(s, t, temperature=T)
        assert m == float("inf")
        gs, gt = torch.autograd.grad(m, (s, t))
        assert torch.isfinite(gs[[0, other]]).all() and torch.isfinite(gt[[0, other]]).all()
    # F.kl_div where it applies (no entry -inf in both): the student's gradient of row 1 included
    v = forward_kl(s, t, temperature=T, reduction="none")
    want = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1)
    assert torch.equal(torch.isinf(v), torch.isinf(want))
    assert_close(v[[0, 2]], want[[0, 2]])
    assert_close(torch.autograd.grad(v.sum(), s)[0], torch.autograd.grad(want.sum(), s)[0])


@pytest.mark.parametrize("T", [1e-39, 1.4e-45, 5e-324, 1e-38])
def test_temperatures_whose_inverse_overflows_are_refused(T):
    # 1 / T is not a finite float32 (or T is subnormal): the logits / T overflow and the loss
    # came out NaN (or, with StageMixedKL's T**2 weight, exactly 0)
    s, t = logits((2, 3, 8), seed=52), logits((2, 3, 8), seed=53)
    for name in CASES:
        msg = _check_error(TemperatureError, "temperature", _call, name, s, t, T=T)
        assert "1.17549e-38" in msg


def test_smallest_accepted_temperature_gives_the_argmax_limit():
    # T = 1.2e-38: softmax(logits / T) is one-hot on the argmax; the divergence is 0 where the
    # argmaxes agree and positive (+inf or a huge number) where they do not: never NaN
    s, t = logits((4, 50, 16), seed=54, grad=False), logits((4, 50, 16), seed=55, grad=False)
    s[:2] = t[:2]  # equal rows: same argmax
    same = s.argmax(-1) == t.argmax(-1)
    for name in CASES:
        v = _call(name, s, t, T=1.2e-38, reduction="none")
        assert not torch.isnan(v).any()
        assert (v[same] == 0).all() and (v[~same] > 0).all()
        if name not in ("forward_kl", "reverse_kl", "adaptive_kl"):
            assert torch.isfinite(v).all()
