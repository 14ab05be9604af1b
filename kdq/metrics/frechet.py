"""Frechet distance between Gaussian fits of two embedding sets (the "D" of FAD and FID).

For embeddings ``a`` [N, D] and ``b`` [M, D] with means ``mu_a, mu_b`` and covariances ``S_a, S_b``
(unbiased, ``N - 1`` in the denominator)::

    FD(a, b) = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

This is the squared 2-Wasserstein distance between the two Gaussians (Dowson & Landau 1982), as
used by FID (Heusel et al. 2017) and FAD (Kilgour et al. 2019). Everything runs in float64. The
matrix square root is scipy's Schur-method ``sqrtm``; when it fails or is inaccurate (singular or
near-singular covariances, e.g. fewer samples than dimensions) both covariances get a small
diagonal offset ``eps * I`` and it is taken again. ``S_a S_b`` is similar to a PSD matrix, so its
square root is real in exact arithmetic: an imaginary residue is discarded only when it is
negligible against the real part, and raises ``FrechetNumericalError`` otherwise.

The estimate is biased upward by finite sample size (Chong & Forsyth 2020; Gui et al. 2024): two
independent draws of the same distribution give a positive value that shrinks roughly like 1/N.
Compare values only at equal N, and report N with them (``frechet_bootstrap`` does).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from kdq.errors import KdqError, bad_value

__all__ = [
    "FrechetError",
    "FrechetEstimate",
    "FrechetNumericalError",
    "frechet_bootstrap",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_distance_reference",
    "gaussian_stats",
]

# Relative accuracy a square root must reach, and the largest imaginary residue (relative to the
# real part) that may be discarded.
_SQRTM_RTOL = 1e-6
_IMAG_RTOL = 1e-3


class FrechetError(KdqError):
    """Embeddings that cannot give a Frechet distance (shape, sample count, non-finite values)."""


class FrechetNumericalError(FrechetError):
    """The matrix square root kept a non-negligible imaginary part even after the diagonal offset."""


def _as_embeddings(x: object, arg: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise bad_value(
            FrechetError, f"{arg}.shape", arr.shape, "a 2-D array [num_samples, dim]",
            "stack per-clip embeddings into one array, or reshape a single vector to [1, dim]",
        )
    if arr.shape[0] < 2:
        raise bad_value(
            FrechetError, f"{arg} num_samples", arr.shape[0], "at least 2 rows to estimate a covariance",
            "embed more clips (FAD is only meaningful with many: see the sample-size note in docs/metrics.md)",
        )
    if arr.shape[1] < 1:
        raise bad_value(FrechetError, f"{arg}.shape", arr.shape, "dim >= 1")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise FrechetError(
            f"{arg} has NaN or infinite values in {bad} of {arr.shape[0]} rows; not allowed: the embedder "
            "produced non-finite output (check for silent or clipped audio, or drop those clips)"
        )
    return arr


def gaussian_stats(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of ``embeddings`` [N, D], in float64."""
    x = _as_embeddings(embeddings, "embeddings")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm_product(s_a: np.ndarray, s_b: np.ndarray) -> np.ndarray | None:
    """scipy's square root of ``s_a @ s_b``, or None when it is non-finite or inaccurate."""
    from scipy.linalg import sqrtm

    prod = s_a @ s_b
    # scipy warns on singular input; accuracy is checked below and handled with the offset instead.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = sqrtm(prod)
    if not np.isfinite(root).all():
        return None
    scale = max(np.linalg.norm(prod), np.finfo(np.float64).tiny)
    if np.linalg.norm(root @ root - prod) / scale > _SQRTM_RTOL:
        return None
    return root


def frechet_distance_from_stats(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (see the module docstring).

    Args:
        mu_a: mean [D].
        sigma_a: covariance [D, D].
        mu_b: mean [D].
        sigma_b: covariance [D, D].
        eps: diagonal offset, relative to the mean variance, added to both covariances when the
            plain square root fails or is inaccurate.

    Returns:
        The distance as a Python float (>= 0 up to rounding; tiny negatives are clipped to 0).
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    s_a, s_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    for name, arr, want in (("mu_b", mu_b, (d,)), ("sigma_a", s_a, (d, d)), ("sigma_b", s_b, (d, d))):
        if arr.shape != want:
            raise bad_value(
                FrechetError, f"{name}.shape", arr.shape, f"{want} to match mu_a.shape={mu_a.shape}",
                "both sets must come from the same embedder",
            )
    for name, arr in (("mu_a", mu_a), ("mu_b", mu_b), ("sigma_a", s_a), ("sigma_b", s_b)):
        if not np.isfinite(arr).all():
            raise FrechetError(f"{name} has NaN or infinite values; not allowed: recompute the statistics")
    if eps <= 0:
        raise bad_value(FrechetError, "eps", eps, "a positive float", "use the default 1e-6")

    root = _sqrtm_product(s_a, s_b)
    if root is None:
        offset = eps * max(float(np.trace(s_a) + np.trace(s_b)) / (2 * d), 1.0) * np.eye(d)
        s_a, s_b = s_a + offset, s_b + offset
        root = _sqrtm_product(s_a, s_b)
        if root is None:
            raise FrechetNumericalError(
                f"the square root of sigma_a @ sigma_b is inaccurate even with a diagonal offset of "
                f"{offset[0, 0]:.3g} (eps={eps}); pass a larger eps or reduce the embedding dimension"
            )
    if np.iscomplexobj(root):
        imag = float(np.abs(root.imag).max())
        real = max(float(np.abs(root.real).max()), np.finfo(np.float64).tiny)
        if imag > _IMAG_RTOL * real:
            raise FrechetNumericalError(
                f"the square root of sigma_a @ sigma_b has an imaginary part of {imag:.3g} against a real "
                f"part of {real:.3g} (allowed ratio {_IMAG_RTOL}); the covariances are not valid "
                "(not symmetric positive semi-definite?)"
            )
        root = root.real
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(root))
    return max(value, 0.0)


