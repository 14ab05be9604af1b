"""kdq.metrics KAD: closed forms, the plain reference, unbiasedness, invariances, the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdq.metrics.kernel_distance as kad_module
from kdq.metrics import KAD_SCALE, KadError, kad, kad_bootstrap, kad_reference, median_bandwidth
from kdq.metrics.kernel_distance import KernelSums, kad_from_sums


def expected_kernel(mean_sq: float, var: float, d: int, h: float) -> float:
    """E exp(-|z|^2 / (2 h^2)) for z ~ N(m, var I_d) with |m|^2 = mean_sq (Gaussian integral)."""
    return (h * h / (h * h + var)) ** (d / 2) * math.exp(-mean_sq / (2 * (h * h + var)))


def gaussian_mmd2(shift: float, var_x: float, var_y: float, d: int, h: float) -> float:
    """Population MMD^2 (x KAD_SCALE) of N(shift e_1, var_x I) and N(0, var_y I), Gaussian kernel h."""
    return KAD_SCALE * (
        expected_kernel(0.0, 2 * var_x, d, h)
        + expected_kernel(0.0, 2 * var_y, d, h)
        - 2 * expected_kernel(shift**2, var_x + var_y, d, h)
    )


# ----------------------------------------------------------------------------- closed forms


def test_point_masses():
    p, q, h = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 0.5]), 1.7
    a, b = np.tile(p, (5, 1)), np.tile(q, (7, 1))
    # within-set kernels are all 1, the cross kernel is exp(-|p - q|^2 / 2h^2)
    expected = KAD_SCALE * (2 - 2 * math.exp(-((p - q) ** 2).sum() / (2 * h * h)))
    assert kad(a, b, bandwidth=h) == pytest.approx(expected, rel=1e-12)
    assert kad_reference(a, b, bandwidth=h) == pytest.approx(expected, rel=1e-12)


def test_small_hand_set():
    # a = {0, 1}, b = {0, 2} on a line, h = 1: within a e^-1/2, within b e^-2,
    # cross (1 + e^-2 + e^-1/2 + e^-1/2) / 4, so MMD^2 = (e^-2 - 1) / 2 (negative: a U-statistic).
    a, b = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    expected = KAD_SCALE * (math.exp(-2) - 1) / 2
    assert kad(a, b, bandwidth=1.0) == pytest.approx(expected, rel=1e-12)
    assert kad_reference(a, b, bandwidth=1.0) == pytest.approx(expected, rel=1e-12)


def test_a_set_against_itself_is_slightly_negative():
    rng = np.random.default_rng(0)
    x, h = rng.normal(size=(40, 3)), 1.5
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    off = (np.exp(-d2 / (2 * h * h)).sum() - len(x)) / (len(x) * (len(x) - 1))
    assert kad(x, x, bandwidth=h) == pytest.approx(-2 * KAD_SCALE * (1 - off) / len(x), rel=1e-10)


def test_gaussians_match_the_closed_form_on_average():
    d, h, n, shift = 3, 1.5, 60, 0.8
    expected = gaussian_mmd2(shift, 1.0, 1.5, d, h)
    vals = []
    for seed in range(150):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, d))
        x[:, 0] += shift
        y = rng.normal(size=(n, d)) * math.sqrt(1.5)
        vals.append(kad(x, y, bandwidth=h))
    se = np.std(vals) / math.sqrt(len(vals))
    assert abs(np.mean(vals) - expected) < 4 * se, (np.mean(vals), expected, se)
    assert expected > 6 * se  # the test can tell the value from 0


def test_unbiased_for_same_distribution():
    vals = []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        vals.append(kad(rng.normal(size=(30, 4)), rng.normal(size=(40, 4)), bandwidth=2.0))
    vals = np.array(vals)
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * se
    assert 0.2 < (vals < 0).mean() < 0.8  # negative values are expected, not clipped


# ------------------------------------------------------------------ reference and invariances


@pytest.mark.parametrize("shape", [(2, 2, 1), (3, 47, 31), (64, 9, 5), (17, 123, 8)])
def test_blocked_matches_reference(shape, monkeypatch):
    m, n, d = shape
    rng = np.random.default_rng(m * n * d)
    x, y = rng.normal(size=(m, d)), rng.normal(size=(n, d)) * 1.3 + 0.2
    want = kad_reference(x, y)
    assert kad(x, y) == pytest.approx(want, rel=1e-9, abs=1e-10)
    monkeypatch.setattr(kad_module, "_BLOCK_ENTRIES", 7)  # many tiny row blocks
    assert kad(x, y) == pytest.approx(want, rel=1e-9, abs=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 30), n=st.integers(2, 30), d=st.integers(1, 6),
       h=st.floats(0.1, 10.0))
def test_symmetric_and_permutation_invariant_with_a_fixed_bandwidth(seed, m, n, d, h):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(m, d)), rng.normal(size=(n, d)) + 0.5
    v = kad(x, y, bandwidth=h)
    assert v == pytest.approx(kad_reference(x, y, bandwidth=h), rel=1e-9, abs=1e-9)
    assert kad(y, x, bandwidth=h) == pytest.approx(v, rel=1e-9, abs=1e-9)
    assert kad(x[rng.permutation(m)], y[rng.permutation(n)], bandwidth=h) == pytest.approx(v, rel=1e-9, abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.floats(0.01, 100.0))
def test_invariant_to_common_scale_rotation_translation(seed, c):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(25, 4)) * 1.5
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    t = rng.normal(size=4) * 10
    v = kad(x, y)  # default bandwidth follows the reference's scale
    assert kad(c * x @ q + t, c * y @ q + t) == pytest.approx(v, rel=1e-6, abs=1e-8)


def test_default_bandwidth_is_the_reference_median():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) * 3
    h = median_bandwidth(y)
    d = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1))[np.triu_indices(20, 1)]
    assert h == pytest.approx(float(np.median(d)), rel=1e-12)
    assert kad(x, y) == pytest.approx(kad(x, y, bandwidth=h), rel=1e-12)
    assert kad(x, y) != pytest.approx(kad(y, x), rel=1e-3)  # the reference sets the kernel


def test_median_bandwidth_subsample_is_seeded_and_close():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 5))
    full = median_bandwidth(x)
    sub = median_bandwidth(x, max_rows=200, seed=3)
    assert sub == median_bandwidth(x, max_rows=200, seed=3)
    assert sub == pytest.approx(full, rel=0.05)


def test_per_clip_lists_equal_stacked_rows():
    rng = np.random.default_rng(3)
    clips = [rng.normal(size=(k, 4)) for k in (3, 7, 1, 5)]
    ref = [rng.normal(size=(k, 4)) for k in (4, 4, 2)]
    assert kad(clips, ref) == pytest.approx(kad(np.concatenate(clips), np.concatenate(ref)), rel=1e-12)
    rows = rng.normal(size=(6, 2)).tolist()  # a nested list of rows is rows, not clips
    assert kad(rows, rows[::-1], bandwidth=1.0) == pytest.approx(kad(np.array(rows), np.array(rows), bandwidth=1.0))


# ------------------------------------------------------------------------------ bootstrap


def _plain_replicate(x_items, y_items, wx, wy, h, exclude_ties):
    """KAD over resampled items by listing row positions, as written (the tests' reference)."""

    def positions(items, w):
        return [(i, c, row) for i, item in enumerate(items) for c in range(int(w[i])) for row in item]

    def within(pos):
        tot = cnt = 0.0
        for p, (i, c, u) in enumerate(pos):
            for q, (j, e, v) in enumerate(pos):
                if p == q or (exclude_ties and i == j and c != e):
                    continue
                tot += math.exp(-((u - v) ** 2).sum() / (2 * h * h))
                cnt += 1
        return tot / cnt

    px, py = positions(x_items, wx), positions(y_items, wy)
    cross = np.mean([math.exp(-((u - v) ** 2).sum() / (2 * h * h)) for _, _, u in px for _, _, v in py])
    return KAD_SCALE * (within(px) + within(py) - 2 * cross)


@pytest.mark.parametrize("exclude_ties", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_replicate_from_sums_matches_a_plain_computation(exclude_ties, grouped):
    rng = np.random.default_rng(4)
    sizes_x, sizes_y = ([2, 1, 3, 2], [1, 3, 2]) if grouped else ([1] * 5, [1] * 4)
    xs = [rng.normal(size=(k, 3)) for k in sizes_x]
    ys = [rng.normal(size=(k, 3)) + 0.3 for k in sizes_y]
    wx, wy = np.array([2.0, 0, 1, 1] if grouped else [0, 3, 1, 1, 0]), np.array([1.0, 0, 2] if grouped else [2, 0, 1, 1])
    h = 1.3
    fx, fy = np.array(sizes_x), np.array(sizes_y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    sums = (KernelSums(x, fx, x, fx, h, same=True).sums, KernelSums(y, fy, y, fy, h, same=True).sums,
            KernelSums(x, fx, y, fy, h).sums, fx, fy)
    got = kad_from_sums(*sums, wx, wy, exclude_ties=exclude_ties)
    assert got == pytest.approx(_plain_replicate(xs, ys, wx, wy, h, exclude_ties), rel=1e-10)
    if not exclude_ties:  # with ties it is plain KAD on the stacked resampled rows
        stack = lambda items, w: np.concatenate([it for it, k in zip(items, w) for _ in range(int(k))])  # noqa: E731
        assert got == pytest.approx(kad_reference(stack(xs, wx), stack(ys, wy), bandwidth=h), rel=1e-10)
    ones_x, ones_y = np.ones(len(fx)), np.ones(len(fy))
    assert kad_from_sums(*sums, ones_x, ones_y, exclude_ties=True) == pytest.approx(
        kad_from_sums(*sums, ones_x, ones_y), rel=1e-12)


def test_bootstrap_reports_value_and_is_seeded():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(50, 3)) + 0.7, rng.normal(size=(60, 3))
    est = kad_bootstrap(x, y, n_boot=50, seed=1)
    assert est.value == pytest.approx(kad(x, y), rel=1e-12)
    assert est.bandwidth == pytest.approx(median_bandwidth(y))
    assert (est.n_a, est.n_b, est.n_boot) == (50, 60, 50)
    assert est.low < est.value < est.high
    assert est == kad_bootstrap(x, y, n_boot=50, seed=1)
    assert est != kad_bootstrap(x, y, n_boot=50, seed=2)
    assert set(est.to_dict()) >= {"value", "low", "high", "bias", "bandwidth"}


def test_bootstrap_interval_covers_a_known_mmd():
    d, h, n, shift = 4, 2.0, 100, 1.0
    truth = gaussian_mmd2(shift, 1.0, 1.0, d, h)
    covered = []
    for t in range(40):
        rng = np.random.default_rng(t)
        x = rng.normal(size=(n, d))
        x[:, 0] += shift
        est = kad_bootstrap(x, rng.normal(size=(n, d)), bandwidth=h, n_boot=200, seed=t)
        covered.append(est.low <= truth <= est.high)
        assert abs(est.bias) < 0.25 * (est.high - est.low)  # ties excluded: replicates centred on value
    assert np.mean(covered) >= 0.85, np.mean(covered)


def test_bootstrap_of_clips_keeps_frames_together():
    rng = np.random.default_rng(6)
    # 12 clips of 20 highly correlated frames: resampling frames would understate the spread
    clips_x = [rng.normal(size=3) + 0.1 * rng.normal(size=(20, 3)) for _ in range(12)]
    clips_y = [rng.normal(size=3) + 0.1 * rng.normal(size=(20, 3)) for _ in range(12)]
    by_clip = kad_bootstrap(clips_x, clips_y, bandwidth=1.5, n_boot=100)
    by_frame = kad_bootstrap(np.concatenate(clips_x), np.concatenate(clips_y), bandwidth=1.5, n_boot=100)
    assert by_clip.value == pytest.approx(by_frame.value, rel=1e-12)
    assert (by_clip.high - by_clip.low) > 2 * (by_frame.high - by_frame.low)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "x, y, kwargs, match",
    [
        (np.zeros(5), np.zeros((5, 2)), {}, "generated.shape"),
        (np.zeros((5, 2)), np.zeros((5, 3)), {}, "reference dim"),
        (np.zeros((1, 2)), np.ones((5, 2)), {"bandwidth": 1.0}, "generated rows"),
        (np.full((5, 2), np.nan), np.zeros((5, 2)), {}, "NaN"),
        (np.zeros((5, 2)), np.ones((5, 2)), {"bandwidth": 0.0}, "bandwidth"),
        (np.zeros((5, 2)), np.ones((5, 2)), {}, "median pairwise distance"),
        (np.zeros((5, 2)), [], {}, "at least one item"),
    ],
)
def test_errors(x, y, kwargs, match):
    with pytest.raises(KadError, match=match):
        kad(x, y, **kwargs)


def test_bootstrap_errors(monkeypatch):
    x = np.random.default_rng(0).normal(size=(20, 2))
    with pytest.raises(KadError, match="n_boot"):
        kad_bootstrap(x, x, n_boot=5)
    with pytest.raises(KadError, match="level"):
        kad_bootstrap(x, x, level=1.5)
    monkeypatch.setattr(kad_module, "_MAX_UNITS", 10)
    with pytest.raises(KadError, match="per-clip arrays"):
        kad_bootstrap(x, x)
    with pytest.raises(KadError, match="at least 2 units"):
        kad_bootstrap([x], [x[:5], x[5:]], bandwidth=1.0)


def test_kernel_sums_are_remembered_by_content_and_equal_the_plain_sums(monkeypatch):
    from kdq.metrics.kernel_distance import kernel_sums

    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(30, 4)), rng.normal(size=(20, 4))
    su, sv = np.array([10, 5, 15]), np.array([12, 8])
    built = []
    real = KernelSums.__init__

    def counting(self, *a, **k):
        built.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(kad_module, "_cache", type(kad_module._cache)())
    monkeypatch.setattr(KernelSums, "__init__", counting)
    first = kernel_sums(u, su, v, sv, 1.5)
    np.testing.assert_array_equal(first, KernelSums(u, su, v, sv, 1.5).sums)
    assert len(built) == 2
    assert kernel_sums(u.copy(), su.copy(), v.copy(), sv.copy(), 1.5) is first  # same content: no new kernel
    assert len(built) == 2 and not first.flags.writeable
    for changed in ((u + 1e-9, su, v, sv, 1.5), (u, np.array([10, 6, 14]), v, sv, 1.5), (u, su, v, sv, 1.6)):
        kernel_sums(*changed)  # any change of content, grouping or bandwidth is computed anew
    assert len(built) == 5
    assert kernel_sums(u, su, u, su, 1.5, same=True) is not kernel_sums(u, su, u, su, 1.5)  # same=True: another entry
    monkeypatch.setattr(kad_module, "_CACHE_BYTES", first.nbytes)  # a bound of one entry drops the oldest
    kernel_sums(v, sv, u, su, 1.5)
    assert len(kad_module._cache) == 1
