"""Choosing one dtype per group: a multiple-choice knapsack solved exactly with ``scipy.optimize.milp``.

With groups ``g``, candidate dtypes ``d``, measured sensitivity ``s[g, d]`` and exact bytes ``b[g, d]``,
binary ``x[g, d]`` picks one dtype per group (``sum_d x[g, d] = 1``):

- ``max_bytes=B``:        minimise ``sum s x``  subject to ``rest + sum b x <= B``;
- ``max_sensitivity=S``:  minimise ``sum b x``  subject to ``sum s x <= S``;

plus any extra cost columns ``c_k[g, d]`` with ``sum c_k x <= limit_k`` (e.g. latency measured on the
target runtime). Ties are broken lexicographically by a second solve: among the least-sensitive
plans the smallest one (and among the smallest the least sensitive). ``rest`` is the bytes of
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


def _milp(c: np.ndarray, G: int, D: int, rows: list[tuple[np.ndarray, float]], allowed: np.ndarray):
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = G * D
    A_eq = np.zeros((G, n))
    for g in range(G):
        A_eq[g, g * D : (g + 1) * D] = 1.0
    cons = [LinearConstraint(A_eq, 1.0, 1.0)]
    for coeff, limit in rows:
        cons.append(LinearConstraint(coeff.reshape(1, n), -np.inf, limit))
    ub = allowed.reshape(n).astype(float)
    res = milp(c=c.reshape(n), constraints=cons, integrality=np.ones(n), bounds=Bounds(np.zeros(n), ub))
    if res.status != 0 or res.x is None:
        return None
    x = np.round(res.x).reshape(G, D)
    return tuple(int(i) for i in x.argmax(axis=1))


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
    G, D = s.shape
    allowed = np.isfinite(s)
    if not allowed.any(axis=1).all():
        bad = [g for g in range(G) if not allowed[g].any()]
        raise BudgetError(f"groups {bad} have no candidate with a finite sensitivity; keep fp32 among the candidates")
    s_f = np.where(allowed, s, 0.0)
    big = np.where(allowed, b, np.iinfo(np.int64).max // (4 * G))
    extra = dict(extra or {})
    rows_extra = []
    for name, (cost, limit) in extra.items():
        cost = np.asarray(cost, dtype=float)
        if cost.shape != s.shape:
            raise BudgetError(f"extra cost {name!r} has shape {cost.shape}, expected {s.shape}")
        rows_extra.append((np.where(allowed, cost, 0.0), float(limit)))

    def totals(ch: tuple[int, ...]) -> Solution:
        return Solution(
            choice=ch,
            bytes=int(rest_bytes + sum(int(b[g, d]) for g, d in enumerate(ch))),
            sensitivity=float(sum(s_f[g, d] for g, d in enumerate(ch))),
            extra={k: float(sum(np.asarray(c, float)[g, d] for g, d in enumerate(ch))) for k, (c, _) in extra.items()},
        )

    min_bytes = int(rest_bytes + big.min(axis=1).sum())
    min_sens = float(np.where(allowed, s_f, np.inf).min(axis=1).sum())
    scale_b = max(1.0, float(b.max()))
    if max_bytes is not None:
        if int(max_bytes) < min_bytes:
            raise BudgetError(
                f"max_bytes={int(max_bytes)} is unreachable: the smallest reachable size with these groups "
                f"and candidates is {min_bytes} bytes ({min_bytes / 1e6:.2f} MB); raise the budget or add "
                "smaller candidates (int8/int4) or more groups"
            )
        cap = float(int(max_bytes) - rest_bytes)
        for _ in range(5):  # tighten if the solver's tolerance let an exact check fail
            rows = [(big / scale_b, cap / scale_b)] + rows_extra
            ch = _milp(s_f, G, D, rows, allowed)
            if ch is None:
                raise BudgetError(_extra_msg(extra, f"max_bytes={int(max_bytes)}"))
            best = totals(ch).sensitivity
            tol = 1e-9 * max(1.0, abs(best))
            ch2 = _milp(big / scale_b, G, D, rows + [(s_f, best + tol)], allowed) or ch
            sol = totals(ch2)
            if sol.bytes <= max_bytes:
                return sol
            cap -= sol.bytes - max_bytes
        raise BudgetError(f"max_bytes={int(max_bytes)}: the solver could not meet the budget exactly")
    limit = float(max_sensitivity)  # type: ignore[arg-type]
    if math.isnan(limit) or limit < min_sens - 1e-12 * max(1.0, abs(min_sens)):
        raise BudgetError(
            f"max_sensitivity={max_sensitivity!r} is unreachable: the least reachable total sensitivity is "
            f"{min_sens:.6g} (every group at its least sensitive candidate); raise the budget"
        )
    rows = [(s_f, limit + 1e-12 * max(1.0, abs(limit)))] + rows_extra
    ch = _milp(big / scale_b, G, D, rows, allowed)
    if ch is None:
        raise BudgetError(_extra_msg(extra, f"max_sensitivity={max_sensitivity!r}"))
    best_b = totals(ch).bytes - rest_bytes
    ch2 = _milp(s_f, G, D, rows + [(big / scale_b, (best_b + 0.5) / scale_b)], allowed) or ch
    return totals(ch2)


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
) -> tuple[float, int] | None:
    """Reference for tests: the optimal (objective, secondary) by enumerating every assignment."""
    import itertools

    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    best = None
    for ch in itertools.product(*[range(s.shape[1])] * s.shape[0]):
        tot_s = float(sum(s[g, d] for g, d in enumerate(ch)))
        tot_b = int(rest_bytes + sum(int(b[g, d]) for g, d in enumerate(ch)))
        if not math.isfinite(tot_s):
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