def frechet_distance(embeddings_a: np.ndarray, embeddings_b: np.ndarray, *, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussian fits of ``embeddings_a`` [N, D] and ``embeddings_b`` [M, D].

    Args:
        embeddings_a: one row per sample (N >= 2), float64 or anything castable to it.
        embeddings_b: one row per sample (M >= 2), same D.
        eps: see ``frechet_distance_from_stats``.

    Returns:
        The distance as a float. Biased upward at small N and M: report them alongside it.

    Raises:
        FrechetError: non-2-D input, fewer than 2 rows, different D, NaN or inf values.
        FrechetNumericalError: the matrix square root could not be made accurate and real.
    """
    a = _as_embeddings(embeddings_a, "embeddings_a")
    b = _as_embeddings(embeddings_b, "embeddings_b")
    if a.shape[1] != b.shape[1]:
        raise bad_value(
            FrechetError, "embeddings_b.shape", b.shape, f"dim {a.shape[1]} to match embeddings_a.shape={a.shape}",
            "embed both sets with the same embedder",
        )
    mu_a, s_a = a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))
    mu_b, s_b = b.mean(axis=0), np.atleast_2d(np.cov(b, rowvar=False))
    return frechet_distance_from_stats(mu_a, s_a, mu_b, s_b, eps=eps)


def frechet_distance_reference(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> float:
    """Plain reference for tests and benchmarks: the trace term from symmetric eigenvalues.

    ``Tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``, a symmetric PSD matrix, with
    negative round-off eigenvalues clipped to 0. No input checks, no offset.
    """
    a, b = np.asarray(embeddings_a, np.float64), np.asarray(embeddings_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_root)


@dataclass(frozen=True)
class FrechetEstimate:
    """A Frechet distance at sample sizes (n_a, n_b), with a bias-corrected bootstrap interval.

    ``value`` is the plain estimate on the full sets (what papers report). ``low``/``high`` is the
    basic (reverse-percentile) bootstrap interval ``[2 value - q_hi, 2 value - q_lo]``: it corrects
    for the small-sample bias and so targets the large-sample distance; it can lie below ``value``.
    ``bias`` is the bootstrap estimate of that bias (mean replicate minus ``value``).
    """

    value: float
    low: float
    high: float
    bias: float
    level: float
    n_a: int
    n_b: int
    n_boot: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


def frechet_bootstrap(
    embeddings_a: np.ndarray | list[np.ndarray],
    embeddings_b: np.ndarray | list[np.ndarray],
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    eps: float = 1e-6,
) -> FrechetEstimate:
    """``frechet_distance`` with a bootstrap interval and bias estimate (see ``FrechetEstimate``).

    Each replicate resamples the units of both sets with replacement (independently, keeping their
    numbers) and recomputes the distance. A unit is a row of an array, or a clip of a per-clip list
    of arrays ``[rows_i, D]`` whose rows stay together: the frames of one clip are correlated, so
    resampling frames would understate the spread (the interval would be too narrow). Replicates sit
    above the full-set value by about the estimate's own small-sample bias, so the plain percentile
    interval would miss the large-sample distance almost always; the basic interval reflects the
    replicates around ``value`` instead (in tests/test_metrics.py it covers a known distance at about
    its nominal rate). Compare systems at equal N.

    Args:
        embeddings_a: [N, D], or a list of per-clip [rows_i, D] arrays.
        embeddings_b: [M, D], or a list of per-clip arrays.
        n_boot: number of bootstrap replicates (>= 10).
        level: central interval mass in (0, 1).
        seed: for the resampling generator.
        eps: see ``frechet_distance_from_stats``.
    """
    if not isinstance(n_boot, int) or n_boot < 10:
        raise bad_value(FrechetError, "n_boot", n_boot, "an int >= 10", "use 200 or more for a stable interval")
    if not 0.0 < level < 1.0:
        raise bad_value(FrechetError, "level", level, "a float in (0, 1)", "e.g. 0.95")
    units_a, units_b = _units(embeddings_a, "embeddings_a"), _units(embeddings_b, "embeddings_b")
    a, b = np.concatenate(units_a), np.concatenate(units_b)
    value = frechet_distance(a, b, eps=eps)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for i in range(n_boot):
        ia = rng.integers(0, len(units_a), len(units_a))
        ib = rng.integers(0, len(units_b), len(units_b))
        reps[i] = frechet_distance(np.concatenate([units_a[j] for j in ia]), np.concatenate([units_b[j] for j in ib]), eps=eps)
    tail = (1.0 - level) / 2 * 100
    q_lo, q_hi = np.percentile(reps, [tail, 100 - tail])
    low, high = max(2 * value - q_hi, 0.0), max(2 * value - q_lo, 0.0)
    return FrechetEstimate(value, float(low), float(high), float(reps.mean() - value), level, len(a), len(b), n_boot)


def _units(x: object, arg: str) -> list[np.ndarray]:
    """Resampling units: the rows of an array (each [1, D]), or the clips of a per-clip list."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise bad_value(FrechetError, arg, "[]", "at least one clip")
        units = [np.asarray(u, dtype=np.float64).reshape(-1, np.shape(u)[-1]) for u in x]
        if len({u.shape[1] for u in units}) != 1:
            raise bad_value(FrechetError, arg, sorted({u.shape[1] for u in units}), "clips with one embedding width")
        _as_embeddings(np.concatenate(units), arg)  # the same checks as for an array of rows
        return units
    rows = _as_embeddings(x, arg)
    return list(rows[:, None, :])
