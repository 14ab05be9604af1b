"""Paired bootstrap: is system A better than system B on the same prompts, beyond resampling noise?

Two systems (teacher and student, fp32 and int8) generate one clip (or one set of rows) per prompt
``i = 1..N``, both scored against the same reference set R. The quantity is::

    delta = metric(A, R) - metric(B, R)

Each replicate draws N prompt indices with replacement and uses the **same** indices for A and B
(so prompt difficulty, which both systems share, cancels instead of adding noise), and draws the
reference units with replacement, once per replicate, shared by A and B. Resampling the reference
makes the interval cover the difference the systems would show against another reference set of the
same size and source (the reference is a sample too, and a FAD difference does depend on which
reference clips were drawn); sharing the draw between A and B keeps the part of that noise that
cancels in the difference cancelled. ``resample_reference=False`` conditions on the reference set
instead (narrower; the claim is then about this reference only). A metric without a reference (a
mean of per-item scores such as key accuracy) passes ``ref=None``.

The interval is the basic bootstrap interval ``[2 delta - q_hi, 2 delta - q_lo]`` of the replicate
differences, as for ``frechet_bootstrap``: FAD and KAD replicates are biased upward by repeated
units, and that bias cancels between A and B only as far as the two systems' spreads are alike. A
difference is "within noise" when the interval covers 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from kdq.errors import KdqError, bad_value
from kdq.metrics.kernel_distance import (
    KAD_SCALE,
    _as_items,
    _check_bandwidth,
    _check_pair,
    _units_guard,
    basic_interval,
    check_boot_args,
    kad_from_sums,
    kernel_sums,
    median_bandwidth,
)

__all__ = ["PairedBootstrapError", "PairedEstimate", "paired_bootstrap", "paired_kad_bootstrap"]


class PairedBootstrapError(KdqError):
    """Inputs a paired bootstrap cannot run on (unpaired systems, bad settings)."""


@dataclass(frozen=True)
class PairedEstimate:
    """``metric(A) - metric(B)`` with a paired bootstrap interval (see the module docstring).

    ``estimate`` is ``a_value - b_value`` on the full sets; ``low``/``high`` the basic interval at
    ``level``; ``within_noise`` is True when ``low <= 0 <= high``; ``bias`` the mean replicate
    difference minus ``estimate``. ``n_items`` prompts, ``n_ref`` reference units.
    """

    estimate: float
    low: float
    high: float
    within_noise: bool
    a_value: float
    b_value: float
    bias: float
    level: float
    n_items: int
    n_ref: int
    n_boot: int
    resample_reference: bool

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


class _Items:
    """N items, each one row (an array's rows, or scalars of a 1-D array) or a block of rows."""

    def __init__(self, x: object, arg: str):
        if isinstance(x, np.ndarray) or not isinstance(x, Sequence) or not all(np.ndim(p) == 2 for p in x):
            arr = np.asarray(x)
            if arr.ndim == 0 or len(arr) == 0:
                raise bad_value(PairedBootstrapError, f"{arg}.shape", arr.shape, "one entry per item (N >= 1)")
            self.rows, self.blocks = arr, None
        else:
            if len(x) == 0:
                raise bad_value(PairedBootstrapError, arg, "[]", "at least one item")
            self.rows, self.blocks = None, [np.asarray(p) for p in x]

    def __len__(self) -> int:
        return len(self.rows) if self.blocks is None else len(self.blocks)

    def take(self, idx: np.ndarray | None) -> np.ndarray:
        if self.blocks is None:
            return self.rows if idx is None else self.rows[idx]
        chosen = self.blocks if idx is None else [self.blocks[i] for i in idx]
        return np.concatenate(chosen)


def _draw(rng: np.random.Generator, n: int, n_ref: int, resample_reference: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One replicate's prompt indices, then (if resampled) reference indices: the shared order of draws."""
    idx = rng.integers(0, n, n)
    ridx = rng.integers(0, n_ref, n_ref) if resample_reference and n_ref else None
    return idx, ridx


def _summary(a_value, b_value, reps, level, n, n_ref, n_boot, resample_reference) -> PairedEstimate:
    delta = float(a_value - b_value)
    low, high = basic_interval(delta, reps, level)
    return PairedEstimate(
        delta, low, high, bool(low <= 0.0 <= high), float(a_value), float(b_value), float(reps.mean() - delta),
        float(level), int(n), int(n_ref), int(n_boot), bool(resample_reference),
    )


def paired_bootstrap(
    fn: Callable[[np.ndarray, np.ndarray | None], float],
    a: object,
    b: object,
    ref: object = None,
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    resample_reference: bool = True,
) -> PairedEstimate:
    """Interval for ``fn(A, ref) - fn(B, ref)`` resampling prompts jointly for A and B.

    Args:
        fn: the metric, called as ``fn(rows_of_a_system, rows_of_ref)`` (``ref`` None when no
            reference is given): e.g. ``frechet_distance``, ``lambda x, r: kad(x, r, bandwidth=h)``
            (fix the bandwidth, else every replicate re-derives it from its resampled reference;
            ``paired_kad_bootstrap`` is the fast equivalent), or ``lambda x, _: float(np.mean(x))``
            for per-item scores.
        a: system A's items, one per prompt: an array whose entry i is prompt i's row (or score),
            or a list of per-prompt arrays [rows_i, D] (e.g. frame embeddings of clip i), stacked
            after resampling.
        b: system B's items for the same prompts in the same order (same N).
        ref: the reference set (array of rows or list of per-clip arrays), or None.
        n_boot: replicates (>= 10).
        seed: for the resampling generator.
        level: central interval mass in (0, 1).
        resample_reference: resample the reference once per replicate, shared by A and B (the
            default), or keep it fixed.

    Returns:
        ``PairedEstimate``; its ``estimate`` equals ``fn(a, ref) - fn(b, ref)`` exactly.

    Raises:
        PairedBootstrapError: A and B with different numbers of prompts, empty inputs, bad settings.
    """
    check_boot_args(n_boot, level, PairedBootstrapError)
    if not callable(fn):
        raise bad_value(PairedBootstrapError, "fn", fn, "a callable fn(rows, ref_rows) -> float")
    ia, ib = _Items(a, "a"), _Items(b, "b")
    if len(ia) != len(ib):
        raise bad_value(
            PairedBootstrapError, "len(b)", len(ib), f"{len(ia)} items to match a (one per prompt, same order)",
            "score both systems on the same prompts; drop a prompt from both when one lacks a score",
        )
    ir = None if ref is None else _Items(ref, "ref")
    n, n_ref = len(ia), (0 if ir is None else len(ir))
    full_ref = None if ir is None else ir.take(None)
    a_value, b_value = float(fn(ia.take(None), full_ref)), float(fn(ib.take(None), full_ref))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for r in range(n_boot):
        idx, ridx = _draw(rng, n, n_ref, resample_reference)
        rr = None if ir is None else ir.take(ridx)
        reps[r] = float(fn(ia.take(idx), rr)) - float(fn(ib.take(idx), rr))
    return _summary(a_value, b_value, reps, level, n, n_ref, n_boot, resample_reference)


def paired_kad_bootstrap(
    a: object,
    b: object,
    ref: object,
    *,
    bandwidth: float | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    resample_reference: bool = True,
    scale: float = KAD_SCALE,
) -> PairedEstimate:
    """``paired_bootstrap`` for ``kad(A, ref) - kad(B, ref)``, from kernel sums computed once.

    Same arguments, draws and result as ``paired_bootstrap(lambda x, r: kad(x, r, bandwidth=h), a, b,
    ref, ...)`` with ``h = bandwidth`` or ``median_bandwidth`` of all reference rows (tests compare
    the two), but each replicate costs a few [units, units] quadratic forms instead of three kernel
    matrices over all rows: per-clip frame embeddings (thousands of rows) bootstrap in seconds.
    """
    check_boot_args(n_boot, level, PairedBootstrapError)
    xa, sa = _as_items(a, "a")
    xb, sb = _as_items(b, "b")
    xr, sr = _as_items(ref, "ref")
    if len(sa) != len(sb):
        raise bad_value(
            PairedBootstrapError, "len(b)", len(sb), f"{len(sa)} items to match a (one per prompt, same order)",
            "score both systems on the same prompts",
        )
    _check_pair(xa, xr, "a", "ref")
    _check_pair(xb, xr, "b", "ref")
    for n_units, arg in ((len(sa), "a"), (len(sr), "ref")):
        _units_guard(n_units, arg)
    h = median_bandwidth(xr) if bandwidth is None else _check_bandwidth(bandwidth)
    s_aa = kernel_sums(xa, sa, xa, sa, h, same=True)
    s_bb = kernel_sums(xb, sb, xb, sb, h, same=True)
    s_rr = kernel_sums(xr, sr, xr, sr, h, same=True)
    s_ar = kernel_sums(xa, sa, xr, sr, h)
    s_br = kernel_sums(xb, sb, xr, sr, h)
    n, n_ref = len(sa), len(sr)
    ones, ones_r = np.ones(n), np.ones(n_ref)
    a_value = kad_from_sums(s_aa, s_rr, s_ar, sa, sr, ones, ones_r, scale=scale)
    b_value = kad_from_sums(s_bb, s_rr, s_br, sb, sr, ones, ones_r, scale=scale)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for r in range(n_boot):
        idx, ridx = _draw(rng, n, n_ref, resample_reference)
        w = np.bincount(idx, minlength=n).astype(np.float64)
        w_r = ones_r if ridx is None else np.bincount(ridx, minlength=n_ref).astype(np.float64)
        reps[r] = kad_from_sums(s_aa, s_rr, s_ar, sa, sr, w, w_r, scale=scale) - kad_from_sums(
            s_bb, s_rr, s_br, sb, sr, w, w_r, scale=scale
        )
    return _summary(a_value, b_value, reps, level, n, n_ref, n_boot, resample_reference)
