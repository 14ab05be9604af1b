"""Temperature and weight schedules: small, pure, JSON-serializable objects.

A schedule maps a training step to a float: ``schedule(step) -> float``. Pieces:

- :class:`Constant` ``(value)``
- :class:`Linear`, :class:`Cosine`, :class:`Exponential` ``(start, end, steps, begin=0)``: go from
  ``start`` at step ``begin`` to ``end`` at step ``begin + steps``, then hold ``end`` (and hold
  ``start`` before ``begin``). Linear interpolates linearly, Cosine along half a cosine (flat at both
  ends), Exponential geometrically (``start * (end / start) ** f``; both must be > 0).
- :class:`Staged` ``(pieces, boundaries, transition="cosine", width=0)``: piece ``i`` holds between
  ``boundaries[i-1]`` and ``boundaries[i]``; around each boundary the value blends smoothly from one
  piece to the next over ``width`` steps (``"cosine"``: a half-cosine ramp; ``"sigmoid"``: a
  logistic ramp reaching 1.8% / 98.2% at the window's edges; ``"step"``: a hard switch).

Every schedule is a frozen dataclass with a readable ``repr``; ``to_dict`` gives plain JSON data
(``{"kind": ..., ...}``) and :func:`from_dict` rebuilds any registered kind (see :func:`register`),
refusing anything else with a :class:`ScheduleError` that names the key. ``lower_bound()`` states
the lowest value over steps >= 0 (so that a loss weight that would go negative is refused before a
run starts). Steps may be fractional; schedules are stateless, so they are safe under gradient
accumulation.

Example::

    T = Staged((Constant(2.0), Cosine(2.0, 1.0, 500, begin=300)), boundaries=(300,), width=0)
    T(0), T(800)   # 2.0, 1.0
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from kdq.errors import KdqError, bad_value, close_matches


class ScheduleError(KdqError):
    """A bad schedule argument or an unreadable schedule description."""


_REGISTRY: dict[str, type[Schedule]] = {}


def register(cls: type[Schedule]) -> type[Schedule]:
    """Class decorator: make ``cls`` (with a unique ``kind``) loadable by :func:`from_dict`."""
    _REGISTRY[cls.kind] = cls
    return cls


def _num(arg: str, value: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        out = float("nan")
    if isinstance(value, bool) or not math.isfinite(out):
        raise bad_value(ScheduleError, arg, value, "a finite number")
    if positive and out <= 0:
        raise bad_value(ScheduleError, arg, value, "a number > 0")
    if nonneg and out < 0:
        raise bad_value(ScheduleError, arg, value, "a number >= 0")
    return out


def _fmt(x: float) -> str:
    return f"{x:g}"


class Schedule(ABC):
    """Base class: ``schedule(step) -> float``, ``to_dict()``, ``from_dict()``."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, step: float) -> float:
        """Value at ``step``."""

    def lower_bound(self) -> float | None:
        """A number no value at a step >= 0 falls below, or None when this kind cannot tell.

        Exact for :class:`Constant` and the ramps; for :class:`Staged` the lowest of its pieces'
        bounds (its value is a convex combination of the pieces). A kind registered without
        overriding this returns None: only the values actually used are then checked.
        """
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"kind": ..., <fields>}`` (nested schedules as dicts)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, Schedule) else v for v in value]
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """``to_dict`` as a JSON string."""
        return json.dumps(self.to_dict())

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Schedule:
        """Rebuild a schedule from :meth:`to_dict` output (any registered kind)."""
        return from_dict(data)


