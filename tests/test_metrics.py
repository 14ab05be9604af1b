"""kdq.metrics: Frechet distance against closed forms and a plain eigenvalue reference; scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdq.metrics import (
    FrechetError,
    FrechetNumericalError,
    ScoreError,
    clap_score,
    clap_scores,
    frechet_bootstrap,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_reference,
    retention,
    retention_table,
    retrieval_recall,
)


reference_frechet = frechet_distance_reference


def _sets(seed: int, n: int = 200, m: int = 150, d: int = 8):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    a = rng.normal(size=(n, d)) @ mix
    b = rng.normal(size=(m, d)) @ (mix + 0.5 * rng.normal(size=(d, d))) + rng.normal(size=d)
    return a, b


def test_identical_sets_give_zero():
    a, _ = _sets(0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 12))
def test_mean_shift_gives_squared_norm(seed, d):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(60, d)) @ rng.normal(size=(d, d))
    shift = rng.normal(size=d) * 3
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    var_a=st.lists(st.floats(0.01, 50.0), min_size=1, max_size=10),
    data=st.data(),
)
def test_known_diagonal_covariances(var_a, data):
    d = len(var_a)
    var_b = data.draw(st.lists(st.floats(0.01, 50.0), min_size=d, max_size=d))
    mu_a = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=d, max_size=d)))
    mu_b = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=d, max_size=d)))
    va, vb = np.array(var_a), np.array(var_b)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    got = frechet_distance_from_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_known_diagonal_covariance_from_samples():
    # Rows +-sigma_i on axis i only: sample mean is exactly 0 and covariance exactly diagonal.
    sig_a, sig_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])

    def samples(sig):
        rows = []
        for i, s in enumerate(sig):
            e = np.zeros(len(sig))
            e[i] = s
            rows += [e, -e]
        x = np.array(rows)
        return x * np.sqrt((len(x) - 1) / 2)  # unbiased covariance diag(sig^2)

    expected = ((sig_a - sig_b) ** 2).sum()
    assert frechet_distance(samples(sig_a), samples(sig_b)) == pytest.approx(expected, rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 16))
def test_matches_plain_reference_and_is_symmetric(seed, d):
    a, b = _sets(seed, n=80, m=50, d=d)
    fd = frechet_distance(a, b)
    assert fd == pytest.approx(reference_frechet(a, b), rel=1e-6, abs=1e-8)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-8, abs=1e-10)
    assert fd >= 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_invariant_to_common_rotation_and_translation(seed):
    a, b = _sets(seed)
    rng = np.random.default_rng(seed + 1)
    q, _ = np.linalg.qr(rng.normal(size=(a.shape[1], a.shape[1])))
    t = rng.normal(size=a.shape[1]) * 10
    assert frechet_distance(a @ q + t, b @ q + t) == pytest.approx(frechet_distance(a, b), rel=1e-7)


def test_fewer_samples_than_dims_is_finite_and_near_reference():
    # Rank-deficient covariances (N < D): the near-singular path.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(7, 32)) + 0.3
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(reference_frechet(a, b), rel=1e-3)


def test_exactly_singular_covariance():
    a = np.zeros((10, 4))
    a[:, 0] = np.arange(10)  # variance on one axis only
    b = a.copy()
    b[:, 1] = np.arange(10)[::-1]
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-4, abs=1e-4)


def test_invalid_covariance_raises_numerical_error():
    with pytest.raises(FrechetNumericalError, match="imaginary"):
        frechet_distance_from_stats(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.ones((5, 3)), np.ones((5, 4)), "dim 3"),
        (np.ones((1, 3)), np.ones((5, 3)), "at least 2 rows"),
        (np.ones(5), np.ones((5, 1)), "2-D"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), np.ones((3, 2)), "NaN"),
        (np.ones((3, 2)), np.array([[0.0, np.inf], [1.0, 2.0]]), "embeddings_b has NaN or infinite values in 1"),
    ],
)
def test_errors(a, b, match):
    with pytest.raises(FrechetError, match=match) as info:
        frechet_distance(a, b)
    assert isinstance(info.value, ValueError)


def test_stats_shape_mismatch_error():
    with pytest.raises(FrechetError, match="sigma_b.shape"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_bootstrap_reports_n_bias_and_is_seeded():
    a, b = _sets(5, n=120, m=90, d=4)
    est = frechet_bootstrap(a, b, n_boot=60, seed=1)
    assert est.value == pytest.approx(frechet_distance(a, b))
    assert (est.n_a, est.n_b, est.n_boot, est.level) == (120, 90, 60, 0.95)
    assert 0 <= est.low < est.high and est.bias > 0  # resampled sets repeat rows: replicates sit higher
    assert est == frechet_bootstrap(a, b, n_boot=60, seed=1)
    assert set(est.to_dict()) >= {"value", "low", "high", "bias", "n_a", "n_b"}
    with pytest.raises(FrechetError, match="n_boot"):
        frechet_bootstrap(a, b, n_boot=3)
    with pytest.raises(FrechetError, match="level"):
        frechet_bootstrap(a, b, level=1.5)


def test_bootstrap_interval_covers_a_known_distance():
    # Population distance 1 (unit mean shift, equal covariances); N=100 estimates are biased up by
    # about 0.3-0.5, so a percentile interval would almost never cover 1. The basic interval should.
    rng = np.random.default_rng(0)
    shift = np.eye(8)[0]
    covered = 0
    for trial in range(20):
        a, b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + shift
        est = frechet_bootstrap(a, b, n_boot=50, seed=trial)
        covered += est.low <= 1.0 <= est.high
    assert covered >= 16  # nominal 95%: 19 of 20 expected


def test_small_sample_bias_shrinks_with_n():
    # Two draws of one distribution: FD > 0, larger at small N (the bias docs/metrics.md describes).
    rng = np.random.default_rng(0)
    def mean_fd(n):
        return np.mean([frechet_distance(rng.normal(size=(n, 8)), rng.normal(size=(n, 8))) for _ in range(20)])
    small, large = mean_fd(40), mean_fd(640)
    assert small > 4 * large > 0


def test_clap_score_is_mean_paired_cosine():
    t = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    a = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    assert clap_score(t, a) == pytest.approx((1.0 - 1.0 + np.sqrt(0.5)) / 3)
    np.testing.assert_allclose(clap_scores(t, a), [1.0, -1.0, np.sqrt(0.5)])  # per prompt, hand-computed
    with pytest.raises(ScoreError, match="one clip per prompt"):
        clap_score(t, a[:2])
    with pytest.raises(ScoreError, match="all-zero"):
        clap_score(t, np.zeros((3, 2)))


def test_retrieval_recall_with_labels_and_chance():
    keys = np.eye(4)
    queries = np.array([[1.0, 0.1, 0, 0], [0, 0, 0.2, 1.0], [0, 1.0, 0.9, 0]])
    out = retrieval_recall(queries, keys, query_labels=["a", "b", "c"], key_labels=["a", "x", "c", "b"], ks=(1, 2))
    # q0 -> key0 'a' hit; q1 -> key3 'b' hit; q2 -> key1 'x' miss at 1, key2 'c' hit at 2.
    assert out["R@1"] == pytest.approx(2 / 3)
    assert out["R@2"] == pytest.approx(1.0)
    assert out["chance@1"] == pytest.approx(0.25)
    assert out["chance@2"] == pytest.approx(0.5)


def test_retention_defined_once_both_directions():
    assert retention(0.4, 0.3, higher_is_better=True) == pytest.approx(0.75)
    assert retention(5.0, 10.0, higher_is_better=False) == pytest.approx(0.5)
    table = retention_table(
        {"fad_encodec": 5.0, "clap_score_clap-mini-proxy": 0.4, "n_generated": 10},
        {"fad_encodec": 4.0, "clap_score_clap-mini-proxy": 0.2, "n_generated": 10},
    )
    assert table == pytest.approx({"retention_fad_encodec": 1.25, "retention_clap_score_clap-mini-proxy": 0.5})
    # Undefined (negative score) is None in a table, an error in the scalar function.
    assert retention_table({"clap_score_x": 0.3}, {"clap_score_x": -0.2}) == {"retention_clap_score_x": None}
    with pytest.raises(ScoreError, match="compressed=0.0"):
        retention(1.0, 0.0, higher_is_better=False)
    with pytest.raises(ScoreError, match="baseline=-0.1"):
        retention(-0.1, 0.2, higher_is_better=True)


def test_bootstrap_resamples_clips_when_given_per_clip_frames():
    """Frames of one clip are correlated: resampling frames understates the spread of a clip-level FAD."""
    rng = np.random.default_rng(3)

    def clips(n, shift):  # each clip: 40 frames around its own random centre
        return [rng.normal(size=(1, 3)) * 2 + shift + 0.1 * rng.normal(size=(40, 3)) for _ in range(n)]

    a, b = clips(30, 0.0), clips(30, 4.0)
    by_clip = frechet_bootstrap(a, b, n_boot=100, seed=0)
    by_frame = frechet_bootstrap(np.concatenate(a), np.concatenate(b), n_boot=100, seed=0)
    assert by_clip.value == pytest.approx(by_frame.value) and (by_clip.n_a, by_clip.n_b) == (1200, 1200)
    assert by_clip.high - by_clip.low > 2 * (by_frame.high - by_frame.low)
    # one row per clip is the same as an array of rows (same draws, same replicates)
    rows = np.concatenate([c[:1] for c in a]), np.concatenate([c[:1] for c in b])
    assert frechet_bootstrap([r[None] for r in rows[0]], [r[None] for r in rows[1]], n_boot=20, seed=4) == \
        frechet_bootstrap(*rows, n_boot=20, seed=4)
    with pytest.raises(FrechetError, match="one embedding width"):
        frechet_bootstrap([np.ones((2, 3)), np.ones((2, 4))], b, n_boot=20)
