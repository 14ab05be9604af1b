"""Choosing one dtype per group: a multiple-choice knapsack solved exactly with ``scipy.optimize.milp``.

With groups ``g``, candidate dtypes ``d``, measured sensitivity ``s[g, d]`` and exact bytes ``b[g, d]``,
binary ``x[g, d]`` picks one dtype per group (``sum_d x[g, d] = 1``):

- ``max_bytes=B``:        minimise ``sum s x``  subject to ``rest + sum b x <= B``;
- ``max_sensitivity=S``:  minimise ``sum b x``  subject to ``sum s x <= S``;

plus any extra cost columns ``c_k[g, d]`` with ``sum c_k x <= limit_k`` (e.g. latency measured on the
target runtime). Ties are broken lexicographically by a second solve: among the least-sensitive
plans the smallest one (and among the smallest the least sensitive); candidates that are exactly
equivalent for a group (same bytes, sensitivity and extra costs) resolve to the first listed. ``rest`` is the bytes of
modules in no group. A choice whose sensitivity is not finite (inf/NaN: the converted model broke)
is never picked. Budgets are checked again in exact integer/float arithmetic after the solve.

The additive model (a plan's sensitivity is the sum of its groups' sensitivities, each measured with
only that group converted) is an approximation; ``MixedPrecisionPlanner.measure`` reports predicted
against measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kdq.errors import bad_value
from kdq.quant.errors import BudgetError


@dataclass(frozen=True)
class Solution:
    """A chosen dtype index per group with its totals.

    Attributes:
        choice: index into the candidate list, one per group.
        bytes: rest + sum of chosen bytes.
        sensitivity: sum of chosen sensitivities.
        extra: total of each extra cost column.
    """

    choice: tuple[int, ...]
    bytes: int
    sensitivity: float
    extra: dict[str, float]


def _total(coeff: np.ndarray, ch: tuple[int, ...]) -> float:
    return float(sum(coeff[g, d] for g, d in enumerate(ch)))


def _milp(c: np.ndarray, rows: list[tuple[np.ndarray, float]], allowed: np.ndarray) -> tuple[int, ...] | None:
    """One MILP: minimise ``sum c x`` with one choice per group and ``sum coeff x <= limit`` rows.

    Each coefficient matrix is shifted by its per-group minimum (a constant, since every group picks
    exactly one); float ones are scaled so HiGHS's absolute tolerances act far below the spread of
    the choices; the relative MIP gap is 1e-9 (the default 1e-4 is not exact enough).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    G, D = c.shape
    n = G * D

    def shifted(coeff: np.ndarray) -> tuple[np.ndarray, float, float]:
        m = np.where(allowed, coeff, np.inf).min(axis=1)
        sh = np.where(allowed, coeff - m[:, None], 0.0)
        top = float(sh.max())
        integral = bool(np.all(sh == np.round(sh))) and top < 2**52
        # Integer rows (bytes) stay as they are: HiGHS then meets them exactly. Float rows are scaled
        # so their largest spread is 1e6 and the absolute tolerances (1e-7, 1e-6) become ~1e-13.
        return sh, float(m.sum()), 1.0 if integral or top == 0 else top / 1e6

    A_eq = np.zeros((G, n))
    for g in range(G):
        A_eq[g, g * D : (g + 1) * D] = 1.0
    cons = [LinearConstraint(A_eq, 1.0, 1.0)]
    for coeff, limit in rows:
        sh, const, scale = shifted(np.asarray(coeff, dtype=float))
        if limit - const < -1e-12 * max(1.0, abs(const)):
            return None  # even the per-group minima exceed this limit
        cons.append(LinearConstraint(sh.reshape(1, n) / scale, -np.inf, max(limit - const, 0.0) / scale))
    sh, _, scale = shifted(np.asarray(c, dtype=float))
    res = milp(
        c=sh.reshape(n) / scale, constraints=cons, integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), allowed.reshape(n).astype(float)), options={"mip_rel_gap": 1e-9},
    )
    if res.status != 0 or res.x is None:
        return None
    return tuple(int(i) for i in np.round(res.x).reshape(G, D).argmax(axis=1))


