"""kdq.metrics.paired_bootstrap: the estimate, identical and shifted systems, coverage, the KAD fast path."""

from __future__ import annotations

import numpy as np
import pytest

from kdq.metrics import (
    PairedBootstrapError,
    frechet_distance,
    kad,
    median_bandwidth,
    paired_bootstrap,
    paired_kad_bootstrap,
)


def mean_score(x, _ref):
    return float(np.mean(x))


def _systems(seed, n=80, d=4, shift_b=0.0, noise=0.3):
    """A and B answer the same prompts: a shared per-prompt part plus each system's own noise."""
    rng = np.random.default_rng(seed)
    prompt = rng.normal(size=(n, d))
    a = prompt + noise * rng.normal(size=(n, d))
    b = prompt + noise * rng.normal(size=(n, d))
    b[:, 0] += shift_b
    ref = rng.normal(size=(n + 20, d)) * np.sqrt(1 + noise**2)
    return a, b, ref


def test_estimate_is_the_difference_of_the_full_set_metric():
    a, b, ref = _systems(0, shift_b=0.5)
    est = paired_bootstrap(frechet_distance, a, b, ref, n_boot=20)
    assert est.estimate == frechet_distance(a, ref) - frechet_distance(b, ref)
    assert (est.a_value, est.b_value) == (frechet_distance(a, ref), frechet_distance(b, ref))
    assert (est.n_items, est.n_ref, est.n_boot) == (80, 100, 20)


def test_identical_systems_give_zero_and_within_noise():
    a, _, ref = _systems(1)
    est = paired_bootstrap(frechet_distance, a, a.copy(), ref, n_boot=30)
    assert (est.estimate, est.low, est.high) == (0.0, 0.0, 0.0)
    assert est.within_noise


def test_same_distribution_systems_cover_zero_at_about_the_nominal_rate():
    covered = [
        paired_bootstrap(frechet_distance, *_systems(seed), n_boot=100, seed=seed).within_noise for seed in range(30)
    ]
    assert np.mean(covered) >= 0.8, np.mean(covered)


def test_clearly_shifted_system_excludes_zero():
    a, b, ref = _systems(2, shift_b=1.0)
    est = paired_bootstrap(frechet_distance, a, b, ref, n_boot=100)
    assert est.estimate < 0 and est.high < 0  # B is further from the reference than A
    assert not est.within_noise
    est_k = paired_kad_bootstrap(a, b, ref, n_boot=100)
    assert est_k.high < 0 and not est_k.within_noise


def test_pairing_narrows_the_interval_for_per_item_scores():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(size=200) * 2.0  # large per-prompt variation both systems share
    a = difficulty + rng.normal(size=200) * 0.3
    b = difficulty + 0.1 + rng.normal(size=200) * 0.3
    paired = paired_bootstrap(mean_score, a, b, n_boot=200)
    assert paired.estimate == pytest.approx(a.mean() - b.mean())
    assert paired.n_ref == 0
    # the same data bootstrapped as if unpaired (B's prompts drawn independently)
    rng2 = np.random.default_rng(0)
    reps = [a[rng2.integers(0, 200, 200)].mean() - b[rng2.integers(0, 200, 200)].mean() for _ in range(200)]
    unpaired_width = np.subtract(*np.percentile(reps, [97.5, 2.5]))
    assert (paired.high - paired.low) < 0.5 * unpaired_width
    assert not paired.within_noise  # a 0.1 shift is visible once prompt difficulty cancels


def test_per_clip_items_are_stacked_for_fn():
    rng = np.random.default_rng(4)
    a = [rng.normal(size=(k, 3)) for k in (4, 2, 5)]
    b = [rng.normal(size=(k, 3)) for k in (3, 3, 1)]
    ref = [rng.normal(size=(k, 3)) for k in (2, 6)]
    seen = []

    def fn(x, r):
        seen.append((x.shape, r.shape))
        return float(x.sum() - r.sum())

    est = paired_bootstrap(fn, a, b, ref, n_boot=10)
    assert seen[0] == ((11, 3), (8, 3)) and seen[1] == ((7, 3), (8, 3))
    assert est.estimate == pytest.approx(fn(np.concatenate(a), np.concatenate(ref)) - fn(np.concatenate(b), np.concatenate(ref)))
    assert all(s[0][1] == 3 and s[1][1] == 3 for s in seen)


@pytest.mark.parametrize("resample_reference", [True, False])
@pytest.mark.parametrize("per_clip", [False, True])
def test_kad_fast_path_matches_the_generic_bootstrap(resample_reference, per_clip):
    rng = np.random.default_rng(5)
    if per_clip:
        a = [rng.normal(size=(k, 3)) for k in rng.integers(1, 6, 15)]
        b = [rng.normal(size=(k, 3)) + 0.3 for k in rng.integers(1, 6, 15)]
        ref = [rng.normal(size=(k, 3)) for k in rng.integers(1, 6, 12)]
        h = median_bandwidth(np.concatenate(ref))
    else:
        a, b, ref = _systems(6, n=30, d=3, shift_b=0.4)
        h = median_bandwidth(ref)
    kw = dict(n_boot=40, seed=7, resample_reference=resample_reference)
    fast = paired_kad_bootstrap(a, b, ref, **kw)
    plain = paired_bootstrap(lambda x, r: kad(x, r, bandwidth=h), a, b, ref, **kw)
    for field in ("estimate", "low", "high", "a_value", "b_value", "bias"):
        assert getattr(fast, field) == pytest.approx(getattr(plain, field), rel=1e-9, abs=1e-9), field
    assert fast.within_noise == plain.within_noise


def test_errors():
    a = np.zeros((5, 2))
    with pytest.raises(PairedBootstrapError, match="len\\(b\\)"):
        paired_bootstrap(mean_score, a, np.zeros((4, 2)))
    with pytest.raises(PairedBootstrapError, match="n_boot"):
        paired_bootstrap(mean_score, a, a, n_boot=3)
    with pytest.raises(PairedBootstrapError, match="level"):
        paired_bootstrap(mean_score, a, a, level=0)
    with pytest.raises(PairedBootstrapError, match="callable"):
        paired_bootstrap("fad", a, a)
    with pytest.raises(PairedBootstrapError, match="one entry per item"):
        paired_bootstrap(mean_score, np.zeros(0), np.zeros(0))
    with pytest.raises(PairedBootstrapError, match="len\\(b\\)"):
        paired_kad_bootstrap(a + np.arange(5)[:, None], np.ones((3, 2)), np.arange(10.0).reshape(5, 2))
