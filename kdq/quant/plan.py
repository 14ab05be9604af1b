"""``Plan``: a readable, diffable file that says which dtype each submodule of a model gets.

A plan is plain data. Its ``assignments`` map *rules* to dtype names (see ``DTYPES``):

- a module name such as ``"text_encoder"`` claims that module and its whole subtree;
- ``"re:<regex>"`` claims the subtree of every module whose full dotted name the regex matches
  (as ``re.fullmatch`` would; matched in linear time by ``kdq.quant.pattern``, so a hostile pattern
  cannot hang resolution, and backreferences, lookarounds and flags are refused).

Precedence (most specific wins). For a module ``m``, every rule that covers ``m`` has a *root*: the
module it claims that is ``m`` itself or an ancestor of ``m`` (for a pattern, the shallowest such
module it matches). The rule whose root is deepest, i.e. nearest to ``m``, wins. At equal depth an
exact name beats a pattern, and among patterns the earlier one in the file wins. A module that no rule
covers gets ``default`` (``"fp32"`` unless stated). So ``{"decoder": "fp16", "decoder.lm_heads":
"fp32"}`` keeps the heads in fp32, and ``{"decoder": "fp16", "re:.*embed_tokens\\.\\d+": "int8"}``
makes the decoder's token embeddings int8 inside an fp16 decoder. Every module has exactly one winning
rule (or the default); ``Plan.winning_rule`` names it and ``kdq.quant.explain_plan`` prints it per
module.

Besides the rules, a plan made by the planner records, per group, the measured sensitivity, the exact
bytes and why that dtype was chosen, the predicted totals, and a fingerprint of the model it was made
for (parameter and buffer names and shapes), checked when the plan is applied.

The JSON file (schema ``kdq.plan/1``)::

    {
      "schema": "kdq.plan/1",
      "default": "fp32",
      "assignments": {"text_encoder": "int8", "decoder": "fp16", "audio_encoder": "fp32"},
      "groups": {"text_encoder": {"dtype": "int8", "sensitivity": 0.0012, "bytes": 110002176,
                                  "reason": "..."}},
      "predicted": {"bytes": 1061000000, "sensitivity": 0.0123},
      "model": {"fingerprint": "sha256:...", "bytes_fp32": 2346000000},
      "meta": {"score": "kl", "budget": {"max_bytes": 1100000000, "max_latency": 0.045},
               "objective": "sensitivity", "latency_unit": "step",
               "device": {"cpu": "...", "threads": 2, "onnxruntime": "1.20.1"}}
    }

Only ``schema`` and ``assignments`` are required. In ``meta``, the planner records the budgets it met
(``budget``: any of ``max_bytes``, ``max_sensitivity``, ``max_latency`` and ``extra_limits``), the
resource it minimised (``objective``) and, when it planned with a device cost table, what that table
was measured on (``device``, with ``latency_unit``; ``predicted`` then has ``latency`` in seconds).
Plans written before these keys existed load as they are (``Plan.objective`` is then None).

This module is pure data: it imports neither torch nor ``kdq.quant.apply`` (which imports it), so
plans can be read, written, resolved and checked against a list of module names without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdq._io import atomic_write_text
from kdq.dtypes import DEFAULT_DTYPE, DTYPES
from kdq.errors import close_matches
from kdq.quant.errors import PlanError
from kdq.quant.pattern import NameMatcher

SCHEMA = "kdq.plan/1"
OBJECTIVES = ("sensitivity", "bytes", "latency")  # what a solve can minimise (kdq.quant.solve imports it)
PATTERN_PREFIX = "re:"
_TOP_KEYS = ("schema", "default", "assignments", "groups", "predicted", "model", "meta")
_GROUP_KEYS = ("dtype", "sensitivity", "bytes", "reason")


def _check_dtype(arg: str, value: Any) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise PlanError(
            f"{arg}={value!r} is not a known dtype: allowed are {', '.join(DTYPES)}"
            f"{close_matches(str(value), DTYPES)}"
        )
    return value


def _check_number(arg: str, value: Any, *, integer: bool = False) -> Any:
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise PlanError(f"{arg}={value!r} is not allowed: it must be {kind} or null")
    return value


@dataclass(frozen=True)
class GroupRecord:
    """What the planner measured for one group and why it picked that dtype.

    Attributes:
        dtype: the chosen dtype name.
        sensitivity: the measured score of converting only this group (lower is better), or None.
        bytes: exact bytes the group occupies in that dtype (scales included), or None.
        reason: one line a person can read (e.g. "smallest within budget; int4 +0.31 sensitivity").
    """

    dtype: str
    sensitivity: float | None = None
    bytes: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "sensitivity": self.sensitivity, "bytes": self.bytes, "reason": self.reason}


@dataclass(frozen=True)
class _Rule:
    key: str
    dtype: str
    order: int
    matcher: NameMatcher | None


class Plan:
    """Rules from module names (or ``re:`` patterns) to dtype names, plus what the planner measured.

    Args:
        assignments: rule -> dtype name; a rule is a module name (whole subtree) or ``"re:<regex>"``.
        default: dtype of modules no rule covers.
        groups: optional per-group ``GroupRecord`` (or dicts with its fields).
        predicted: optional predicted totals, e.g. ``{"bytes": int, "sensitivity": float}``.
        model: optional model identity, e.g. ``{"fingerprint": str, "bytes_fp32": int}``.
        meta: optional free-form JSON-able dict (score function, budget, tool versions).

    Raises:
        PlanError: an unknown dtype, an empty rule, or an invalid ``re:`` pattern.
    """

    def __init__(
        self,
        assignments: Mapping[str, str] | None = None,
        *,
        default: str = DEFAULT_DTYPE,
        groups: Mapping[str, GroupRecord | Mapping[str, Any]] | None = None,
        predicted: Mapping[str, Any] | None = None,
        model: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if assignments is not None and not isinstance(assignments, Mapping):
            raise PlanError(
                f"assignments={assignments!r} is not allowed: it must be a dict from module names or "
                "'re:' patterns to dtype names"
            )
        self.default = _check_dtype("default", default)
        self.assignments: dict[str, str] = {}
        rules: list[_Rule] = []
        for i, (key, dtype) in enumerate((assignments or {}).items()):
            if not isinstance(key, str) or not key or key == PATTERN_PREFIX:
                raise PlanError(
                    f"assignments key {key!r} is not allowed: use a non-empty module name such as "
                    "'decoder' or a pattern 're:<regex>'"
                )
            _check_dtype(f"assignments[{key!r}]", dtype)
            matcher = None
            if key.startswith(PATTERN_PREFIX):
                try:
                    matcher = NameMatcher(key[len(PATTERN_PREFIX) :])
                except re.error as e:
                    raise PlanError(f"assignments key {key!r} is not a regular expression kdq can match: {e}") from None
            self.assignments[key] = dtype
            rules.append(_Rule(key, dtype, i, matcher))
        self._names = {r.key: r for r in rules if r.matcher is None}
        self._patterns = {r.key: r for r in rules if r.matcher is not None}
        self.groups: dict[str, GroupRecord] = {}
        for name, rec in (groups or {}).items():
            self.groups[str(name)] = self._record(name, rec)
        self.predicted: dict[str, Any] = dict(predicted or {})
        for k in ("bytes",):
            _check_number(f"predicted[{k!r}]", self.predicted.get(k), integer=True)
        for k in ("sensitivity",):
            _check_number(f"predicted[{k!r}]", self.predicted.get(k))
        _check_number("predicted['latency']", self.predicted.get("latency"))
        self.model: dict[str, Any] = dict(model or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self._check_planning_meta()

    def _check_planning_meta(self) -> None:
        budget = self.meta.get("budget", {})
        if not isinstance(budget, Mapping):
            raise PlanError(f"meta['budget']={budget!r} is not allowed: it must be an object such as {{'max_bytes': 1e9}}")
        for k in ("max_bytes", "max_sensitivity", "max_latency"):
            if k in budget and budget[k] is not None and (
                isinstance(budget[k], bool) or not isinstance(budget[k], (int, float)) or math.isnan(budget[k])
            ):
                raise PlanError(f"meta['budget'][{k!r}]={budget[k]!r} is not allowed: it must be a number or null")
        objective = self.meta.get("objective")
        if objective is not None and objective not in OBJECTIVES:
            raise PlanError(
                f"meta['objective']={objective!r} is not allowed: it must be one of {', '.join(OBJECTIVES)} or "
                f"absent{close_matches(str(objective), OBJECTIVES)}"
            )
        device = self.meta.get("device")
        if device is not None and not isinstance(device, Mapping):
            raise PlanError(f"meta['device']={device!r} is not allowed: it must be an object (what it was measured on)")

    @property
    def budget(self) -> dict[str, Any]:
        """The budgets the planner met (``meta['budget']``; empty for a hand-written or old plan)."""
        return dict(self.meta.get("budget") or {})

    @property
    def objective(self) -> str | None:
        """The resource the planner minimised, or None (hand-written plans, and plans made before the
        planner recorded it: those minimised sensitivity under ``max_bytes`` and bytes under
        ``max_sensitivity``)."""
        return self.meta.get("objective")

    @property
    def device(self) -> dict[str, Any] | None:
        """What the device cost table the plan was made with was measured on, or None."""
        d = self.meta.get("device")
        return None if d is None else dict(d)

    @staticmethod
    def _record(name: str, rec: GroupRecord | Mapping[str, Any]) -> GroupRecord:
        if isinstance(rec, GroupRecord):
            d = rec.to_dict()
        elif isinstance(rec, Mapping):
            d = dict(rec)
        else:
            raise PlanError(f"groups[{name!r}]={rec!r} is not allowed: it must be an object with {_GROUP_KEYS}")
        unknown = set(d) - set(_GROUP_KEYS)
        if unknown:
            raise PlanError(
                f"groups[{name!r}] has unknown keys {sorted(unknown)}: allowed are {list(_GROUP_KEYS)}"
            )
        return GroupRecord(
            dtype=_check_dtype(f"groups[{name!r}]['dtype']", d.get("dtype")),
            sensitivity=_check_number(f"groups[{name!r}]['sensitivity']", d.get("sensitivity")),
            bytes=_check_number(f"groups[{name!r}]['bytes']", d.get("bytes"), integer=True),
            reason=str(d.get("reason", "")),
        )

    # ------------------------------------------------------------------ matching
    def winning_rule(self, module_name: str) -> str | None:
        """The rule that sets ``module_name``'s dtype, or None when the default applies.

        See the module docstring for the precedence: the rule rooted nearest to the module wins; at
        equal depth a name beats a pattern; earlier patterns beat later ones.
        """
        if not module_name:
            return None
        parts = module_name.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        best: tuple[int, int, int] | None = None  # (depth, kind: 1 name / 0 pattern, -order)
        best_key = None
        for depth, prefix in enumerate(prefixes, start=1):
            rule = self._names.get(prefix)
            if rule is not None:
                cand = (depth, 1, -rule.order)
                if best is None or cand > best:
                    best, best_key = cand, rule.key
        for rule in self._patterns.values():
            depth = rule.matcher.first_depth(module_name)  # type: ignore[union-attr]  # one pass over the name
            if depth is not None:  # a pattern's root is the shallowest module it matches
                cand = (depth, 0, -rule.order)
                if best is None or cand > best:
                    best, best_key = cand, rule.key
        return best_key

    def dtype_for(self, module_name: str) -> str:
        """The dtype name of ``module_name`` under this plan (the default when no rule covers it)."""
        rule = self.winning_rule(module_name)
        return self.default if rule is None else self.assignments[rule]

    def resolve(self, module_names: Iterable[str]) -> dict[str, str]:
        """Each given module name -> its dtype name, per the precedence above."""
        return {name: self.dtype_for(name) for name in module_names}

    def check_rules(self, module_names: Iterable[str]) -> None:
        """Raise ``PlanError`` for the first rule that matches none of ``module_names`` (a typo guard).

        A name rule must be one of the names; a pattern must fully match at least one. The one check
        ``apply_plan`` and the export run, over ``[n for n, _ in model.named_modules()]``; needs no
        torch, only the names.
        """
        names = [n for n in module_names if n]
        name_set = set(names)
        for rule in self.assignments:
            if rule in self._names:
                if rule not in name_set:
                    raise PlanError(
                        f"plan rule {rule!r} names no module of this model{close_matches(rule, names)}; "
                        "use a name printed by `kdq plan show PLAN --model DIR` or model.named_modules()"
                    )
            elif not any(self._patterns[rule].matcher.fullmatch(n) for n in names):  # type: ignore[union-attr]
                raise PlanError(
                    f"plan rule {rule!r} matches no module of this model{close_matches(rule[len(PATTERN_PREFIX):], names)}; "
                    "check the pattern against `kdq plan show PLAN --model DIR --all`"
                )

    def unused_rules(self, module_names: Iterable[str]) -> list[str]:
        """Rules that win for none of ``module_names`` (typos, or rules shadowed by others)."""
        used = {self.winning_rule(n) for n in module_names}
        return [k for k in self.assignments if k not in used]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict of this plan (keys in a fixed order)."""
        return {
            "schema": SCHEMA,
            "default": self.default,
            "assignments": dict(self.assignments),
            "groups": {k: v.to_dict() for k, v in self.groups.items()},
            "predicted": dict(self.predicted),
            "model": dict(self.model),
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        """The plan as indented JSON text; ``Plan.from_json(p.to_json()) == p``."""
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise PlanError(f"this plan cannot be written as JSON ({e}): keep meta/model/predicted JSON-able") from None

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Build a plan from the dict form written by ``to_dict``; raises ``PlanError`` if malformed."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise PlanError(f"schema={schema!r} is not supported: this kdq reads {SCHEMA!r} plans")
        unknown = set(data) - set(_TOP_KEYS)
        if unknown:
            raise PlanError(f"plan has unknown keys {sorted(unknown)}: allowed are {list(_TOP_KEYS)}")
        if "assignments" not in data:
            raise PlanError("plan has no 'assignments': add {'<module name or re:pattern>': '<dtype>', ...}")
        for key in ("groups", "predicted", "model", "meta"):
            if not isinstance(data.get(key, {}), Mapping):
                raise PlanError(f"plan[{key!r}] must be a JSON object, got {type(data[key]).__name__}")
        return cls(
            data["assignments"],
            default=data.get("default", DEFAULT_DTYPE),
            groups=data.get("groups"),
            predicted=data.get("predicted"),
            model=data.get("model"),
            meta=data.get("meta"),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse plan JSON text; raises ``PlanError`` on malformed JSON or content."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan file written by ``save``."""
        p = Path(path)
        if p.is_dir():
            raise PlanError(f"path={str(p)!r} is not a plan file: it is a folder; pass the plan JSON file in it")
        if not p.is_file():
            raise PlanError(f"path={str(p)!r} is not a plan file: it does not exist")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise PlanError(
                f"path={str(p)!r} is not a plan file: it is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                "re-save it as UTF-8"
            ) from None
        try:
            return cls.from_json(text)
        except PlanError as e:
            raise PlanError(f"path={str(p)!r}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (temporary file + ``os.replace``); returns the path."""
        return atomic_write_text(path, self.to_json())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_dict() == other.to_dict() and list(self.assignments) == list(other.assignments)

    def __repr__(self) -> str:
        rules = ", ".join(f"{k!r}: {v!r}" for k, v in self.assignments.items())
        return f"Plan({{{rules}}}, default={self.default!r})"

    # ------------------------------------------------------------------ models
    def check_model(self, model: Any) -> None:
        """Raise ``PlanError`` if the plan's recorded fingerprint is not ``model``'s."""
        want = self.model.get("fingerprint")
        if want is None:
            return
        got = model_fingerprint(model)
        if got != want:
            raise PlanError(
                f"this plan was made for a different model (fingerprint {want}, this model {got}): "
                "parameter names or shapes differ; re-run the planner on this model, or drop "
                "plan.model['fingerprint'] to apply the rules anyway"
            )


def model_fingerprint(model: Any) -> str:
    """``sha256:`` of the model's parameter and persistent-buffer names and shapes (not values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
    return "sha256:" + h.hexdigest()[:32]