def _lexicographic(
    primary: np.ndarray, secondary: np.ndarray, rows: list[tuple[np.ndarray, float]], allowed: np.ndarray
) -> tuple[int, ...] | None:
    """Least ``primary``, ties broken by least ``secondary``, every row met in exact arithmetic.

    Two MILPs (the second minimises ``secondary`` with ``primary`` held at its optimum), then an
    exact polish: single-group changes that keep every row and improve (primary, secondary), until
    none does. The polish removes the last differences below the solver's tolerances.
    """
    G, D = primary.shape
    eps = 1e-12 * (float(np.abs(primary).max()) or 1.0)
    eps2 = 1e-12 * (float(np.abs(secondary).max()) or 1.0)

    def feasible(ch: tuple[int, ...]) -> bool:
        return all(allowed[g, d] for g, d in enumerate(ch)) and all(_total(cf, ch) <= lim for cf, lim in rows)

    def better(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        pa, pb = _total(primary, a), _total(primary, b)
        if pa < pb - eps:
            return True
        return abs(pa - pb) <= eps and _total(secondary, a) < _total(secondary, b) - eps2

    work = list(rows)
    for _ in range(5):
        ch = _milp(primary, work, allowed)
        if ch is None:
            return None
        span = float(np.abs(primary).max()) or 1.0
        ch2 = _milp(secondary, work + [(primary, _total(primary, ch) + 1e-9 * span)], allowed)
        cands = [x for x in (ch2, ch) if x is not None and feasible(x)]
        if cands:
            best = cands[0] if len(cands) == 1 or better(cands[0], cands[1]) else cands[1]
            improved = True
            while improved:
                improved = False
                for g in range(G):
                    for d in range(D):
                        if d == best[g] or not allowed[g, d]:
                            continue
                        alt = best[:g] + (d,) + best[g + 1 :]
                        if feasible(alt) and better(alt, best):
                            best, improved = alt, True
            return best
        # The solver's tolerance let a row slip: tighten the violated rows by the excess and retry.
        work = [
            (cf, lim - max(0.0, _total(cf, ch) - lim) - 1e-9 * (float(np.abs(cf).max()) or 1.0)) for cf, lim in work
        ]
    return None


def solve_mckp(
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    *,
    rest_bytes: int = 0,
    max_bytes: int | None = None,
    max_sensitivity: float | None = None,
    extra: Mapping[str, tuple[np.ndarray, float]] | None = None,
) -> Solution:
    """Solve the multiple-choice knapsack exactly (see the module docstring).

    Args:
        sensitivity: ``[groups, dtypes]`` float; non-finite entries are forbidden choices.
        nbytes: ``[groups, dtypes]`` int bytes.
        rest_bytes: bytes outside all groups, added to every total.
        max_bytes: size budget (exactly one of ``max_bytes``/``max_sensitivity``).
        max_sensitivity: quality budget.
        extra: name -> (``[groups, dtypes]`` cost, limit) constraints.

    Raises:
        BudgetError: the budget is unreachable; the message names the smallest reachable size or the
            least reachable sensitivity.
    """
    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    if s.shape != b.shape or s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise BudgetError(f"sensitivity and bytes must be [groups, dtypes] of one shape, got {s.shape} and {b.shape}")
    if (max_bytes is None) == (max_sensitivity is None):
        raise BudgetError("pass exactly one of max_bytes=... or max_sensitivity=...")
    if max_bytes is not None:
        _check_budget("max_bytes", max_bytes, "a finite number of bytes", finite=True)
    if max_sensitivity is not None:
        _check_budget("max_sensitivity", max_sensitivity, "a number, not NaN (inf: no quality limit)", finite=False)
    G, D = s.shape
    allowed = np.isfinite(s)
    if not allowed.any(axis=1).all():
        bad = [g for g in range(G) if not allowed[g].any()]
        raise BudgetError(f"groups {bad} have no candidate with a finite sensitivity; keep fp32 among the candidates")
    s_f = np.where(allowed, s, 0.0)
    big = np.where(allowed, b, 0)  # forbidden choices are fixed to 0 by their bounds
    extra = dict(extra or {})
    rows_extra = []
    for name, (cost, limit) in extra.items():
        cost = np.asarray(cost, dtype=float)
        if cost.shape != s.shape:
            raise BudgetError(f"extra cost {name!r} has shape {cost.shape}, expected {s.shape}")
        rows_extra.append((np.where(allowed, cost, 0.0), float(limit)))

    def canonical(ch: tuple[int, ...]) -> tuple[int, ...]:
        # Among candidates with identical bytes, sensitivity and extra costs, keep the first listed
        # (fp32 before int4 for a convolution that int4 leaves in fp32): same totals, clearer plan.
        out = []
        for g, d in enumerate(ch):
            same = [
                d2 for d2 in range(D)
                if allowed[g, d2] and b[g, d2] == b[g, d] and s_f[g, d2] == s_f[g, d]
                and all(np.asarray(c, float)[g, d2] == np.asarray(c, float)[g, d] for c, _ in extra.values())
            ]
            out.append(min(same))
        return tuple(out)

    def totals(ch: tuple[int, ...]) -> Solution:
        ch = canonical(ch)
        return Solution(
            choice=ch,
            bytes=int(rest_bytes + sum(int(b[g, d]) for g, d in enumerate(ch))),
            sensitivity=float(sum(s_f[g, d] for g, d in enumerate(ch))),
            extra={k: float(sum(np.asarray(c, float)[g, d] for g, d in enumerate(ch))) for k, (c, _) in extra.items()},
        )

    min_bytes = int(rest_bytes + np.where(allowed, b, np.iinfo(np.int64).max).min(axis=1).sum())
    min_sens = float(np.where(allowed, s_f, np.inf).min(axis=1).sum())
    if max_bytes is not None:
        if int(max_bytes) < min_bytes:
            raise BudgetError(
                f"max_bytes={int(max_bytes)} is unreachable: the smallest reachable size with these groups "
                f"and candidates is {min_bytes} bytes ({min_bytes / 1e6:.2f} MB); raise the budget or add "
                "smaller candidates (int8/int4) or more groups"
            )
        rows = [(big.astype(float), float(int(max_bytes) - rest_bytes))] + rows_extra
        ch = _lexicographic(s_f, big.astype(float), rows, allowed)
        if ch is None:
            raise BudgetError(_extra_msg(extra, f"max_bytes={int(max_bytes)}"))
        return totals(ch)
    limit = float(max_sensitivity)  # type: ignore[arg-type]
    if limit < min_sens - 1e-12 * max(1.0, abs(min_sens)):
        raise BudgetError(
            f"max_sensitivity={max_sensitivity!r} is unreachable: the least reachable total sensitivity is "
            f"{min_sens:.6g} (every group at its least sensitive candidate); raise the budget"
        )
    rows = [(s_f, limit + 1e-12 * max(1.0, abs(limit)))] + rows_extra
    ch = _lexicographic(big.astype(float), s_f, rows, allowed)
    if ch is None:
        raise BudgetError(_extra_msg(extra, f"max_sensitivity={max_sensitivity!r}"))
    return totals(ch)


def _check_budget(arg: str, value: object, allowed: str, *, finite: bool) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or math.isnan(value) or (finite and math.isinf(value)):  # type: ignore[arg-type]
        raise bad_value(BudgetError, arg, value, allowed, "pass e.g. max_bytes=1_000_000_000 or max_sensitivity=0.05")


def _extra_msg(extra: Mapping, budget: str) -> str:
    names = ", ".join(f"{k} <= {v[1]:g}" for k, v in extra.items())
    return f"no assignment meets {budget} together with the extra limits ({names}); relax one of them"


def pareto_frontier(
    sensitivity: np.ndarray, nbytes: np.ndarray, *, rest_bytes: int = 0, points: int = 32
) -> list[Solution]:
    """Optimal (bytes, sensitivity) trade-offs: the least sensitivity at ``points`` byte budgets
    spread from the smallest to the largest reachable size, dominated points removed, by bytes."""
    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    allowed = np.isfinite(s)
    lo = int(rest_bytes + np.where(allowed, b, np.iinfo(np.int64).max // 4).min(axis=1).sum())
    hi = int(rest_bytes + np.where(allowed, b, 0).max(axis=1).sum())
    budgets = sorted({int(round(v)) for v in np.linspace(lo, hi, max(2, points))})
    sols = {}
    for budget in budgets:
        sol = solve_mckp(s, b, rest_bytes=rest_bytes, max_bytes=budget)
        sols[sol.choice] = sol
    out = sorted(sols.values(), key=lambda x: (x.bytes, x.sensitivity))
    front: list[Solution] = []
    for sol in out:
        if not front or sol.sensitivity < front[-1].sensitivity - 1e-15:
            front.append(sol)
    return front


def brute_force(
    sensitivity: Sequence[Sequence[float]],
    nbytes: Sequence[Sequence[int]],
    *,
    rest_bytes: int = 0,
    max_bytes: int | None = None,
    max_sensitivity: float | None = None,
    extra: Mapping[str, tuple[np.ndarray, float]] | None = None,
) -> tuple[float, int] | None:
    """Reference for tests: the optimal (objective, secondary) by enumerating every assignment.

    Same contract as ``solve_mckp``: non-finite sensitivities are forbidden choices, every extra cost
    column must stay within its limit, and ties on the objective go to the better secondary (fewer
    bytes under ``max_bytes``, less sensitivity under ``max_sensitivity``). None if nothing is feasible.
    """
    import itertools

    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    costs = [(np.asarray(c, dtype=float), float(lim)) for c, lim in (extra or {}).values()]
    best = None
    for ch in itertools.product(*[range(s.shape[1])] * s.shape[0]):
        if not all(math.isfinite(s[g, d]) for g, d in enumerate(ch)):
            continue
        tot_s = float(sum(s[g, d] for g, d in enumerate(ch)))
        tot_b = int(rest_bytes + sum(int(b[g, d]) for g, d in enumerate(ch)))
        if any(float(sum(c[g, d] for g, d in enumerate(ch))) > lim for c, lim in costs):
            continue
        if max_bytes is not None and tot_b <= max_bytes:
            key = (tot_s, tot_b)
        elif max_sensitivity is not None and tot_s <= max_sensitivity:
            key = (tot_b, tot_s)
        else:
            continue
        if best is None or key < best:
            best = key
    return best
