"""The multiple-choice knapsack solver against brute force; budgets; frontier; extra costs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kdq.quant import BudgetError
from kdq.quant.solve import brute_force, pareto_frontier, solve_mckp


@st.composite
def tables(draw, max_groups=4, max_dtypes=4):
    G = draw(st.integers(1, max_groups))
    D = draw(st.integers(1, max_dtypes))
    s = draw(st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=D, max_size=D), min_size=G, max_size=G))
    b = draw(st.lists(st.lists(st.integers(1, 10**9), min_size=D, max_size=D), min_size=G, max_size=G))
    rest = draw(st.integers(0, 10**6))
    return np.array(s), np.array(b, dtype=np.int64), rest


@settings(max_examples=60, deadline=None)
@given(t=tables(), frac=st.floats(0, 1))
def test_max_bytes_equals_brute_force_and_respects_budget(t, frac):
    s, b, rest = t
    lo = rest + int(b.min(axis=1).sum())
    hi = rest + int(b.max(axis=1).sum())
    budget = int(lo + frac * (hi - lo))
    sol = solve_mckp(s, b, rest_bytes=rest, max_bytes=budget)
    assert sol.bytes <= budget
    assert sol.bytes == rest + sum(int(b[g, d]) for g, d in enumerate(sol.choice))
    best_s, best_b = brute_force(s, b, rest_bytes=rest, max_bytes=budget)
    assert sol.sensitivity == pytest.approx(best_s, rel=1e-9, abs=1e-9)
    assert sol.bytes <= best_b  # ties broken towards fewer bytes


@settings(max_examples=60, deadline=None)
@given(t=tables(), frac=st.floats(0, 1))
def test_max_sensitivity_equals_brute_force(t, frac):
    s, b, rest = t
    lo, hi = float(s.min(axis=1).sum()), float(s.max(axis=1).sum())
    limit = lo + frac * (hi - lo)
    sol = solve_mckp(s, b, rest_bytes=rest, max_sensitivity=limit)
    # Brute force holds the budget to the solver's own feasibility tolerance (1e-12 relative): a looser
    # one here once admitted a choice 1e-9 over the limit that the solver rightly refused.
    slack = 1e-12 * max(1.0, abs(limit))
    assert sol.sensitivity <= limit + slack
    best_b, _ = brute_force(s, b, rest_bytes=rest, max_sensitivity=limit + slack)
    assert sol.bytes == best_b


def test_unreachable_budgets_name_the_reachable_extreme():
    s = np.array([[0.0, 1.0], [0.0, 2.0]])
    b = np.array([[400, 100], [800, 200]])
    with pytest.raises(BudgetError, match=r"smallest reachable size .* is 350 bytes"):
        solve_mckp(s, b, rest_bytes=50, max_bytes=349)
    assert solve_mckp(s, b, rest_bytes=50, max_bytes=350).choice == (1, 1)
    with pytest.raises(BudgetError, match=r"least reachable total sensitivity is 0.5"):
        solve_mckp(s + 0.25, b, max_sensitivity=0.4)
    with pytest.raises(BudgetError, match="exactly one"):
        solve_mckp(s, b)


def test_non_finite_choices_are_never_picked():
    s = np.array([[0.0, math.inf, 0.1], [0.0, math.nan, 5.0]])
    b = np.array([[10, 1, 5], [10, 1, 5]])
    sol = solve_mckp(s, b, max_bytes=15)
    assert sol.choice == (2, 0) and sol.bytes == 15


def test_extra_cost_columns_constrain_the_choice():
    s = np.array([[0.0, 0.1, 0.3], [0.0, 0.2, 0.5]])
    b = np.array([[100, 50, 25], [100, 50, 25]])
    latency = np.array([[1.0, 9.0, 2.0], [1.0, 9.0, 2.0]])  # the middle dtype is slow on this target
    free = solve_mckp(s, b, max_bytes=100)
    assert free.choice == (1, 1)
    sol = solve_mckp(s, b, max_bytes=100, extra={"latency": (latency, 6.0)})
    assert sol.extra["latency"] <= 6.0 and sol.bytes <= 100
    best = min(
        (sum(s[g, d] for g, d in enumerate(ch)), ch)
        for ch in itertools.product(range(3), repeat=2)
        if sum(b[g, d] for g, d in enumerate(ch)) <= 100 and sum(latency[g, d] for g, d in enumerate(ch)) <= 6
    )
    assert sol.sensitivity == pytest.approx(best[0])
    with pytest.raises(BudgetError, match="extra limits"):
        solve_mckp(s, b, max_bytes=100, extra={"latency": (latency, 1.0)})


@settings(max_examples=15, deadline=None)
@given(t=tables(max_groups=3, max_dtypes=3))
def test_frontier_is_monotone_and_optimal(t):
    s, b, rest = t
    front = pareto_frontier(s, b, rest_bytes=rest, points=12)
    assert front
    for a, c in zip(front, front[1:]):
        assert a.bytes < c.bytes and a.sensitivity > c.sensitivity
    for p in front:
        best_s, _ = brute_force(s, b, rest_bytes=rest, max_bytes=p.bytes)
        assert p.sensitivity == pytest.approx(best_s, rel=1e-9, abs=1e-9)


def test_exact_ties_resolve_to_the_first_candidate():
    # int4 leaves a convolution in fp32: same bytes and sensitivity as fp32, so the plan says fp32.
    s = np.array([[0.0, 0.1, 0.0], [0.0, 0.5, 0.2]])
    b = np.array([[100, 50, 100], [100, 50, 25]])
    sol = solve_mckp(s, b, max_bytes=125)
    assert sol.choice == (0, 2) and sol.bytes == 125


@pytest.mark.parametrize("budget", [{"max_bytes": math.inf}, {"max_bytes": math.nan}, {"max_bytes": -math.inf},
                                    {"max_bytes": "1e9"}, {"max_bytes": True}, {"max_sensitivity": math.nan},
                                    {"max_sensitivity": "0.1"}])
def test_non_numeric_budgets_are_budget_errors(budget):
    """Issue 13 item 10: solve(max_bytes=inf) raised OverflowError, nan a ValueError from int()."""
    s = np.array([[0.0, 1.0], [0.0, 2.0]])
    b = np.array([[400, 100], [800, 200]])
    (arg, value), = budget.items()
    with pytest.raises(BudgetError, match=rf"{arg}={value!r} is not allowed"):
        solve_mckp(s, b, **budget)


def test_an_infinite_quality_budget_gives_the_smallest_plan():
    s = np.array([[0.0, 1.0], [0.0, 2.0]])
    b = np.array([[400, 100], [800, 200]])
    assert solve_mckp(s, b, max_sensitivity=math.inf).choice == (1, 1)


# ---------------------------------------------------------------------------- everything at once, on a grid
# Values on a grid of quarters are exact in binary, so ties are real ties and the tie-breaks are
# checked exactly; inf and NaN entries are forbidden choices; extra cost columns have limits.
@st.composite
def hard_tables(draw, max_groups=4, max_dtypes=3):
    G = draw(st.integers(1, max_groups))
    D = draw(st.integers(1, max_dtypes))
    cell = st.one_of(st.integers(0, 12).map(lambda k: k / 4), st.sampled_from([math.inf, math.nan]))
    s = np.array(draw(st.lists(cell, min_size=G * D, max_size=G * D)), dtype=float).reshape(G, D)
    b = np.array(draw(st.lists(st.integers(1, 6), min_size=G * D, max_size=G * D)), dtype=np.int64).reshape(G, D)
    extra = {}
    for k in range(draw(st.integers(0, 2))):
        cost = np.array(draw(st.lists(st.integers(0, 8), min_size=G * D, max_size=G * D)), dtype=float).reshape(G, D)
        extra[f"cost{k}"] = (cost, float(draw(st.integers(0, 8 * G))))
    return s, b, draw(st.integers(0, 5)), extra


_TIE = (np.array([[0.0, 0.0], [0.25, 0.25]]), np.array([[5, 1], [3, 2]]), 0, {})  # ties in both objectives


@settings(max_examples=200, deadline=None)
@given(t=hard_tables(), frac=st.floats(0, 1), by_bytes=st.booleans())
@example(t=_TIE, frac=1.0, by_bytes=True).via("the tie-break, deterministically")
@example(t=_TIE, frac=1.0, by_bytes=False).via("the tie-break, deterministically")
@example(t=(np.array([[math.nan, 0.5], [0.0, math.inf]]), np.array([[1, 9], [9, 1]]), 0,
            {"latency": (np.array([[0.0, 1.0], [3.0, 0.0]]), 3.0)}), frac=1.0, by_bytes=True).via("forbidden + limit")
def test_solver_equals_brute_force_with_forbidden_choices_extra_limits_and_ties(t, frac, by_bytes):
    s, b, rest, extra = t
    allowed = np.isfinite(s)
    if not allowed.any(axis=1).all():
        with pytest.raises(BudgetError, match="no candidate with a finite sensitivity"):
            solve_mckp(s, b, rest_bytes=rest, max_bytes=10**6, extra=extra)
        return
    if by_bytes:
        lo = rest + int(np.where(allowed, b, 10**9).min(axis=1).sum())
        hi = rest + int(np.where(allowed, b, 0).max(axis=1).sum())
        budget = {"max_bytes": int(lo + frac * (hi - lo))}
    else:
        lo = float(np.where(allowed, s, np.inf).min(axis=1).sum())
        hi = float(np.where(allowed, s, -np.inf).max(axis=1).sum())
        budget = {"max_sensitivity": round((lo + frac * (hi - lo)) * 4) / 4}
    best = brute_force(s, b, rest_bytes=rest, extra=extra, **budget)
    if best is None:
        with pytest.raises(BudgetError):
            solve_mckp(s, b, rest_bytes=rest, extra=extra, **budget)
        return
    sol = solve_mckp(s, b, rest_bytes=rest, extra=extra, **budget)
    assert all(allowed[g, d] for g, d in enumerate(sol.choice))  # never a broken (inf/NaN) choice
    assert sol.bytes == rest + sum(int(b[g, d]) for g, d in enumerate(sol.choice))
    assert sol.sensitivity == sum(s[g, d] for g, d in enumerate(sol.choice))
    for name, (cost, limit) in extra.items():
        assert sol.extra[name] == sum(cost[g, d] for g, d in enumerate(sol.choice)) <= limit
    if by_bytes:  # least sensitivity, then fewest bytes
        assert sol.bytes <= budget["max_bytes"] and (sol.sensitivity, sol.bytes) == best
    else:  # fewest bytes, then least sensitivity
        assert sol.sensitivity <= budget["max_sensitivity"] and (sol.bytes, sol.sensitivity) == best