@register
@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    """The same value at every step."""

    value: float
    kind: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _num("value", self.value))

    def __call__(self, step: float) -> float:
        return self.value

    def lower_bound(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({_fmt(self.value)})"


@dataclass(frozen=True, repr=False)
class _Ramp(Schedule):
    start: float
    end: float
    steps: float
    begin: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _num("start", self.start))
        object.__setattr__(self, "end", _num("end", self.end))
        object.__setattr__(self, "steps", _num("steps", self.steps, positive=True))
        object.__setattr__(self, "begin", _num("begin", self.begin))

    def progress(self, step: float) -> float:
        """Fraction of the ramp done at ``step``, clamped to [0, 1]."""
        return min(1.0, max(0.0, (float(step) - self.begin) / self.steps))

    def lower_bound(self) -> float:
        # monotone in the step: the extremes over steps >= 0 are the value at 0 and the end value
        # (the end value at progress exactly 1: at begin + steps, float rounding can leave it at 1 - 1e-16)
        return min(self(0.0), self(math.inf))

    def __repr__(self) -> str:
        a, b = _fmt(self.begin), _fmt(self.begin + self.steps)
        return f"{type(self).__name__}({_fmt(self.start)} -> {_fmt(self.end)} over steps [{a}, {b}])"


@register
@dataclass(frozen=True, repr=False)
class Linear(_Ramp):
    """Linear interpolation from ``start`` to ``end`` over ``[begin, begin + steps]``."""

    kind: ClassVar[str] = "linear"

    def __call__(self, step: float) -> float:
        return self.start + (self.end - self.start) * self.progress(step)


@register
@dataclass(frozen=True, repr=False)
class Cosine(_Ramp):
    """Half-cosine interpolation: ``start + (end - start) * (1 - cos(pi f)) / 2``."""

    kind: ClassVar[str] = "cosine"

    def __call__(self, step: float) -> float:
        f = self.progress(step)
        return self.start + (self.end - self.start) * 0.5 * (1.0 - math.cos(math.pi * f))


@register
@dataclass(frozen=True, repr=False)
class Exponential(_Ramp):
    """Geometric interpolation ``start * (end / start) ** f`` (``start``, ``end`` > 0)."""

    kind: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        super().__post_init__()
        _num("start", self.start, positive=True)
        _num("end", self.end, positive=True)

    def __call__(self, step: float) -> float:
        return self.start * (self.end / self.start) ** self.progress(step)


TRANSITIONS = ("cosine", "sigmoid", "step")


