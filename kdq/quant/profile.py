"""``MixedPrecisionPlanner``: measure each group's sensitivity to each dtype, then solve for a plan.

Sensitivity of group ``g`` to dtype ``d`` is ``score(model with only g converted to d) - score(fp32
model)``: how much the model's output degrades (lower is better, 0 = no change). Two tiers:

- ``profile(score_fn)`` (measured): converts one group at a time in place, calls ``score_fn``,
  restores. ``len(groups) * (len(candidates) - 1) + 1`` evaluations; exact for that group in
  isolation. Use it whenever a forward pass on a short calibration batch is affordable (MusicGen-small
  at layer granularity: minutes on 2 cores).
- ``profile_fisher(logits_fn)`` (estimated): one backward pass per sample, no conversion-and-forward
  per group. Second-order estimate of the KL to the fp32 output: ``KL ~ 1/2 sum_i F_i dw_i^2`` per
  position, where ``dw`` is the weight's conversion error and ``F_i`` the diagonal Fisher, estimated
  from the squared gradient of ``-log q(y)`` with ``y`` sampled from the model's own output (the
  gradient summed over positions is unbiased for the summed Fisher). Same unit as ``OutputKL``
  (nats/position). Use it for models too large to run a forward per group and dtype, or to pre-screen
  before measuring; it cannot see modules off the logits path (a codec decoder) and ignores
  interactions beyond second order.

``bytes`` are exact: every group is really converted and its tensors counted (scales included).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdq.errors import bad_value, close_matches
from kdq._io import atomic_write_text
from kdq.quant.apply import (
    Conversion,
    _tensor_key,
    check_unconverted,
    install_cast_hooks,
    model_bytes,
    remove_cast_hooks,
    subtree_targets,
)
from kdq.quant.dtypes import dequantize_int4, dequantize_int8, get_dtype, quantize_int4, quantize_int8, quantized_class
from kdq.quant.costs import DeviceCosts
from kdq.quant.errors import CostError, GroupError, ProfileError
from kdq.quant.groups import default_groups, resolve_groups
from kdq.quant.plan import GroupRecord, Plan, model_fingerprint
from kdq.quant.solve import Solution, pareto_frontier, resolve_objective, solve_mckp

TABLE_SCHEMA = "kdq.sensitivity/1"


@dataclass
class SensitivityTable:
    """Per group and candidate dtype: measured sensitivity and exact bytes.

    Attributes:
        groups: group specs in order.
        candidates: dtype names in order.
        sensitivity: ``{group: {dtype: float}}`` (``inf`` where the converted model broke).
        bytes: ``{group: {dtype: int}}``.
        rest_bytes: bytes of everything in no group (always fp32).
        baseline: the score of the unconverted model.
        tier: ``"measured"`` or ``"fisher"``.
        fingerprint: the model's fingerprint.
        meta: free-form (score name, timings).
    """

    groups: list[str]
    candidates: list[str]
    sensitivity: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, int]]
    rest_bytes: int
    baseline: float = 0.0
    tier: str = "measured"
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """``{group: {dtype: {"sensitivity": float, "bytes": int}}}``."""
        return {
            g: {d: {"sensitivity": self.sensitivity[g][d], "bytes": self.bytes[g][d]} for d in self.candidates}
            for g in self.groups
        }

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sensitivity [G, D] float, bytes [G, D] int64)`` in group/candidate order."""
        s = np.array([[self.sensitivity[g][d] for d in self.candidates] for g in self.groups], dtype=float)
        b = np.array([[self.bytes[g][d] for d in self.candidates] for g in self.groups], dtype=np.int64)
        return s, b

    def total_bytes(self, dtype: str) -> int:
        """Predicted model bytes with every group at ``dtype``."""
        return self.rest_bytes + sum(self.bytes[g][dtype] for g in self.groups)

    def to_json(self) -> str:
        def enc(v: float) -> float | None:
            return v if math.isfinite(v) else None

        data = {
            "schema": TABLE_SCHEMA,
            "tier": self.tier,
            "fingerprint": self.fingerprint,
            "candidates": self.candidates,
            "baseline": self.baseline,
            "rest_bytes": self.rest_bytes,
            "groups": {
                g: {d: {"sensitivity": enc(self.sensitivity[g][d]), "bytes": self.bytes[g][d]} for d in self.sensitivity[g]}
                for g in self.groups
            },
            "meta": self.meta,
        }
        return json.dumps(data, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SensitivityTable:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"sensitivity table is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("schema") != TABLE_SCHEMA:
            raise ProfileError(f"not a kdq sensitivity table (schema {TABLE_SCHEMA!r} expected)")
        groups = list(data["groups"])
        sens = {g: {d: (math.inf if v["sensitivity"] is None else float(v["sensitivity"])) for d, v in e.items()} for g, e in data["groups"].items()}
        nb = {g: {d: int(v["bytes"]) for d, v in e.items()} for g, e in data["groups"].items()}
        return cls(groups, list(data["candidates"]), sens, nb, int(data["rest_bytes"]), float(data.get("baseline", 0.0)),
                   data.get("tier", "measured"), data.get("fingerprint", ""), dict(data.get("meta", {})))

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        p = Path(path)
        try:
            return cls.from_json(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ProfileError(f"cache={str(p)!r} is not UTF-8 text (byte {e.start}); delete it or pass another path") from None
        except ProfileError as e:
            raise ProfileError(f"cache={str(p)!r}: {e}; delete it or pass another path") from None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="eval")


class MixedPrecisionPlanner:
    """Profile, solve and check mixed-precision plans for one model.

    Args:
        model: the float32 model (converted in place during profiling and restored after each step).
        groups: module names or ``re:`` patterns (disjoint); default ``default_groups(model)``.
        candidates: dtype names to consider; must include ``"fp32"`` (the reference).
        granularity: for the default groups, ``"layer"`` or ``"sublayer"``.

    Raises:
        GroupError: unknown or overlapping groups (with close matches).
        PlanError: unknown candidate dtypes, or a model already converted by a plan.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[str] | None = None,
        candidates: Sequence[str] = ("fp32", "fp16", "bf16", "int8"),
        *,
        granularity: str = "layer",
    ) -> None:
        check_unconverted(model, "MixedPrecisionPlanner")
        self.model = model
        cands = list(candidates)
        for c in cands:
            get_dtype(c)
        if "fp32" not in cands:
            raise bad_value(GroupError, "candidates", cands, "a list of dtype names that includes 'fp32'", "add 'fp32'")
        if len(set(cands)) != len(cands):
            raise bad_value(GroupError, "candidates", cands, "distinct dtype names")
        self.candidates = ["fp32"] + [c for c in cands if c != "fp32"]
        self.group_specs = list(groups) if groups is not None else default_groups(model, granularity=granularity)
        self.groups = resolve_groups(model, self.group_specs)
        self.fingerprint = model_fingerprint(model)

    # ------------------------------------------------------------------ bytes
    def _group_bytes(self, roots: list[str]) -> int:
        members = subtree_targets(self.model, roots, "fp32")
        modules = dict(self.model.named_modules())
        seen: set[Any] = set()
        total = 0
        for name in members:
            mod = modules[name]
            skip = mod._non_persistent_buffers_set
            tensors = [p for p in mod._parameters.values() if p is not None]
            tensors += [b for k, b in mod._buffers.items() if b is not None and k not in skip]
            for t in tensors:
                key = _tensor_key(t)
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
        return total

    def _fp32_bytes(self) -> tuple[dict[str, int], int]:
        per = {g: self._group_bytes(r) for g, r in self.groups.items()}
        rest = model_bytes(self.model) - sum(per.values())
        return per, rest

    # ------------------------------------------------------------------ measured tier
    def evaluations(self) -> int:
        """How many ``score_fn`` calls ``profile`` makes without a cache (baseline included)."""
        return 1 + len(self.groups) * (len(self.candidates) - 1)

    def profile(
        self,
        score_fn: Callable[[nn.Module], float],
        *,
        cache: str | os.PathLike[str] | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> SensitivityTable:
        """Measure every (group, candidate) by converting that group alone and calling ``score_fn``.

        Args:
            score_fn: ``score_fn(model) -> float``, lower is better (e.g. ``OutputKL``).
            cache: JSON file to resume from and to write after every evaluation (atomically).
            progress: show a tqdm bar.
            log: where the up-front summary goes (``None``: silent).

        Returns:
            The table; ``sensitivity = score - baseline``, ``inf`` if the score was not finite or the
            converted model raised (a warning names the group, the dtype and the error; profiling goes
            on). The baseline (unconverted) score must be finite and must not raise.
        """
        fp32_bytes, rest = self._fp32_bytes()
        table = SensitivityTable(
            groups=list(self.groups), candidates=list(self.candidates),
            sensitivity={g: {} for g in self.groups}, bytes={g: {} for g in self.groups},
            rest_bytes=rest, tier="measured", fingerprint=self.fingerprint,
            meta={"score": getattr(score_fn, "name", getattr(score_fn, "__name__", type(score_fn).__name__))},
        )
        done: dict[tuple[str, str], tuple[float, int]] = {}
        baseline = None
        cache_path = Path(cache) if cache is not None else None
        if cache_path is not None and cache_path.is_file():
            old = SensitivityTable.load(cache_path)
            if old.fingerprint != self.fingerprint or old.tier != "measured":
                raise ProfileError(
                    f"cache={str(cache_path)!r} was written for another model or tier (fingerprint "
                    f"{old.fingerprint}, tier {old.tier}); delete it or pass another cache path"
                )
            baseline = old.baseline if "baseline_done" in old.meta else None
            for g, row in old.sensitivity.items():
                for d, s in row.items():
                    if g in self.groups and d in self.candidates and d != "fp32":
                        done[(g, d)] = (s, old.bytes[g][d])
        todo = [(g, d) for g in self.groups for d in self.candidates[1:] if (g, d) not in done]
        n_eval = len(todo) + (baseline is None)
        if log is not None:
            log(
                f"kdq profile: {len(self.groups)} groups x {len(self.candidates) - 1} dtypes "
                f"({', '.join(self.candidates[1:])}) = {n_eval} evaluations"
                + (f" ({len(done)} cached)" if done else "")
            )
        hooks = install_cast_hooks(self.model)
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        try:
            with _progress(n_eval, "profile", progress) as bar:
                if baseline is None:
                    baseline = float(score_fn(self.model))
                    bar.update(1)
                    if not math.isfinite(baseline):
                        raise ProfileError(f"score_fn returned {baseline} for the unconverted model; it must be finite")
                table.baseline = baseline
                table.meta["baseline_done"] = True
                for g in self.groups:
                    table.sensitivity[g]["fp32"] = 0.0
                    table.bytes[g]["fp32"] = fp32_bytes[g]
                    for d in self.candidates[1:]:
                        if (g, d) in done:
                            table.sensitivity[g][d], table.bytes[g][d] = done[(g, d)]
                for g, d in todo:
                    bar.set_postfix_str(f"{d} {g}"[-48:])
                    conv = Conversion(self.model)
                    nbytes = fp32_bytes[g]  # kept if even the conversion fails (then never picked)
                    try:
                        conv.convert(subtree_targets(self.model, self.groups[g], d))
                        nbytes = self._group_bytes(self.groups[g])
                        fn = score_fn.restrict(self.groups[g]) if hasattr(score_fn, "restrict") else score_fn
                        score = float(fn(self.model))  # skipped parts are 0: unchanged output
                    except Exception as e:  # noqa: BLE001 - a conversion that breaks the model is a measurement
                        warnings.warn(
                            f"group {g!r} in {d} broke the model ({type(e).__name__}: {e}); recorded as infinitely "
                            "sensitive, so no plan will pick it",
                            stacklevel=2,
                        )
                        score = math.inf
                    finally:
                        conv.restore()
                    table.sensitivity[g][d] = score - baseline if math.isfinite(score) else math.inf
                    table.bytes[g][d] = nbytes
                    if cache_path is not None:
                        table.save(cache_path)
                    bar.update(1)
        finally:
            remove_cast_hooks(hooks)
            self.model.train(was_training)
        table.meta["seconds"] = round(time.perf_counter() - t0, 3)
        table.meta["evaluations"] = n_eval
        if cache_path is not None:
            table.save(cache_path)
        return table

    # ------------------------------------------------------------------ Fisher tier
    def profile_fisher(
        self,
        logits_fn: Callable[[nn.Module], Any],
        *,
        samples: int = 2,
        seed: int = 0,
        progress: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> SensitivityTable:
        """Estimate sensitivities from the diagonal Fisher (see the module docstring).

        Args:
            logits_fn: ``logits_fn(model) -> logits`` (or an output with ``.logits``) on calibration
                inputs; run with gradients.
            samples: backward passes, each with labels sampled from the model's own distribution.
            seed: sampling seed.
            progress: show a tqdm bar.
            log: where the up-front summary goes.
        """
        if samples < 1:
            raise bad_value(ProfileError, "samples", samples, "an integer >= 1")
        if log is not None:
            log(f"kdq profile_fisher: {samples} backward passes, {len(self.groups)} groups x {len(self.candidates) - 1} dtypes (no forward per group)")
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in params]
        fisher: dict[int, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(seed)
        positions = 0
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            with _progress(samples, "fisher", progress) as bar:
                for _ in range(samples):
                    out = logits_fn(self.model)
                    logits = getattr(out, "logits", out).float()
                    flat = logits.reshape(-1, logits.shape[-1])
                    with torch.no_grad():
                        y = torch.multinomial(F.softmax(flat.detach(), -1), 1, generator=gen).squeeze(-1)
                    F.cross_entropy(flat, y, reduction="sum").backward()
                    positions = flat.shape[0]
                    for p in params:
                        if p.grad is not None:
                            g2 = p.grad.detach().float().pow(2) / samples
                            fisher[id(p)] = fisher[id(p)] + g2 if id(p) in fisher else g2
                            p.grad = None
                    bar.update(1)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
                p.grad = None
            self.model.train(was_training)
        fp32_bytes, rest = self._fp32_bytes()
        table = SensitivityTable(
            groups=list(self.groups), candidates=list(self.candidates),
            sensitivity={g: {"fp32": 0.0} for g in self.groups}, bytes={g: {"fp32": fp32_bytes[g]} for g in self.groups},
            rest_bytes=rest, tier="fisher", fingerprint=self.fingerprint,
            meta={"score": "fisher_kl", "samples": samples, "positions": positions},
        )
        modules = dict(self.model.named_modules())
        for g, roots in self.groups.items():
            members = subtree_targets(self.model, roots, "fp32")
            for d in self.candidates[1:]:
                total = 0.0
                seen: set[int] = set()
                for name in members:
                    mod = modules[name]
                    for pname, p in mod._parameters.items():
                        if p is None or id(p) in seen or id(p) not in fisher:
                            continue
                        seen.add(id(p))
                        delta = _conversion_error(mod, pname, p, d)
                        if delta is not None:
                            total += 0.5 * float((fisher[id(p)] * delta.pow(2)).sum())
                table.sensitivity[g][d] = total / max(positions, 1)
                conv = Conversion(self.model)
                try:
                    conv.convert(subtree_targets(self.model, roots, d))
                    table.bytes[g][d] = self._group_bytes(roots)
                finally:
                    conv.restore()
        table.meta["seconds"] = round(time.perf_counter() - t0, 3)
        return table

    # ------------------------------------------------------------------ solving
    def _check_table(self, table: SensitivityTable) -> None:
        if not isinstance(table, SensitivityTable):
            raise bad_value(ProfileError, "table", type(table).__name__, "a SensitivityTable from profile()")
        if table.fingerprint and table.fingerprint != self.fingerprint:
            raise ProfileError("table was measured on a different model (fingerprint differs); profile this model")
        missing = [g for g in table.groups if g not in self.groups]
        if missing:
            raise ProfileError(f"table has groups {missing[:3]} this planner does not{close_matches(missing[0], self.groups)}")

    def solve(
        self,
        table: SensitivityTable,
        *,
        max_bytes: int | None = None,
        max_sensitivity: float | None = None,
        max_latency: float | None = None,
        objective: str | None = None,
        costs: DeviceCosts | None = None,
        extra_costs: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
        extra_limits: Mapping[str, float] | None = None,
    ) -> Plan:
        """The optimal plan under any combination of budgets, minimising ``objective``.

        ``objective=None`` keeps the original contract: fewest bytes when ``max_sensitivity`` is the
        only size/quality budget, least sensitivity otherwise (see ``kdq.quant.solve``).

        Args:
            table: from ``profile`` or ``profile_fisher``.
            max_bytes: whole-model size budget in bytes.
            max_sensitivity: total (additive) sensitivity budget.
            max_latency: seconds per call (``costs.unit``) on the device ``costs`` was measured on.
            objective: ``"sensitivity"``, ``"bytes"`` or ``"latency"`` (the last needs ``costs``).
            costs: the device cost table; its ``device`` is recorded in the plan.
            extra_costs: ``{name: {group: {dtype: cost}}}``, further additive costs with limits.
            extra_limits: ``{name: limit}`` for each extra cost (sum over groups <= limit).

        Raises:
            BudgetError: an objective not allowed, or budgets no plan meets (names the least reachable
                value of each budgeted resource).
            CostError: a latency budget/objective without ``costs``, or ``costs`` lacking a (group,
                dtype) of this table.
        """
        self._check_table(table)
        s, b = table.arrays()
        if costs is not None and not isinstance(costs, DeviceCosts):
            raise bad_value(CostError, "costs", type(costs).__name__, "a kdq.quant.DeviceCosts (or None)",
                            "load one with DeviceCosts.load(path)")
        latency = costs.array(table.groups, table.candidates) if costs is not None else None
        extra = {}
        extra_costs = dict(extra_costs or {})
        extra_limits = dict(extra_limits or {})
        if set(extra_costs) != set(extra_limits):
            raise ProfileError(f"extra_costs {sorted(extra_costs)} and extra_limits {sorted(extra_limits)} must name the same costs")
        for name, per in extra_costs.items():
            try:
                cost = np.array([[float(per[g][d]) for d in table.candidates] for g in table.groups])
            except KeyError as e:
                raise ProfileError(f"extra_costs[{name!r}] lacks an entry for {e}: give every group and candidate") from None
            extra[name] = (cost, float(extra_limits[name]))
        goal = resolve_objective(objective, max_bytes=max_bytes, max_sensitivity=max_sensitivity,
                                 max_latency=max_latency, has_latency=latency is not None)
        sol = solve_mckp(
            s, b, rest_bytes=table.rest_bytes, max_bytes=max_bytes, max_sensitivity=max_sensitivity, extra=extra,
            latency=latency, rest_latency=costs.rest_seconds if costs is not None else 0.0, max_latency=max_latency,
            objective=goal,
        )
        budget: dict[str, Any] = {
            k: v for k, v in (("max_bytes", max_bytes), ("max_sensitivity", max_sensitivity), ("max_latency", max_latency))
            if v is not None
        }
        if extra_limits:
            budget["extra_limits"] = dict(extra_limits)
        return self._plan(table, sol, budget, goal, costs)

    def _plan(
        self, table: SensitivityTable, sol: Solution, budget: dict[str, Any], objective: str = "sensitivity",
        costs: DeviceCosts | None = None,
    ) -> Plan:
        assignments: dict[str, str] = {}
        records: dict[str, GroupRecord] = {}
        limits = " and ".join(k for k in budget if k != "extra_limits") or "no budget"
        goal = f"{'fewest' if objective == 'bytes' else 'least'} {objective} within {limits}"
        for g, di in zip(table.groups, sol.choice):
            d = table.candidates[di]
            assignments[g] = d
            s0, b0 = table.sensitivity[g][d], table.bytes[g][d]
            alts = []
            for d2 in table.candidates:
                if d2 == d:
                    continue
                ds = table.sensitivity[g][d2] - s0
                alt = f"{d2} {ds:+.3g}/{(table.bytes[g][d2] - b0) / 1e6:+.2f}MB"
                if costs is not None:
                    alt += f"/{1e3 * (costs.seconds[g][d2] - costs.seconds[g][d]):+.3g}ms"
                alts.append(alt)
            records[g] = GroupRecord(dtype=d, sensitivity=float(s0), bytes=int(b0), reason=f"{goal}; vs {', '.join(alts)}")
        predicted: dict[str, Any] = {"bytes": sol.bytes, "sensitivity": sol.sensitivity}
        if sol.latency is not None:
            predicted["latency"] = sol.latency
        if sol.extra:
            predicted["extra"] = sol.extra
        meta: dict[str, Any] = {
            "tier": table.tier, "score": table.meta.get("score"), "candidates": table.candidates,
            "budget": budget, "objective": objective,
        }
        if costs is not None:
            meta["device"] = dict(costs.device)
            meta["latency_unit"] = costs.unit
        return Plan(
            assignments,
            groups=records,
            predicted=predicted,
            model={"fingerprint": self.fingerprint, "bytes_fp32": table.total_bytes("fp32")},
            meta=meta,
        )

    def frontier(
        self,
        table: SensitivityTable,
        *,
        points: int | None = 32,
        axes: tuple[str, str] = ("bytes", "sensitivity"),
        costs: DeviceCosts | None = None,
    ) -> list[dict[str, Any]]:
        """Pareto-optimal plans on two of bytes, sensitivity and latency, for plots.

        Returns ``[{"bytes", "sensitivity", ("latency",) "plan"}]`` sorted by ``axes[0]``; each plan
        records the budget on ``axes[0]`` that produced it and the objective ``axes[1]``. ``points=None``
        gives the exact frontier (see ``kdq.quant.solve.pareto_frontier``).
        """
        self._check_table(table)
        s, b = table.arrays()
        latency = costs.array(table.groups, table.candidates) if costs is not None else None
        sols = pareto_frontier(
            s, b, rest_bytes=table.rest_bytes, points=points, latency=latency,
            rest_latency=costs.rest_seconds if costs is not None else 0.0, axes=axes,
        )
        x, y = axes
        out = []
        for sol in sols:
            row: dict[str, Any] = {"bytes": sol.bytes, "sensitivity": sol.sensitivity}
            if sol.latency is not None:
                row["latency"] = sol.latency
            row["plan"] = self._plan(table, sol, {f"max_{x}": sol.value(x) if x != "bytes" else sol.bytes}, y, costs)
            out.append(row)
        return out

    def measure(self, plan: Plan, score_fn: Callable[[nn.Module], float]) -> dict[str, float]:
        """Apply ``plan`` temporarily, score it, restore: predicted against measured.

        Returns:
            ``{"predicted_sensitivity", "measured_sensitivity", "predicted_bytes", "measured_bytes"}``
            (measured sensitivity is ``score - score(fp32)``).
        """
        from kdq.quant.apply import check_rules_match, module_dtypes

        plan.check_model(self.model)
        check_rules_match(self.model, plan)
        hooks = install_cast_hooks(self.model)
        try:
            base = float(score_fn(self.model))
            conv = Conversion(self.model)
            try:
                dtypes = module_dtypes(self.model, plan)
                conv.convert({n: dtypes[n] for n, _ in self.model.named_modules()})
                measured_bytes = model_bytes(self.model)
                score = float(score_fn(self.model))
            finally:
                conv.restore()
        finally:
            remove_cast_hooks(hooks)
        return {
            "predicted_sensitivity": float(plan.predicted.get("sensitivity", math.nan)),
            "measured_sensitivity": score - base,
            "predicted_bytes": float(plan.predicted.get("bytes", math.nan)),
            "measured_bytes": float(measured_bytes),
        }


def _conversion_error(mod: nn.Module, pname: str, p: torch.Tensor, dtype: str) -> torch.Tensor | None:
    """``converted(p) - p`` in fp32 for parameter ``pname`` of ``mod`` under ``dtype`` (None: unchanged)."""
    spec = get_dtype(dtype)
    w = p.detach().float()
    if not spec.weight_only:
        return w.to(spec.storage).float() - w
    if pname == "weight" and quantized_class(mod, dtype) is not None:
        if dtype == "int8":
            q, s = quantize_int8(w)
            return dequantize_int8(q, s) - w
        q, s = quantize_int4(w)
        return dequantize_int4(q, s, w.shape[1]) - w
    return None
