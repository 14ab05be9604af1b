"""Choosing one dtype per group: a multiple-choice knapsack solved exactly with ``scipy.optimize.milp``.

With groups ``g``, candidate dtypes ``d``, measured sensitivity ``s[g, d]``, exact bytes ``b[g, d]`` and,
when a device cost table is given, seconds per call ``t[g, d]``, binary ``x[g, d]`` picks one dtype per
group (``sum_d x[g, d] = 1``). The three resources of a plan are

    bytes = rest_bytes + sum b x,   sensitivity = sum s x,   latency = rest_latency + sum t x.

Any combination of budgets ``max_bytes``, ``max_sensitivity``, ``max_latency`` adds one row each
(``resource <= budget``), and the objective minimises one resource:

- ``objective="sensitivity"``: ties broken by fewer bytes, then less latency;
- ``objective="bytes"``:       ties broken by less sensitivity, then less latency;
- ``objective="latency"``:     ties broken by less sensitivity, then fewer bytes.

``objective=None`` keeps the original contract: ``"bytes"`` when ``max_sensitivity`` is the only
size/quality budget, ``"sensitivity"`` otherwise (so ``max_bytes=B`` minimises ``sum s x`` and
``max_sensitivity=S`` minimises ``sum b x``). Latency only enters the tie-break when costs are given.

Extra cost columns ``c_k[g, d]`` with ``sum c_k x <= limit_k`` constrain every solve too. Ties are
broken lexicographically by further solves (each holds the previous objectives at their optimum);
candidates that are exactly equivalent for a group (same bytes, sensitivity, latency and extra costs)
resolve to the first listed. ``rest`` is the bytes of modules in no group. A choice whose sensitivity
or latency is not finite (inf/NaN: the converted model broke, or the dtype cannot run on the device)
is never picked. Budgets are checked again in exact integer/float arithmetic after the solve.

The additive model (a plan's sensitivity is the sum of its groups' sensitivities, each measured with
only that group converted; likewise for latency) is an approximation; ``MixedPrecisionPlanner.measure``
reports predicted against measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kdq.errors import bad_value, close_matches
from kdq.quant.errors import BudgetError, CostError
from kdq.quant.plan import OBJECTIVES

# The order in which each objective breaks ties (see the module docstring).
_TIES = {
    "sensitivity": ("sensitivity", "bytes", "latency"),
    "bytes": ("bytes", "sensitivity", "latency"),
    "latency": ("latency", "sensitivity", "bytes"),
}


@dataclass(frozen=True)
class Solution:
    """A chosen dtype index per group with its totals.

    Attributes:
        choice: index into the candidate list, one per group.
        bytes: rest + sum of chosen bytes.
        sensitivity: sum of chosen sensitivities.
        extra: total of each extra cost column.
        latency: rest_latency + sum of chosen seconds; None when no cost table was given.
    """

    choice: tuple[int, ...]
    bytes: int
    sensitivity: float
    extra: dict[str, float]
    latency: float | None = None

    def value(self, resource: str) -> float:
        """The total of ``resource`` (``"bytes"``, ``"sensitivity"`` or ``"latency"``)."""
        v = getattr(self, resource)
        if v is None:
            raise CostError(f"this solution has no {resource} total: solve with latency=... (a cost table)")
        return float(v)


def _total(coeff: np.ndarray, ch: tuple[int, ...]) -> float:
    return float(sum(coeff[g, d] for g, d in enumerate(ch)))


def _milp(c: np.ndarray, rows: list[tuple[np.ndarray, float]], allowed: np.ndarray) -> tuple[int, ...] | None:
    """One MILP: minimise ``sum c x`` with one choice per group and ``sum coeff x <= limit`` rows.

    Each coefficient matrix is shifted by its per-group minimum (a constant, since every group picks
    exactly one); float ones are scaled so HiGHS's absolute tolerances act far below the spread of
    the choices, integer ones get their limit rounded down; the relative MIP gap is 1e-9 (the default
    1e-4 is not exact enough).
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

    def integral(coeff: np.ndarray) -> bool:
        sh = np.where(allowed, coeff - np.where(allowed, coeff, np.inf).min(axis=1)[:, None], 0.0)
        return bool(np.all(sh == np.round(sh))) and float(sh.max()) < 2**52

    A_eq = np.zeros((G, n))
    for g in range(G):
        A_eq[g, g * D : (g + 1) * D] = 1.0
    cons = [LinearConstraint(A_eq, 1.0, 1.0)]
    for coeff, limit in rows:
        sh, const, scale = shifted(np.asarray(coeff, dtype=float))
        if limit - const < -1e-12 * max(1.0, abs(const)):
            return None  # even the per-group minima exceed this limit
        rhs = max(limit - const, 0.0)
        if integral(np.asarray(coeff, dtype=float)) and math.isfinite(rhs):
            # Integer rows only reach integer totals: round the limit down, so that HiGHS's feasibility
            # tolerance (1e-7) cannot admit a total a hair above a fractional limit.
            rhs = float(math.floor(rhs + 1e-9 * max(1.0, rhs)))
        cons.append(LinearConstraint(sh.reshape(1, n) / scale, -np.inf, rhs / scale))
    sh, _, scale = shifted(np.asarray(c, dtype=float))
    res = milp(
        c=sh.reshape(n) / scale, constraints=cons, integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), allowed.reshape(n).astype(float)), options={"mip_rel_gap": 1e-9},
    )
    if res.status != 0 or res.x is None:
        return None
    return tuple(int(i) for i in np.round(res.x).reshape(G, D).argmax(axis=1))


