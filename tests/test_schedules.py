"""kdq.schedules: values, smooth stage transitions, JSON round-trip, repr, errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kdq.errors import KdqError
from kdq.schedules import (
    Constant,
    Cosine,
    Exponential,
    Linear,
    Schedule,
    ScheduleError,
    Staged,
    as_schedule,
    from_dict,
    staged,
)


def test_ramps_hit_their_end_points_and_hold():
    for cls in (Linear, Cosine, Exponential):
        s = cls(2.0, 0.5, 100, begin=50)
        assert s(0) == 2.0 and s(50) == 2.0
        assert s(150) == pytest.approx(0.5) and s(10_000) == pytest.approx(0.5)
        mid = s(100)
        assert 0.5 < mid < 2.0
    assert Linear(2.0, 0.5, 100)(50) == pytest.approx(1.25)
    assert Cosine(2.0, 0.5, 100)(50) == pytest.approx(1.25)
    assert Cosine(2.0, 0.5, 100)(25) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2)
    assert Exponential(2.0, 0.5, 100)(50) == pytest.approx(1.0)  # geometric mean
    assert Constant(3.0)(123) == 3.0


def test_cosine_is_flat_at_both_ends_linear_is_not():
    c, lin = Cosine(1.0, 0.0, 1000), Linear(1.0, 0.0, 1000)
    assert abs(c(1) - c(0)) < 1e-5 and abs(c(1000) - c(999)) < 1e-5
    assert abs(lin(1) - lin(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("transition", ["cosine", "sigmoid"])
def test_staged_transitions_are_smooth_and_weights_sum_to_one(transition):
    s = staged([1.0, 0.2, 0.6], [300, 700], transition=transition, width=100)
    assert s(0) == pytest.approx(1.0, abs=1e-3) and s(500) == pytest.approx(0.2, abs=1e-3)
    assert s(1000) == pytest.approx(0.6, abs=1e-3)
    assert s(300) == pytest.approx(0.6)  # half-way at the boundary
    values = [s(x) for x in range(0, 1001)]
    jumps = [abs(b - a) for a, b in zip(values, values[1:])]
    assert max(jumps) < 0.8 / 100 * 2.5  # no jump: spread over the 100-step window
    for x in range(0, 1001, 17):
        w = s.stage_weights(x)
        assert all(v >= 0 for v in w) and sum(w) == pytest.approx(1.0)


def test_staged_step_transition_switches_hard():
    s = staged([1.0, 0.0], [10], transition="step")
    assert s(9.999) == 1.0 and s(10) == 0.0
    assert staged([1.0, 0.0], [10], width=0)(9.5) == 1.0


def test_staged_pieces_are_evaluated_at_the_global_step():
    s = Staged((Constant(2.0), Cosine(2.0, 1.0, 500, begin=300)), (300,))
    assert s(0) == 2.0 and s(299) == 2.0 and s(550) == pytest.approx(1.5) and s(900) == 1.0


ANY = st.recursive(
    st.one_of(
        st.builds(Constant, st.floats(-5, 5)),
        st.builds(Linear, st.floats(-5, 5), st.floats(-5, 5), st.floats(1, 1e4), st.floats(0, 1e4)),
        st.builds(Cosine, st.floats(-5, 5), st.floats(-5, 5), st.floats(1, 1e4), st.floats(0, 1e4)),
        st.builds(Exponential, st.floats(0.01, 5), st.floats(0.01, 5), st.floats(1, 1e4)),
    ),
    lambda inner: st.lists(inner, min_size=1, max_size=3).flatmap(
        lambda pieces: st.builds(
            Staged,
            st.just(tuple(pieces)),
            st.lists(st.floats(0, 1e4), min_size=len(pieces) - 1, max_size=len(pieces) - 1, unique=True).map(
                lambda b: tuple(sorted(b))),
            st.sampled_from(["cosine", "sigmoid", "step"]),
            st.floats(0, 500),
        )
    ),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None)
@given(ANY, st.lists(st.floats(0, 2e4), min_size=1, max_size=5))
def test_prop_json_round_trip_is_exact(schedule, steps):
    back = from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert back == schedule
    assert repr(back) == repr(schedule)
    assert [back(x) for x in steps] == [schedule(x) for x in steps]
    assert Schedule.from_dict(json.loads(schedule.to_json())) == schedule


def test_repr_is_readable():
    assert repr(Constant(2)) == "Constant(2)"
    assert repr(Cosine(2.0, 1.0, 1000)) == "Cosine(2 -> 1 over steps [0, 1000])"
    s = staged([1.0, Linear(1.0, 0.5, 100, begin=300)], [300], width=60)
    assert repr(s) == "Staged(Constant(1) | @300 Linear(1 -> 0.5 over steps [300, 400]); cosine, width 60)"


def test_as_schedule():
    assert as_schedule(2) == Constant(2.0)
    assert as_schedule({"kind": "constant", "value": 1.5}) == Constant(1.5)
    c = Cosine(1, 0, 5)
    assert as_schedule(c) is c


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: Linear(1, 0, 0), "steps"),
        (lambda: Linear(1, 0, -5), "steps"),
        (lambda: Cosine(float("nan"), 0, 5), "start"),
        (lambda: Exponential(0.0, 1.0, 10), "start"),
        (lambda: Exponential(1.0, -1.0, 10), "end"),
        (lambda: Constant("high"), "value"),
        (lambda: staged([1.0, 2.0], [5, 6]), "boundaries"),
        (lambda: staged([1.0, 2.0, 3.0], [6, 5]), "boundaries"),
        (lambda: staged([1.0, 2.0], [5], transition="cosin"), "transition"),
        (lambda: staged([1.0, 2.0], [5], width=-1), "width"),
        (lambda: Staged((), ()), "pieces"),
        (lambda: as_schedule("fast"), "schedule"),
        (lambda: from_dict({"kind": "cosin", "start": 1, "end": 0, "steps": 5}), "kind"),
        (lambda: from_dict({"kind": "linear", "start": 1, "end": 0, "stepz": 5}), "linear key"),
        (lambda: from_dict({"kind": "linear", "start": 1}), "linear"),
        (lambda: from_dict([1, 2]), "data"),
        # raw TypeErrors before: 'int' object is not iterable, unhashable type: 'list'
        (lambda: from_dict({"kind": "staged", "pieces": 5, "boundaries": []}), "pieces"),
        (lambda: from_dict({"kind": "staged", "pieces": [1, 2], "boundaries": 5}), "boundaries"),
        (lambda: from_dict({"kind": "staged", "pieces": {"kind": "constant", "value": 1}, "boundaries": []}),
         "pieces"),
        (lambda: Staged(5, ()), "pieces"),
        (lambda: from_dict({"kind": ["linear"]}), "kind"),
        # a JSON integer too large for a float: a raw OverflowError before
        (lambda: from_dict({"kind": "constant", "value": 10**400}), "value"),
        (lambda: as_schedule(10**400), "value"),
    ],
)
def test_errors(build, arg):
    with pytest.raises(ScheduleError) as info:
        build()
    assert isinstance(info.value, KdqError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(arg + "=")


def test_unknown_kind_suggests_the_right_one():
    with pytest.raises(ScheduleError, match="did you mean 'cosine'"):
        from_dict({"kind": "cosin"})
    with pytest.raises(ScheduleError, match="steps"):
        from_dict({"kind": "linear", "start": 1, "end": 0, "stepz": 5})


def test_lower_bound():
    assert Constant(-2.0).lower_bound() == -2.0
    assert Linear(1.0, -1.0, 10).lower_bound() == -1.0  # decreases below zero
    assert Cosine(0.5, 2.0, 100, begin=50).lower_bound() == 0.5
    assert Exponential(2.0, 0.5, 100).lower_bound() == pytest.approx(0.5)
    assert Linear(-1.0, 1.0, 10, begin=-100).lower_bound() == 1.0  # the ramp ended before step 0
    assert Linear(-1.0, 1.0, 10, begin=-5).lower_bound() == pytest.approx(0.0)  # half-way at step 0
    assert staged([1.0, Linear(0.5, -0.25, 10, begin=100)], [100], width=20).lower_bound() == -0.25


@settings(max_examples=60, deadline=None)
@given(ANY, st.lists(st.floats(0, 3e4), min_size=1, max_size=20))
@example(Linear(1.0, 0.0, 1.0, 4095.1410007000163), [0.0])  # found by hypothesis: the bound was 4.5e-13, not 0
def test_prop_lower_bound_is_a_lower_bound(schedule, steps):
    low = schedule.lower_bound()
    assert all(schedule(x) >= low - 1e-9 * (1 + abs(low)) for x in steps + [0.0, 1e9])
    if not isinstance(schedule, Staged):  # exact for the others: reached at step 0 or in the end
        assert low == min(schedule(0.0), schedule(1e12))


class _NoBound(Schedule):
    """A kind that cannot state a bound (the default)."""

    kind = "test_no_bound"

    def __call__(self, step: float) -> float:
        return 1.0


def test_lower_bound_of_an_unknown_kind_is_none():
    assert _NoBound().lower_bound() is None
    assert Staged((Constant(1.0), _NoBound()), (5,)).lower_bound() is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**400), 10**400) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["value", "start", "end", "steps", "begin", "pieces", "boundaries", "transition", "width"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["constant", "linear", "cosine", "exponential", "staged", "cosin"]) | JSON,
       st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=5))
def test_prop_from_dict_refuses_garbage_with_schedule_error_only(kind, fields):
    # a config file is user input: anything that is not a schedule is a ScheduleError naming a key
    try:
        out = from_dict({"kind": kind, **fields})
    except ScheduleError:
        return
    assert isinstance(out, Schedule)