def _ramp(step: float, centre: float, width: float, transition: str) -> float:
    """0 well before ``centre``, 1 well after, a smooth switch of ``width`` steps around it."""
    if transition == "step" or width == 0:
        return 1.0 if step >= centre else 0.0
    u = (step - centre) / width  # -1/2 .. 1/2 across the window
    if transition == "cosine":
        if u <= -0.5:
            return 0.0
        if u >= 0.5:
            return 1.0
        return 0.5 * (1.0 - math.cos(math.pi * (u + 0.5)))
    z = 8.0 * u  # sigmoid: 1.8% / 98.2% at the window's edges
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@register
@dataclass(frozen=True, repr=False)
class Staged(Schedule):
    """Piecewise schedule: ``pieces[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``.

    Around each boundary ``b`` the value is ``(1 - r) * before(step) + r * after(step)`` with ``r``
    a smooth ramp from 0 to 1 over ``[b - width/2, b + width/2]``. Pieces are evaluated at the
    global step (give a ramp piece ``begin=b`` to start it at its boundary). In general the value
    is ``sum_i w_i(step) * pieces[i](step)`` with stage weights ``w_i`` that sum to 1; see
    :meth:`stage_weights`.

    Args:
        pieces: ``n`` schedules (or numbers, taken as :class:`Constant`).
        boundaries: ``n - 1`` increasing steps.
        transition: ``"cosine"`` (default), ``"sigmoid"`` or ``"step"``.
        width: steps over which each transition happens (0: a hard switch).
    """

    pieces: tuple[Schedule, ...]
    boundaries: tuple[float, ...]
    transition: str = "cosine"
    width: float = 0.0
    kind: ClassVar[str] = "staged"

    def __post_init__(self) -> None:
        if not isinstance(self.pieces, (list, tuple)):
            raise bad_value(ScheduleError, "pieces", self.pieces, "a list of schedules (or numbers), one per stage")
        if not isinstance(self.boundaries, (list, tuple)):
            raise bad_value(ScheduleError, "boundaries", self.boundaries,
                            "a list of increasing steps, one fewer than the pieces")
        pieces = tuple(as_schedule(p, "pieces[]") for p in self.pieces)
        bounds = tuple(_num("boundaries[]", b) for b in self.boundaries)
        if not pieces:
            raise bad_value(ScheduleError, "pieces", self.pieces, "at least one schedule")
        if len(bounds) != len(pieces) - 1:
            raise bad_value(ScheduleError, "boundaries", list(bounds),
                            f"{len(pieces) - 1} steps (one fewer than the {len(pieces)} pieces)")
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise bad_value(ScheduleError, "boundaries", list(bounds), "strictly increasing steps")
        if self.transition not in TRANSITIONS:
            raise bad_value(ScheduleError, "transition", self.transition, f"one of {TRANSITIONS}",
                            close_matches(str(self.transition), TRANSITIONS).strip())
        width = _num("width", self.width, nonneg=True)
        object.__setattr__(self, "pieces", pieces)
        object.__setattr__(self, "boundaries", bounds)
        object.__setattr__(self, "width", width)

    def stage_weights(self, step: float) -> list[float]:
        """How much each piece contributes at ``step`` (non-negative, summing to 1)."""
        ramps = [1.0] + [_ramp(float(step), b, self.width, self.transition) for b in self.boundaries] + [0.0]
        return [max(0.0, ramps[i] - ramps[i + 1]) for i in range(len(self.pieces))]

    def __call__(self, step: float) -> float:
        return sum(w * p(step) for w, p in zip(self.stage_weights(step), self.pieces) if w)

    def lower_bound(self) -> float | None:
        bounds = [p.lower_bound() for p in self.pieces]
        return None if any(b is None for b in bounds) else min(bounds)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "pieces": [p.to_dict() for p in self.pieces],
                "boundaries": list(self.boundaries), "transition": self.transition,
                "width": self.width}

    def __repr__(self) -> str:
        parts = [repr(self.pieces[0])]
        for b, p in zip(self.boundaries, self.pieces[1:]):
            parts.append(f"@{_fmt(b)} {repr(p)}")
        how = "step" if self.width == 0 else f"{self.transition}, width {_fmt(self.width)}"
        return f"Staged({' | '.join(parts)}; {how})"


def as_schedule(value: Schedule | float | Mapping[str, Any], arg: str = "schedule") -> Schedule:
    """A schedule from a schedule, a number (:class:`Constant`) or a :meth:`Schedule.to_dict` dict."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, Mapping):
        return from_dict(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(value)
    raise bad_value(ScheduleError, arg, value, "a Schedule, a number or a schedule dict",
                    "e.g. Constant(1.0) or Cosine(2.0, 1.0, steps=1000)")


def from_dict(data: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from ``to_dict`` output; unknown kinds or keys raise :class:`ScheduleError`."""
    if not isinstance(data, Mapping) or "kind" not in data:
        raise bad_value(ScheduleError, "data", data, "a dict with a 'kind' key",
                        "pass the output of Schedule.to_dict()")
    kind = data["kind"]
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise bad_value(ScheduleError, "kind", kind, f"one of {sorted(_REGISTRY)}",
                        close_matches(str(kind), _REGISTRY).strip())
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    kwargs = {k: v for k, v in data.items() if k != "kind"}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise bad_value(ScheduleError, f"{kind} key", unknown[0], f"one of {names}",
                        close_matches(str(unknown[0]), names).strip())
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise bad_value(ScheduleError, kind, dict(data), f"the fields {names}", str(exc)) from None


def staged(values: Sequence[Schedule | float], boundaries: Sequence[float], *,
           transition: str = "cosine", width: float = 0.0) -> Staged:
    """Shorthand for :class:`Staged` taking plain numbers for constant stages."""
    return Staged(tuple(as_schedule(v, "values[]") for v in values), tuple(boundaries),
                  transition=transition, width=width)


__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "Linear",
    "Schedule",
    "ScheduleError",
    "Staged",
    "TRANSITIONS",
    "as_schedule",
    "from_dict",
    "register",
    "staged",
]
