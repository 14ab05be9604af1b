"""Latency as a planner resource: DeviceCosts, budgets on any of bytes/sensitivity/latency, every
objective, the frontier on any two, plan metadata and ``kdq plan show``; all against brute force."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from kdq.cli import main
from kdq.quant import BudgetError, CostError, DeviceCosts, MixedPrecisionPlanner, Plan, PlanError, RelativeError
from kdq.quant.solve import brute_force, pareto_frontier, solve_mckp

RESOURCES = ("sensitivity", "bytes", "latency")


# ---------------------------------------------------------------------------- random problems on a grid
# Quarters are exact in binary: sums are exact, ties are real ties, and the solver's totals and
# tie-breaks can be compared with brute force with ==, not approx.
@st.composite
def problems(draw, max_groups=4, max_dtypes=3):
    G = draw(st.integers(1, max_groups))
    D = draw(st.integers(1, max_dtypes))
    quarter = st.integers(0, 12).map(lambda k: k / 4)
    s = np.array(draw(st.lists(st.one_of(quarter, st.just(math.inf)), min_size=G * D, max_size=G * D))).reshape(G, D)
    s[:, 0] = np.where(np.isfinite(s[:, 0]), s[:, 0], 0.0)  # the first candidate (fp32) always runs
    b = np.array(draw(st.lists(st.integers(1, 6), min_size=G * D, max_size=G * D)), dtype=np.int64).reshape(G, D)
    lat = np.array(draw(st.lists(st.one_of(quarter, st.just(math.inf)), min_size=G * D, max_size=G * D))).reshape(G, D)
    lat[:, 0] = np.where(np.isfinite(lat[:, 0]), lat[:, 0], 1.0)
    rest = draw(st.integers(0, 5))
    rest_lat = draw(st.integers(0, 4)) / 4
    return s, b, lat, rest, rest_lat


def _span(values: np.ndarray, allowed: np.ndarray, offset: float) -> tuple[float, float]:
    lo = offset + float(np.where(allowed, values, np.inf).min(axis=1).sum())
    hi = offset + float(np.where(allowed, values, -np.inf).max(axis=1).sum())
    return lo, hi


def _budgets(p, fracs: dict[str, float]) -> dict[str, float]:
    """A budget for each resource in ``fracs``, that fraction of the way between its least and most
    reachable totals (a little below the least when the fraction is negative: unreachable)."""
    s, b, lat, rest, rest_lat = p
    allowed = np.isfinite(s) & np.isfinite(lat)
    out: dict[str, float] = {}
    for r, f in fracs.items():
        values, offset = {"sensitivity": (s, 0.0), "bytes": (b, rest), "latency": (lat, rest_lat)}[r]
        lo, hi = _span(values, allowed, offset)
        v = lo + f * (hi - lo) if f >= 0 else lo - 1
        out[f"max_{r}"] = int(math.floor(v)) if r == "bytes" else math.floor(v * 4) / 4
    return out


def _totals(p, choice) -> dict[str, float]:
    s, b, lat, rest, rest_lat = p
    return {
        "sensitivity": float(sum(s[g, d] for g, d in enumerate(choice))),
        "bytes": int(rest + sum(int(b[g, d]) for g, d in enumerate(choice))),
        "latency": float(rest_lat + sum(lat[g, d] for g, d in enumerate(choice))),
    }


_TIES = {"sensitivity": ("sensitivity", "bytes", "latency"), "bytes": ("bytes", "sensitivity", "latency"),
         "latency": ("latency", "sensitivity", "bytes")}


@settings(max_examples=150, deadline=None)
@given(
    p=problems(),
    objective=st.sampled_from(RESOURCES),
    fracs=st.dictionaries(st.sampled_from(RESOURCES), st.one_of(st.floats(0, 1), st.just(-1.0)), max_size=3),
)
@example(  # found by hypothesis: no two of the three zero budgets are reachable together; the message named no value
    p=(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, math.inf, 0.25]]), np.array([[2, 1, 1], [1, 1, 1], [2, 1, 1]]),
       np.array([[0.0, 0.25, math.inf], [0.0, math.inf, math.inf], [1.0, math.inf, 0.0]]), 0, 0.0),
    objective="sensitivity", fracs={"sensitivity": 0.0, "bytes": 0.0, "latency": 0.0})
def test_every_objective_and_budget_combination_equals_brute_force(p, objective, fracs):
    s, b, lat, rest, rest_lat = p
    budgets = _budgets(p, fracs)
    kw = dict(rest_bytes=rest, latency=lat, rest_latency=rest_lat, objective=objective, **budgets)
    best = brute_force(s, b, **kw)
    if best is None:
        with pytest.raises(BudgetError, match="(least|smallest) reachable"):
            solve_mckp(s, b, **kw)
        return
    sol = solve_mckp(s, b, **kw)
    tot = _totals(p, sol.choice)
    assert (sol.sensitivity, sol.bytes, sol.latency) == (tot["sensitivity"], tot["bytes"], tot["latency"])
    for r in RESOURCES:
        if f"max_{r}" in budgets:
            assert tot[r] <= budgets[f"max_{r}"]
    assert tuple(tot[r] for r in _TIES[objective]) == best  # the objective, then both tie-breaks


@settings(max_examples=60, deadline=None)
@given(p=problems(), fracs=st.dictionaries(st.sampled_from(("bytes", "sensitivity")), st.floats(0, 1), min_size=1))
def test_without_costs_the_default_objective_is_unchanged(p, fracs):
    """objective=None: least sensitivity under max_bytes (or both budgets), fewest bytes under
    max_sensitivity alone, exactly as before latency budgets existed."""
    s, b, _, rest, _ = p
    budgets = _budgets((s, b, np.zeros_like(s), rest, 0.0), fracs)
    goal = "bytes" if list(budgets) == ["max_sensitivity"] else "sensitivity"
    best = brute_force(s, b, rest_bytes=rest, objective=goal, **budgets)
    if best is None:  # both budgets at once can be out of reach
        with pytest.raises(BudgetError, match="within the other limits the least reachable"):
            solve_mckp(s, b, rest_bytes=rest, **budgets)
        return
    sol = solve_mckp(s, b, rest_bytes=rest, **budgets)
    assert sol.latency is None
    assert solve_mckp(s, b, rest_bytes=rest, objective=goal, **budgets) == sol
    assert (sol.value(goal), sol.value(_TIES[goal][1])) == best


def test_infeasible_combination_names_the_least_reachable_value_of_each_budget():
    # Two groups, (fp32, fp16, int8): fp16 small but slow, int8 smallest but sensitive.
    s = np.array([[0.0, 0.25, 2.0], [0.0, 0.25, 2.0]])
    b = np.array([[4, 2, 1], [4, 2, 1]])
    lat = np.array([[1.0, 4.0, 0.5], [1.0, 4.0, 0.5]])
    kw = dict(latency=lat, max_bytes=4, max_sensitivity=0.5, max_latency=2.0)
    assert brute_force(s, b, **kw) is None
    with pytest.raises(BudgetError) as e:
        solve_mckp(s, b, **kw)
    msg = str(e.value)
    assert "max_bytes=4 together with max_sensitivity=0.5 together with max_latency=2" in msg
    # Each hint is the brute-force optimum of that resource under the other two budgets.
    others = {"bytes": ("max_sensitivity", "max_latency"), "sensitivity": ("max_bytes", "max_latency"),
              "latency": ("max_bytes", "max_sensitivity")}
    for r, keep in others.items():
        want = brute_force(s, b, latency=lat, objective=r, **{k: kw[k] for k in keep})
        assert want is not None
        shown = str(int(want[0])) if r == "bytes" else f"{want[0]:.6g}"
        assert f"the least reachable {r} is {shown}" in msg
    with pytest.raises(BudgetError, match=r"max_latency=0.5 is unreachable: the least reachable latency .* is 1 s"):
        solve_mckp(s, b, latency=lat, max_latency=0.5)


def test_argument_errors():
    s = np.array([[0.0, 1.0]])
    b = np.array([[2, 1]])
    lat = np.array([[1.0, 2.0]])
    with pytest.raises(BudgetError, match=r"objective='speed' is not allowed: one of 'sensitivity', 'bytes', 'latency'"):
        solve_mckp(s, b, max_bytes=2, objective="speed")
    with pytest.raises(CostError, match=r"max_latency=1.0 needs a device cost table"):
        solve_mckp(s, b, max_latency=1.0)
    with pytest.raises(CostError, match=r"objective='latency' needs a device cost table"):
        solve_mckp(s, b, objective="latency")
    with pytest.raises(CostError, match=r"latency has shape \(2,\)"):
        solve_mckp(s, b, latency=np.array([1.0, 2.0]), objective="latency")
    with pytest.raises(BudgetError, match=r"max_latency=nan is not allowed"):
        solve_mckp(s, b, latency=lat, max_latency=math.nan)
    with pytest.raises(BudgetError, match="nothing to solve for"):
        solve_mckp(s, b, latency=lat)
    with pytest.raises(BudgetError, match=r"axes=\('bytes', 'bytes'\) is not allowed"):
        pareto_frontier(s, b, axes=("bytes", "bytes"))
    with pytest.raises(CostError, match="needs a device cost table"):
        pareto_frontier(s, b, axes=("latency", "bytes"))
    # An objective with no budget is a plain minimum: the fastest plan.
    assert solve_mckp(s, b, latency=lat, objective="latency").choice == (0,)


# ---------------------------------------------------------------------------- frontier
def _pareto(p, axes) -> set[tuple[float, float]]:
    """Brute force: the (x, y) totals no feasible assignment dominates."""
    s, b, lat, _, _ = p
    allowed = np.isfinite(s) & np.isfinite(lat)
    pts = {
        tuple(_totals(p, ch)[r] for r in axes)
        for ch in itertools.product(*[range(s.shape[1])] * s.shape[0])
        if all(allowed[g, d] for g, d in enumerate(ch))
    }
    return {q for q in pts if not any(o != q and o[0] <= q[0] and o[1] <= q[1] for o in pts)}


@settings(max_examples=80, deadline=None)
@given(p=problems(max_groups=3), axes=st.permutations(RESOURCES).map(lambda r: tuple(r[:2])))
@example(  # found by hypothesis: a walk budget 2.5e-9 under a total made HiGHS return a worse point as optimal
    p=(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, math.inf], [0.0, 0.0, math.inf]]), np.array([[1, 1, 1], [2, 1, 1], [1, 3, 1]]),
       np.array([[0.0, 0.25, math.inf], [1.0, 1.25, 0.0], [1.0, 0.0, 0.0]]), 0, 0.0),
    axes=("latency", "bytes"))
def test_frontier_on_any_two_resources_matches_brute_force(p, axes):
    s, b, lat, rest, rest_lat = p
    kw = dict(rest_bytes=rest, latency=lat, rest_latency=rest_lat, axes=axes)
    want = _pareto(p, axes)
    exact = pareto_frontier(s, b, points=None, **kw)
    got = [(q.value(axes[0]), q.value(axes[1])) for q in exact]
    assert set(got) == want and len(got) == len(want)  # every frontier point, once
    assert got == sorted(got)
    sampled = pareto_frontier(s, b, points=5, **kw)
    pts = [(q.value(axes[0]), q.value(axes[1])) for q in sampled]
    assert set(pts) <= want  # sampled points are frontier points (non-dominated), in order
    for a, c in zip(pts, pts[1:]):
        assert a[0] < c[0] and a[1] > c[1]


# ---------------------------------------------------------------------------- DeviceCosts
DEVICE = {"cpu": "Test CPU 9000", "flags": ["avx2", "avx512f"], "onnxruntime": "1.20.1", "threads": 2}


def test_device_costs_json_round_trip(tmp_path):
    c = DeviceCosts({"a": {"fp32": 0.002, "fp16": math.inf}, "b": {"fp32": 0.001, "int8": 0.0005}},
                    device=DEVICE, rest_seconds=0.004, meta={"repeats": 20})
    path = c.save(tmp_path / "costs.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "kdq.costs/1" and data["seconds"]["a"]["fp16"] is None  # inf -> null
    back = DeviceCosts.load(path)
    assert back == c and back.device == DEVICE and back.seconds["a"]["fp16"] == math.inf
    assert back.array(["b", "a"], ["fp32"]).tolist() == [[0.001], [0.002]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seconds": {"a": {"fp15": 1.0}}}, r"dtype 'fp15', which kdq does not know.*did you mean 'fp16'"),
        ({"seconds": {"a": {"fp32": -1.0}}}, r"seconds\['a'\]\['fp32'\]=-1.0 is not allowed"),
        ({"seconds": {"a": {"fp32": "1"}}}, r"seconds\['a'\]\['fp32'\]='1' is not allowed"),
        ({"seconds": {"a": {"fp32": 1.0}}, "rest_seconds": math.nan}, r"rest_seconds=nan is not allowed"),
        ({"seconds": {"a": {"fp32": 1.0}}, "device": "x86"}, r"device='x86' is not allowed"),
    ],
)
def test_device_costs_errors(kwargs, match):
    with pytest.raises(CostError, match=match):
        DeviceCosts(**kwargs)


def test_cost_table_missing_an_entry_names_it(tmp_path):
    c = DeviceCosts({"decoder.layers.0": {"fp32": 1.0}})
    with pytest.raises(CostError, match=r"lacks 3 .*\('decoder.layers.0', 'int8'\), \('decoder.layers.1', 'fp32'\)"
                       r".*group 'decoder.layers.1' is not in the table \(did you mean 'decoder.layers.0'"):
        c.array(["decoder.layers.0", "decoder.layers.1"], ["fp32", "int8"])
    (tmp_path / "bad.json").write_text('{"schema": "kdq.costs/9", "seconds": {}}')
    with pytest.raises(CostError, match=r"bad.json.*schema='kdq.costs/9' is not supported"):
        DeviceCosts.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------------- the planner on a tiny model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    x = torch.randn(8, 16)
    planner = MixedPrecisionPlanner(model, groups=["0", "2", "4"], candidates=("fp32", "fp16", "int8"))
    table = planner.profile(RelativeError(lambda m: m(x), copy.deepcopy(model)), progress=False, log=None)
    return planner, table


def _x86_costs(table, *, fp16_factor: float) -> DeviceCosts:
    """A cost table in which fp16 is ``fp16_factor`` times slower than fp32 (x86 without fp16 math)
    and int8 a little faster; per group proportional to its fp32 bytes."""
    sec = {}
    for g in table.groups:
        t = table.bytes[g]["fp32"] * 1e-6
        sec[g] = {"fp32": t, "fp16": fp16_factor * t, "int8": 0.8 * t}
    return DeviceCosts(sec, device=DEVICE, rest_seconds=1e-4)


def test_planner_avoids_slow_fp16_under_a_latency_budget(tiny):
    planner, table = tiny
    fp16_bytes = table.total_bytes("fp16")
    # fp16 is the least sensitive way to halve the model: a bytes-only solve takes it everywhere it fits.
    by_bytes = planner.solve(table, max_bytes=fp16_bytes)
    assert "fp16" in by_bytes.assignments.values()
    costs = _x86_costs(table, fp16_factor=4.0)
    fp32_time = costs.rest_seconds + sum(costs.seconds[g]["fp32"] for g in table.groups)
    plan = planner.solve(table, max_bytes=fp16_bytes, max_latency=fp32_time, costs=costs)
    assert "fp16" not in plan.assignments.values()
    assert plan.predicted["latency"] <= fp32_time and plan.predicted["bytes"] <= fp16_bytes
    # ... and it is the best such plan: brute force over the same table.
    s, b = table.arrays()
    lat = costs.array(table.groups, table.candidates)
    best = brute_force(s, b, rest_bytes=table.rest_bytes, latency=lat, rest_latency=costs.rest_seconds,
                       max_bytes=fp16_bytes, max_latency=fp32_time, objective="sensitivity")
    assert (plan.predicted["sensitivity"], plan.predicted["bytes"]) == pytest.approx(best[:2], rel=1e-12)
    # Where fp16 is fast (a phone), the same budgets keep it.
    fast = planner.solve(table, max_bytes=fp16_bytes, max_latency=fp32_time, costs=_x86_costs(table, fp16_factor=0.5))
    assert "fp16" in fast.assignments.values()
    assert plan.meta["objective"] == "sensitivity"
    assert plan.meta["budget"] == {"max_bytes": fp16_bytes, "max_latency": fp32_time}
    assert plan.device == DEVICE and plan.meta["latency_unit"] == "step"


def test_planner_latency_objective_and_frontier(tiny):
    planner, table = tiny
    costs = _x86_costs(table, fp16_factor=4.0)
    fastest = planner.solve(table, objective="latency", costs=costs)
    assert set(fastest.assignments.values()) == {"int8"} and fastest.objective == "latency"
    front = planner.frontier(table, axes=("latency", "sensitivity"), costs=costs, points=None)
    assert front[0]["latency"] == pytest.approx(fastest.predicted["latency"])
    assert all("fp16" not in f["plan"].assignments.values() for f in front)  # slower and worse than fp32
    assert [f["latency"] for f in front] == sorted(f["latency"] for f in front)
    assert [f["sensitivity"] for f in front] == sorted((f["sensitivity"] for f in front), reverse=True)
    with pytest.raises(CostError, match=r"lacks 3 .*'int8'"):
        planner.solve(table, max_latency=1.0, costs=DeviceCosts({g: {"fp32": 1.0, "fp16": 2.0} for g in table.groups}))
    with pytest.raises(CostError, match="needs a device cost table"):
        planner.solve(table, max_latency=1.0)
    assert planner.frontier(table, points=8)[-1]["sensitivity"] == 0.0  # the old call still works


# ---------------------------------------------------------------------------- plan file and CLI
def test_plan_round_trip_with_planning_metadata(tiny, tmp_path):
    planner, table = tiny
    costs = _x86_costs(table, fp16_factor=4.0)
    plan = planner.solve(table, max_bytes=table.total_bytes("fp16"), max_latency=1.0, costs=costs, objective="bytes")
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert back == plan
    assert back.budget == {"max_bytes": table.total_bytes("fp16"), "max_latency": 1.0}
    assert back.objective == "bytes" and back.device == DEVICE
    assert back.predicted["latency"] == plan.predicted["latency"]


def test_old_plan_files_load_without_the_new_keys():
    old = {  # as written before latency budgets: no objective, no device, no predicted latency
        "schema": "kdq.plan/1", "default": "fp32", "assignments": {"0": "int8", "2": "fp16"},
        "groups": {"0": {"dtype": "int8", "sensitivity": 0.01, "bytes": 400, "reason": "least sensitivity within max_bytes"}},
        "predicted": {"bytes": 1000, "sensitivity": 0.01}, "model": {},
        "meta": {"tier": "measured", "budget": {"max_bytes": 1000}},
    }
    plan = Plan.from_dict(old)
    assert plan.objective is None and plan.device is None and plan.budget == {"max_bytes": 1000}
    assert Plan.from_dict(plan.to_dict()) == plan
    bad = copy.deepcopy(old)
    bad["meta"]["objective"] = "latncy"
    with pytest.raises(PlanError, match=r"meta\['objective'\]='latncy' is not allowed.*did you mean 'latency'"):
        Plan.from_dict(bad)


def test_plan_show_prints_budgets_objective_and_device(tiny, tmp_path, capsys):
    planner, table = tiny
    costs = _x86_costs(table, fp16_factor=4.0)
    fp32_time = costs.rest_seconds + sum(costs.seconds[g]["fp32"] for g in table.groups)
    plan = planner.solve(table, max_bytes=table.total_bytes("fp16"), max_latency=fp32_time, costs=costs)
    path = plan.save(tmp_path / "plan.json")
    assert main(["plan", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"latency {1e3 * plan.predicted['latency']:,.3f} ms per step" in out
    assert (f"planned for: least sensitivity within max_bytes {table.total_bytes('fp16') / 1e6:,.2f} MB, "
            f"max_latency {1e3 * fp32_time:,.3f} ms") in out
    assert "device: cpu=Test CPU 9000, flags=avx2,avx512f, onnxruntime=1.20.1, threads=2" in out
    old = Plan({"0": "int8"}).save(tmp_path / "old.json")
    assert main(["plan", "show", str(old)]) == 0
    out = capsys.readouterr().out
    assert "planned for" not in out and "device:" not in out