def _lexicographic(
    keys: Sequence[np.ndarray], rows: list[tuple[np.ndarray, float]], allowed: np.ndarray
) -> tuple[int, ...] | None:
    """Least ``keys[0]``, ties broken by least ``keys[1]``, then ``keys[2]``; every row met exactly.

    One MILP per key (each minimises its key with the earlier keys held at their optima), then an
    exact polish: single-group changes that keep every row and improve the key tuple, until none
    does. The polish removes the last differences below the solver's tolerances.
    """
    G, D = allowed.shape
    epss = [1e-12 * (float(np.abs(k).max()) or 1.0) for k in keys]

    def feasible(ch: tuple[int, ...]) -> bool:
        return all(allowed[g, d] for g, d in enumerate(ch)) and all(_total(cf, ch) <= lim for cf, lim in rows)

    def better(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        for k, eps in zip(keys, epss):
            ka, kb = _total(k, a), _total(k, b)
            if ka < kb - eps:
                return True
            if ka > kb + eps:
                return False
        return False

    work = list(rows)
    for _ in range(5):
        held = list(work)
        found: list[tuple[int, ...]] = []
        for k in keys:
            ch = _milp(k, held, allowed)
            if ch is None:
                if not found:
                    return None
                break
            found.append(ch)
            held.append((k, _total(k, ch) + 1e-9 * (float(np.abs(k).max()) or 1.0)))
        cands = [x for x in reversed(found) if feasible(x)]  # the most tie-broken first
        if cands:
            best = cands[0]
            for x in cands[1:]:
                if not better(best, x):
                    best = x
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
        ch = found[0]
        work = [
            (cf, lim - max(0.0, _total(cf, ch) - lim) - 1e-9 * (float(np.abs(cf).max()) or 1.0)) for cf, lim in work
        ]
    return None


def resolve_objective(
    objective: str | None, *, max_bytes: object = None, max_sensitivity: object = None, max_latency: object = None,
    has_latency: bool = False,
) -> str:
    """The objective a solve minimises (``objective=None``: see the module docstring).

    Raises:
        BudgetError: an objective that is not one of ``OBJECTIVES``, or nothing to solve for.
        CostError: ``objective="latency"`` or ``max_latency`` without a cost table.
    """
    if objective is not None and objective not in OBJECTIVES:
        raise bad_value(
            BudgetError, "objective", objective, f"one of {', '.join(map(repr, OBJECTIVES))} (or None)",
            f"e.g. objective='latency'{close_matches(str(objective), OBJECTIVES)}",
        )
    if not has_latency and (objective == "latency" or max_latency is not None):
        arg = "objective='latency'" if objective == "latency" else f"max_latency={max_latency!r}"
        raise CostError(
            f"{arg} needs a device cost table: pass latency=[groups, dtypes] seconds (solve_mckp) or "
            "costs=DeviceCosts(...) (MixedPrecisionPlanner.solve)"
        )
    if objective is None:
        if max_bytes is None and max_sensitivity is None and max_latency is None:
            raise BudgetError(
                "nothing to solve for: pass at least one budget (max_bytes=, max_sensitivity=, max_latency=) "
                "or exactly one objective= ('sensitivity', 'bytes', 'latency')"
            )
        return "bytes" if max_sensitivity is not None and max_bytes is None else "sensitivity"
    return objective


def solve_mckp(
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    *,
    rest_bytes: int = 0,
    max_bytes: int | None = None,
    max_sensitivity: float | None = None,
    extra: Mapping[str, tuple[np.ndarray, float]] | None = None,
    latency: np.ndarray | None = None,
    rest_latency: float = 0.0,
    max_latency: float | None = None,
    objective: str | None = None,
) -> Solution:
    """Solve the multiple-choice knapsack exactly (see the module docstring).

    Args:
        sensitivity: ``[groups, dtypes]`` float; non-finite entries are forbidden choices.
        nbytes: ``[groups, dtypes]`` int bytes.
        rest_bytes: bytes outside all groups, added to every total.
        max_bytes: size budget.
        max_sensitivity: quality budget (``inf``: no limit).
        extra: name -> (``[groups, dtypes]`` cost, limit) constraints.
        latency: ``[groups, dtypes]`` seconds per call on the target device (``DeviceCosts.array``);
            non-finite entries are forbidden choices. Needed by ``max_latency`` and ``objective="latency"``.
        rest_latency: seconds outside all groups, added to every total.
        max_latency: latency budget in seconds per call.
        objective: ``"sensitivity"``, ``"bytes"`` or ``"latency"``; None: as before latency budgets
            (least sensitivity, or fewest bytes when ``max_sensitivity`` is the only other budget).

    Raises:
        BudgetError: an objective not allowed, a budget that is not a number, or budgets no assignment
            meets; the message names the least reachable value of each budgeted resource.
        CostError: a latency budget or objective without ``latency``, or ``latency`` of the wrong shape.
    """
    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    if s.shape != b.shape or s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise BudgetError(f"sensitivity and bytes must be [groups, dtypes] of one shape, got {s.shape} and {b.shape}")
    goal = resolve_objective(
        objective, max_bytes=max_bytes, max_sensitivity=max_sensitivity, max_latency=max_latency,
        has_latency=latency is not None,
    )
    if max_bytes is not None:
        _check_budget("max_bytes", max_bytes, "a finite number of bytes", finite=True)
    if max_sensitivity is not None:
        _check_budget("max_sensitivity", max_sensitivity, "a number, not NaN (inf: no quality limit)", finite=False)
    if max_latency is not None:
        _check_budget("max_latency", max_latency, "a number of seconds, not NaN (inf: no time limit)", finite=False)
    _check_budget("rest_latency", rest_latency, "a finite number of seconds", finite=True)
    budgets = {
        k: v for k, v in (("bytes", max_bytes), ("sensitivity", max_sensitivity), ("latency", max_latency))
        if v is not None
    }
    res = _Resources(s, b, rest_bytes, latency, float(rest_latency), extra)
    return res.solve(budgets, _TIES[goal])


class _Resources:
    """The coefficient matrices of one problem, with the exact totals of a choice."""

    def __init__(
        self, s: np.ndarray, b: np.ndarray, rest_bytes: int, latency: np.ndarray | None, rest_latency: float,
        extra: Mapping[str, tuple[np.ndarray, float]] | None,
    ) -> None:
        G, D = s.shape
        allowed = np.isfinite(s)
        if latency is not None:
            lat = np.asarray(latency, dtype=float)
            if lat.shape != s.shape:
                raise CostError(f"latency has shape {lat.shape}, expected [groups, dtypes] = {s.shape}")
            if (lat < 0).any():
                raise CostError("latency has negative seconds: every entry must be >= 0 (inf: cannot run here)")
            allowed &= np.isfinite(lat)
        if not allowed.any(axis=1).all():
            bad = [g for g in range(G) if not allowed[g].any()]
            why = " and latency" if latency is not None else ""
            raise BudgetError(
                f"groups {bad} have no candidate with a finite sensitivity{why}; keep fp32 among the candidates"
            )
        self.G, self.D, self.allowed = G, D, allowed
        self.b = b
        self.rest_bytes = int(rest_bytes)
        self.rest_latency = rest_latency
        self.coeff = {"sensitivity": np.where(allowed, s, 0.0), "bytes": np.where(allowed, b, 0).astype(float)}
        self.offset = {"sensitivity": 0.0, "bytes": float(rest_bytes)}
        if latency is not None:
            self.coeff["latency"] = np.where(allowed, lat, 0.0)
            self.offset["latency"] = rest_latency
        self.extra = dict(extra or {})
        self.rows_extra = []
        for name, (cost, limit) in self.extra.items():
            cost = np.asarray(cost, dtype=float)
            if cost.shape != s.shape:
                raise BudgetError(f"extra cost {name!r} has shape {cost.shape}, expected {s.shape}")
            self.rows_extra.append((np.where(allowed, cost, 0.0), float(limit)))

    def least(self, r: str) -> float:
        """The least reachable total of ``r`` (every group at its cheapest allowed candidate)."""
        if r == "bytes":
            return int(self.rest_bytes + np.where(self.allowed, self.b, np.iinfo(np.int64).max).min(axis=1).sum())
        return float(self.offset[r] + np.where(self.allowed, self.coeff[r], np.inf).min(axis=1).sum())

    def most(self, r: str) -> float:
        """The largest total of ``r`` any assignment reaches."""
        if r == "bytes":
            return int(self.rest_bytes + np.where(self.allowed, self.b, 0).max(axis=1).sum())
        return float(self.offset[r] + np.where(self.allowed, self.coeff[r], -np.inf).max(axis=1).sum())

    def row(self, r: str, limit: float) -> tuple[np.ndarray, float]:
        if r == "bytes":  # integers: met exactly by HiGHS
            return self.coeff[r], float(int(limit) - self.rest_bytes)
        return self.coeff[r], float(limit) - self.offset[r] + 1e-12 * max(1.0, abs(float(limit)))

    def canonical(self, ch: tuple[int, ...]) -> tuple[int, ...]:
        # Among candidates with identical bytes, sensitivity, latency and extra costs, keep the first
        # listed (fp32 before int4 for a convolution that int4 leaves in fp32): same totals, clearer plan.
        cols = [self.b.astype(float)] + [self.coeff[k] for k in ("sensitivity", "latency") if k in self.coeff]
        cols += [np.asarray(c, float) for c, _ in self.extra.values()]
        out = []
        for g, d in enumerate(ch):
            same = [d2 for d2 in range(self.D) if self.allowed[g, d2] and all(c[g, d2] == c[g, d] for c in cols)]
            out.append(min(same))
        return tuple(out)

    def totals(self, ch: tuple[int, ...]) -> Solution:
        ch = self.canonical(ch)
        lat = self.coeff.get("latency")
        return Solution(
            choice=ch,
            bytes=int(self.rest_bytes + sum(int(self.b[g, d]) for g, d in enumerate(ch))),
            sensitivity=float(sum(self.coeff["sensitivity"][g, d] for g, d in enumerate(ch))),
            extra={k: float(sum(np.asarray(c, float)[g, d] for g, d in enumerate(ch))) for k, (c, _) in self.extra.items()},
            latency=None if lat is None else float(self.rest_latency + sum(lat[g, d] for g, d in enumerate(ch))),
        )

    def solve(self, budgets: Mapping[str, float], order: Sequence[str]) -> Solution:
        """Lexicographic minimum of ``order`` (resources without coefficients skipped) within ``budgets``."""
        for r, limit in budgets.items():
            lo = self.least(r)
            if float(limit) < lo - (0 if r == "bytes" else 1e-12 * max(1.0, abs(lo))):
                raise BudgetError(_unreachable(r, limit, lo))
        rows = [self.row(r, budgets[r]) for r in ("bytes", "sensitivity", "latency") if r in budgets] + self.rows_extra
        keys = [self.coeff[r] for r in order if r in self.coeff]
        ch = _lexicographic(keys, rows, self.allowed)
        if ch is None:
            raise BudgetError(self._infeasible_msg(budgets))
        return self.totals(ch)

    def _infeasible_msg(self, budgets: Mapping[str, float]) -> str:
        said = " together with ".join(f"{_ARG[r]}={_num(r, v)}" for r, v in budgets.items()) or "the budgets"
        msg = f"no assignment meets {said}"
        if self.extra:
            msg += " together with the extra limits (" + ", ".join(f"{k} <= {v[1]:g}" for k, v in self.extra.items()) + ")"
        hints = []
        for r in budgets:
            others = [self.row(o, v) for o, v in budgets.items() if o != r] + self.rows_extra
            ch = _lexicographic([self.coeff[r]], others, self.allowed)
            if ch is None:
                continue
            v = self.totals(ch).value(r)
            hints.append(f"within the other limits the least reachable {r} is {_num(r, v)}")
        if hints:
            return msg + "; " + "; ".join(hints) + "; relax one of them"
        alone = []  # no budget is reachable within the others: say what each reaches on its own
        for r in budgets:
            ch = _lexicographic([self.coeff[r]], list(self.rows_extra), self.allowed)
            if ch is not None:
                alone.append(f"the least reachable {r} alone is {_num(r, self.totals(ch).value(r))}")
        if alone:
            return msg + "; the limits cannot be met even two at a time; " + "; ".join(alone) + "; relax them"
        return msg + "; the other limits cannot be met together either; relax them"


_ARG = {"bytes": "max_bytes", "sensitivity": "max_sensitivity", "latency": "max_latency"}


def _num(r: str, v: float) -> str:
    if r == "bytes":
        return f"{int(v)}"
    return f"{float(v):.6g}"


def _unreachable(r: str, limit: float, lo: float) -> str:
    if r == "bytes":
        return (
            f"max_bytes={int(limit)} is unreachable: the smallest reachable size with these groups "
            f"and candidates is {int(lo)} bytes ({lo / 1e6:.2f} MB); raise the budget or add "
            "smaller candidates (int8/int4) or more groups"
        )
    if r == "sensitivity":
        return (
            f"max_sensitivity={limit!r} is unreachable: the least reachable total sensitivity is "
            f"{lo:.6g} (every group at its least sensitive candidate); raise the budget"
        )
    return (
        f"max_latency={limit!r} is unreachable: the least reachable latency on this device is {lo:.6g} s "
        "(every group at its fastest candidate, plus the time outside the groups); raise the budget or "
        "add faster candidates"
    )


def _check_budget(arg: str, value: object, allowed: str, *, finite: bool) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or math.isnan(value) or (finite and math.isinf(value)):  # type: ignore[arg-type]
        raise bad_value(
            BudgetError, arg, value, allowed,
            "pass e.g. max_bytes=1_000_000_000, max_sensitivity=0.05 or max_latency=0.05",
        )


def pareto_frontier(
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    *,
    rest_bytes: int = 0,
    points: int | None = 32,
    latency: np.ndarray | None = None,
    rest_latency: float = 0.0,
    axes: tuple[str, str] = ("bytes", "sensitivity"),
) -> list[Solution]:
    """Optimal trade-offs between two resources ``axes = (x, y)``, sorted by increasing ``x``.

    ``points=N`` (the default, 32): the least ``y`` (ties: least ``x``) at ``N`` budgets on ``x`` spread
    from its least to its largest reachable total, dominated points removed; cheap, but may skip
    frontier points between budgets. ``points=None``: the whole frontier, exactly, by the
    epsilon-constraint walk: start from the lexicographic minimum of ``(y, x)``; then, while feasible,
    solve again with ``x <= x_prev - delta`` (``delta`` = 1 byte, or ``1e-6`` of ``x``'s range for a
    float resource, at least 4e-12 of its magnitude; points closer than that merge). Each step gives the next non-dominated point (its ``y`` is strictly larger, since
    a point with the same ``y`` and smaller ``x`` would have won the previous step), so the walk makes
    one solve per frontier point plus one.

    Args:
        sensitivity, nbytes, rest_bytes, latency, rest_latency: as for ``solve_mckp``.
        points: budgets to sample, or None for the exact frontier.
        axes: two distinct names from ``OBJECTIVES``; ``"latency"`` needs ``latency``.
    """
    if not (isinstance(axes, (tuple, list)) and len(axes) == 2 and axes[0] != axes[1] and set(axes) <= set(OBJECTIVES)):
        raise bad_value(BudgetError, "axes", axes, f"two distinct names from {OBJECTIVES}", "e.g. axes=('latency', 'sensitivity')")
    if points is not None and (isinstance(points, bool) or not isinstance(points, int) or points < 1):
        raise bad_value(BudgetError, "points", points, "an integer >= 1, or None for the exact frontier")
    x, y = axes
    if "latency" in axes and latency is None:
        raise CostError(f"axes={tuple(axes)!r} needs a device cost table: pass latency=[groups, dtypes] seconds")
    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    if s.shape != b.shape or s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise BudgetError(f"sensitivity and bytes must be [groups, dtypes] of one shape, got {s.shape} and {b.shape}")
    res = _Resources(s, b, rest_bytes, latency, float(rest_latency), None)
    third = [r for r in _TIES[y] if r not in axes]
    order = (y, x, *third)
    sols: dict[tuple[int, ...], Solution] = {}
    if points is None:
        budget = None
        # Strictly below the previous point, by more than the 1e-12 relative slack a budget row gets.
        scale = max(1.0, abs(res.least(x)), abs(res.most(x)))
        # 1e-6 of the range, not less: with a budget within ~1e-9 of a reachable total HiGHS returned a
        # worse point as optimal (hypothesis found it; the exact check and polish could not recover it)
        delta = 1.0 if x == "bytes" else max(1e-6 * (res.most(x) - res.least(x)), 4e-12 * scale)
        while True:
            try:
                sol = res.solve({} if budget is None else {x: budget}, order)
            except BudgetError:
                break
            sols[sol.choice] = sol
            budget = sol.value(x) - delta
            if budget < res.least(x) - (0 if x == "bytes" else 1e-12 * max(1.0, abs(res.least(x)))):
                break
    else:
        lo, hi = res.least(x), res.most(x)
        grid = np.linspace(lo, hi, max(2, points))
        budgets = sorted({int(round(v)) for v in grid}) if x == "bytes" else sorted(set(float(v) for v in grid))
        for budget in budgets:
            sol = res.solve({x: budget}, order)
            sols[sol.choice] = sol
    out = sorted(sols.values(), key=lambda p: (p.value(x), p.value(y)))
    front: list[Solution] = []
    for sol in out:
        if not front or sol.value(y) < front[-1].value(y) - (0 if y == "bytes" else 1e-15):
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
    latency: Sequence[Sequence[float]] | None = None,
    rest_latency: float = 0.0,
    max_latency: float | None = None,
    objective: str | None = None,
) -> tuple[float, ...] | None:
    """Reference for tests: the optimal totals in tie-break order, by enumerating every assignment.

    Same contract as ``solve_mckp``: non-finite sensitivities (and latencies) are forbidden choices,
    every budget and extra cost column must hold, and ties on the objective go to the next resource
    in ``_TIES[objective]``. Returns ``(objective, secondary)`` without ``latency`` and
    ``(objective, secondary, tertiary)`` with it (e.g. ``(sensitivity, bytes)`` under ``max_bytes``);
    None if nothing is feasible.
    """
    import itertools

    s = np.asarray(sensitivity, dtype=float)
    b = np.asarray(nbytes, dtype=np.int64)
    lat = None if latency is None else np.asarray(latency, dtype=float)
    goal = resolve_objective(
        objective, max_bytes=max_bytes, max_sensitivity=max_sensitivity, max_latency=max_latency,
        has_latency=lat is not None,
    )
    order = [r for r in _TIES[goal] if r != "latency" or lat is not None]
    costs = [(np.asarray(c, dtype=float), float(lim)) for c, lim in (extra or {}).values()]
    best = None
    for ch in itertools.product(*[range(s.shape[1])] * s.shape[0]):
        if not all(math.isfinite(s[g, d]) for g, d in enumerate(ch)):
            continue
        if lat is not None and not all(math.isfinite(lat[g, d]) for g, d in enumerate(ch)):
            continue
        tot = {
            "sensitivity": float(sum(s[g, d] for g, d in enumerate(ch))),
            "bytes": int(rest_bytes + sum(int(b[g, d]) for g, d in enumerate(ch))),
        }
        if lat is not None:
            tot["latency"] = float(rest_latency + sum(lat[g, d] for g, d in enumerate(ch)))
        if any(float(sum(c[g, d] for g, d in enumerate(ch))) > lim for c, lim in costs):
            continue
        if max_bytes is not None and tot["bytes"] > max_bytes:
            continue
        if max_sensitivity is not None and tot["sensitivity"] > max_sensitivity:
            continue
        if max_latency is not None and tot["latency"] > max_latency:
            continue
        key = tuple(tot[r] for r in order)
        if best is None or key < best:
            best = key
    return best
