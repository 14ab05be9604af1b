"""``DeviceCosts``: what each group costs in time on one device, per candidate dtype, as plain data.

The planner knows modules and dtypes, not runtimes: this table is its input, measured elsewhere (the
export or the example times each group in each dtype on the target runtime, with the deployment's
thread count) and written here. For group ``g`` and dtype ``d``, ``seconds[g][d]`` is the time that
group adds to one call (a decoder step, or one call of an encoder or codec) when it runs in ``d``;
``rest_seconds`` is the time of everything in no group (added to every plan). A plan's predicted
latency is the additive model

    latency(plan) = rest_seconds + sum_g seconds[g][plan(g)],

the same approximation as for sensitivity: it holds when groups run one after another and a group's
time does not depend on its neighbours' dtypes (casts at group borders are charged to the group whose
input they convert, if the measurement includes them). ``inf`` means the dtype cannot run on this
device for that group; the planner never picks it.

``device`` records what the table was measured on, free-form JSON (e.g. ``{"cpu": "AMD EPYC 7B13",
"flags": ["avx2", "avx512f"], "onnxruntime": "1.20.1", "threads": 2}``); the plan made with it
copies it, so a plan says which device it was planned for.

The JSON file (schema ``kdq.costs/1``)::

    {
      "schema": "kdq.costs/1",
      "unit": "step",
      "rest_seconds": 0.004,
      "seconds": {"decoder.layers.0": {"fp32": 0.0021, "fp16": 0.0083, "int8": 0.0012}},
      "device": {"cpu": "...", "threads": 2, "onnxruntime": "1.20.1"},
      "meta": {}
    }

Pure data: imports neither torch nor scipy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdq._io import atomic_write_text
from kdq.dtypes import DTYPES
from kdq.errors import close_matches
from kdq.quant.errors import CostError

COSTS_SCHEMA = "kdq.costs/1"
_KEYS = ("schema", "unit", "rest_seconds", "seconds", "device", "meta")


def _seconds(arg: str, value: Any) -> float:
    """A time in seconds: a non-negative number, ``inf`` (cannot run here) or JSON null (read as inf)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
        raise CostError(
            f"{arg}={value!r} is not allowed: it must be a number of seconds >= 0, or inf (null in JSON) "
            "for a dtype that cannot run on this device"
        )
    return float(value)


@dataclass(frozen=True)
class DeviceCosts:
    """Seconds each group adds per call in each dtype on one device (see the module docstring).

    Attributes:
        seconds: ``{group: {dtype: seconds}}``; ``inf`` marks a dtype that cannot run there.
        device: what it was measured on (CPU model, flags, runtime version, threads); free-form JSON.
        rest_seconds: time of everything in no group, added to every plan's latency.
        unit: what one call is, e.g. ``"step"`` (a decoder step) or ``"call"``; printed with budgets.
        meta: free-form JSON (how it was measured: repeats, shapes, commit).

    Raises:
        CostError: a dtype kdq does not know, a time that is negative or not a number, or a
            ``device``/``meta`` that is not a JSON object.
    """

    seconds: Mapping[str, Mapping[str, float]]
    device: Mapping[str, Any] = field(default_factory=dict)
    rest_seconds: float = 0.0
    unit: str = "step"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, Mapping):
            raise CostError(f"seconds={self.seconds!r} is not allowed: it must be a dict {{group: {{dtype: seconds}}}}")
        table: dict[str, dict[str, float]] = {}
        for g, row in self.seconds.items():
            if not isinstance(g, str) or not g or not isinstance(row, Mapping):
                raise CostError(f"seconds[{g!r}]={row!r} is not allowed: keys are group names, values {{dtype: seconds}}")
            table[g] = {}
            for d, v in row.items():
                if d not in DTYPES:
                    raise CostError(
                        f"seconds[{g!r}] has dtype {d!r}, which kdq does not know: allowed are "
                        f"{', '.join(DTYPES)}{close_matches(str(d), DTYPES)}"
                    )
                table[g][d] = _seconds(f"seconds[{g!r}][{d!r}]", v)
        rest = _seconds("rest_seconds", self.rest_seconds)
        if math.isinf(rest):
            raise CostError("rest_seconds=inf is not allowed: it must be a finite number of seconds >= 0")
        for name in ("device", "meta"):
            if not isinstance(getattr(self, name), Mapping):
                raise CostError(f"{name}={getattr(self, name)!r} is not allowed: it must be a dict (JSON object)")
        if not isinstance(self.unit, str) or not self.unit:
            raise CostError(f"unit={self.unit!r} is not allowed: it must be a non-empty string such as 'step'")
        object.__setattr__(self, "seconds", table)
        object.__setattr__(self, "rest_seconds", rest)
        object.__setattr__(self, "device", dict(self.device))
        object.__setattr__(self, "meta", dict(self.meta))

    def array(self, groups: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """``[groups, candidates]`` seconds in the given order, for ``solve_mckp(latency=...)``.

        Raises:
            CostError: a (group, dtype) the solve needs is not in the table; names all that are missing.
        """
        missing = [(g, d) for g in groups for d in candidates if d not in self.seconds.get(g, {})]
        if missing:
            unknown = [g for g in dict.fromkeys(g for g, _ in missing) if g not in self.seconds]
            hint = f"; group {unknown[0]!r} is not in the table{close_matches(unknown[0], self.seconds)}" if unknown else ""
            shown = ", ".join(f"({g!r}, {d!r})" for g, d in missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise CostError(
                f"the cost table lacks {len(missing)} (group, dtype) entries the solve needs: {shown}{hint}; "
                "measure them, or drop those candidates"
            )
        return np.array([[self.seconds[g][d] for d in candidates] for g in groups], dtype=float)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict (``inf`` written as null)."""
        return {
            "schema": COSTS_SCHEMA,
            "unit": self.unit,
            "rest_seconds": self.rest_seconds,
            "seconds": {g: {d: (v if math.isfinite(v) else None) for d, v in row.items()} for g, row in self.seconds.items()},
            "device": dict(self.device),
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise CostError(f"this cost table cannot be written as JSON ({e}): keep device/meta JSON-able") from None

    @classmethod
    def from_dict(cls, data: Any) -> DeviceCosts:
        if not isinstance(data, Mapping):
            raise CostError(f"a cost table must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != COSTS_SCHEMA:
            raise CostError(f"schema={data.get('schema')!r} is not supported: this kdq reads {COSTS_SCHEMA!r} tables")
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise CostError(f"cost table has unknown keys {sorted(unknown)}: allowed are {list(_KEYS)}")
        if "seconds" not in data:
            raise CostError("cost table has no 'seconds': add {group: {dtype: seconds}}")
        return cls(
            data["seconds"], device=data.get("device", {}), rest_seconds=data.get("rest_seconds", 0.0),
            unit=data.get("unit", "step"), meta=data.get("meta", {}),
        )

    @classmethod
    def from_json(cls, text: str) -> DeviceCosts:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CostError(f"cost table is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file + ``os.replace``, see ``kdq._io``); returns the path."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceCosts:
        p = Path(path)
        if not p.is_file():
            raise CostError(f"path={str(p)!r} is not a cost table file: it does not exist or is a folder")
        try:
            return cls.from_json(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CostError(f"path={str(p)!r} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
        except CostError as e:
            raise CostError(f"path={str(p)!r}: {e}") from None
