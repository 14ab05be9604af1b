"""``StageMixedKL``: TinyMusician's stage-mixed, bidirectional and skewed KL divergence.

The paper (Wang et al., arXiv 2509.00914) names the ingredients (forward, reverse and skewed KL,
a dynamic weighting function, temperature annealing, stages that favour global structure early
and local detail late) but not the formula. kdq's reconstruction, every part of it a knob::

    loss(step) = sum_n  w_n(step) * D_n(student, teacher; T(step), alpha, mask)

where ``D_n`` ranges over ``forward_kl``, ``reverse_kl``, ``skewed_forward_kl``,
``skewed_reverse_kl`` (and optionally ``adaptive_kl`` and ``cross_entropy`` on labels), each the
function of :mod:`kdq.losses` with reduction ``"mean"``. The weight of every temperature-softened
term includes ``T(step)**2`` when ``t2_scale=True`` (Hinton's convention: keeps gradient size
independent of ``T``); cross-entropy is at temperature 1 and never scaled. See
:func:`paper_config` for the default stages and ``docs/losses.md`` for the reasoning.

The teacher may also be a cached :class:`~kdq.losses.SparseTarget` (top-k + tail, or sampled):
each ``D_n`` is then the sparse divergence of :mod:`kdq.losses.sparse` (plain autograd, not the
fused sweep), a divergence the target cannot give raises :class:`~kdq.losses.SparseTargetError`
naming it, and the temperature at ``step`` must equal the target's (see ``docs/cached_teacher.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdq.errors import bad_value, close_matches
from kdq.losses import fused, sparse
from kdq.losses.divergences import MIN_TEMPERATURE, check_alpha, check_logits, check_mask, check_temperature
from kdq.losses.errors import LogitsShapeError, MaskError, StageMixedKLConfigError, TemperatureError
from kdq.losses.sparse import SparseTarget
from kdq.schedules import Constant, Cosine, Schedule, ScheduleError, Staged, as_schedule

_F32_TINY = float(torch.finfo(torch.float32).tiny)

#: Components StageMixedKL knows, in the order they are computed and printed.
COMPONENTS = fused.TERMS
_KL = tuple(n for n in COMPONENTS if n != "cross_entropy")

#: ``compile="auto"`` compiles the fused kernel only for logits at least this large (elements):
#: below it the one-off compilation (about 10 s on a 2-core CPU) does not pay for itself.
AUTO_COMPILE_MIN_ELEMENTS = 1 << 22

#: Default stage weights (before the T**2 factor), rows summing to 1: stage 1 (global structure)
#: leans on forward KL, stage 3 (local detail) on reverse and skewed reverse KL.
PAPER_STAGE_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "forward_kl": (0.8, 0.4, 0.1),
    "skewed_forward_kl": (0.2, 0.2, 0.2),
    "reverse_kl": (0.0, 0.2, 0.4),
    "skewed_reverse_kl": (0.0, 0.2, 0.3),
}


def paper_config(
    total_steps: int,
    *,
    boundaries: Sequence[float] = (0.3, 0.7),
    width: float = 0.1,
    transition: str = "cosine",
    temperature_start: float = 2.0,
    temperature_end: float = 1.0,
) -> dict[str, Any]:
    """kdq's reconstruction of TinyMusician's schedule: ``{"weights": {...}, "temperature": ...}``.

    Three stages split at ``boundaries`` (fractions of ``total_steps``) with smooth transitions
    ``width * total_steps`` steps wide; weights per stage from :data:`PAPER_STAGE_WEIGHTS`; the
    temperature follows a half-cosine from ``temperature_start`` to ``temperature_end`` over the
    whole run (high early: softer targets expose the teacher's global structure; 1 at the end:
    the student matches the sharp distribution it will sample from).
    """
    n = _total_steps(total_steps)
    if len(boundaries) != 2:
        raise bad_value(StageMixedKLConfigError, "boundaries", boundaries,
                        "two fractions of total_steps (three stages)", "e.g. (0.3, 0.7)")
    bounds = tuple(float(b) * n for b in boundaries)
    weights = {
        name: Staged(tuple(Constant(v) for v in vals), bounds, transition=transition, width=width * n)
        for name, vals in PAPER_STAGE_WEIGHTS.items()
    }
    return {"weights": weights, "temperature": Cosine(temperature_start, temperature_end, n)}


def _total_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise bad_value(StageMixedKLConfigError, "total_steps", total_steps, "an int >= 1",
                        "pass the number of optimizer steps of the run")
    return total_steps


class StageMixedKL(nn.Module):
    """Stage-mixed, bidirectional and skewed KL distillation loss (TinyMusician, reconstructed).

    ``loss = sum(weight * value for weight, value in kd.components(...).values())``, where the
    component ``forward_kl`` has as value exactly
    ``kdq.losses.forward_kl(s, t, temperature=kd.temperature_at(step), mask=mask)`` (and likewise
    ``reverse_kl``, ``skewed_forward_kl``, ``skewed_reverse_kl`` with ``alpha=kd.alpha``,
    ``adaptive_kl`` with ``head_mass``), and ``cross_entropy`` is the mean cross-entropy of the
    student on ``labels`` over positions that count and are not ``ignore_index``. Every scaling,
    ``T**2`` included, lives in the weight.

    With ``codebook_weights`` or ``time_weighting`` the means become weighted means over positions
    and the components are named ``weighted_<name>`` (they are no longer the plain functions).

    The module is stateless in ``step`` (safe under gradient accumulation and DDP); it only
    remembers the last step seen to print current weights in its ``repr``.

    Args:
        total_steps: optimizer steps of the run (used by the default schedules).
        weights: ``{component: schedule or number}``; default :func:`paper_config`'s. Names from
            :data:`COMPONENTS`; a component is computed iff it is listed here.
        temperature: schedule or number; default half-cosine 2.0 -> 1.0 over ``total_steps``.
        alpha: skew coefficient of the skewed terms, in [0, 1). Default 0.1 (DistiLLM).
        t2_scale: multiply the KL weights by ``T(step)**2``. Default True.
        head_mass: head mass of ``adaptive_kl``. Default 0.5.
        ignore_index: label value that does not count in ``cross_entropy``. Default -100.
        codebook_weights: ``K`` non-negative weights for logits ``[..., K, T, V]`` (axis -3).
        time_weighting: schedule evaluated at frame index ``0..T-1`` (axis -2), non-negative.
        chunk_elements: elements per chunk of the fused kernel (default 2**18).
        compile: ``"auto"`` (compile the fused kernel with ``torch.compile`` for logits of at least
            :data:`AUTO_COMPILE_MIN_ELEMENTS` elements, unless ``KDQ_COMPILE=0``), True or False.
            Any compilation failure falls back to the eager kernel with a warning.

    Shapes:
        student_logits, teacher_logits: ``[..., V]``, e.g. ``[B, K, T, V]``; mask: bool
        ``[...]``; labels: integer ``[...]``. Returns a scalar (float32, or float64 for float64).
        ``teacher_logits`` may instead be a :class:`~kdq.losses.SparseTarget` of leading shape
        ``[...]`` (a cached teacher): the components are then ``sparse_forward_kl`` and friends, the
        temperature schedule must give the target's temperature at every step used (a constant
        ``temperature=target.temperature``; or re-temper a top-k target explicitly with
        ``target.retempered(kd.temperature_at(step))``), and ``adaptive_kl`` (any target) or
        ``reverse_kl``/``skewed_reverse_kl`` (sampled targets) raise :class:`~kdq.losses.SparseTargetError`.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        weights: Mapping[str, Schedule | float | Mapping[str, Any]] | None = None,
        temperature: Schedule | float | Mapping[str, Any] | None = None,
        alpha: float = 0.1,
        t2_scale: bool = True,
        head_mass: float = 0.5,
        ignore_index: int = -100,
        codebook_weights: Sequence[float] | None = None,
        time_weighting: Schedule | float | Mapping[str, Any] | None = None,
        chunk_elements: int | None = None,
        compile: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.total_steps = _total_steps(total_steps)
        default = paper_config(self.total_steps)
        raw = default["weights"] if weights is None else weights
        if not isinstance(raw, Mapping) or not raw:
            raise bad_value(StageMixedKLConfigError, "weights", raw,
                            f"a non-empty dict from component names {COMPONENTS} to schedules")
        self.weights: dict[str, Schedule] = {}
        for name in raw:
            if name not in COMPONENTS:
                raise bad_value(StageMixedKLConfigError, "weights key", name, f"one of {COMPONENTS}",
                                close_matches(str(name), COMPONENTS).strip())
        for name in COMPONENTS:  # canonical order
            if name in raw:
                self.weights[name] = _nonnegative(_schedule(raw[name], f"weights[{name!r}]"), f"weights[{name!r}]")
        self.temperature = _schedule(default["temperature"] if temperature is None else temperature,
                                     "temperature")
        low = self.temperature.lower_bound()
        if low is not None and not low >= MIN_TEMPERATURE:
            raise bad_value(TemperatureError, "temperature", self.temperature,
                            f"a schedule >= {MIN_TEMPERATURE:g} at every step (this one goes down to {low:g})",
                            "end the annealing at a positive temperature, e.g. 1.0")
        self._alpha = check_alpha(alpha)
        if not isinstance(t2_scale, bool):
            raise bad_value(StageMixedKLConfigError, "t2_scale", t2_scale, "True or False")
        self.t2_scale = t2_scale
        hm = float(head_mass) if isinstance(head_mass, (int, float)) else float("nan")
        if not 0.0 < hm <= 1.0:
            raise bad_value(StageMixedKLConfigError, "head_mass", head_mass, "a number in (0, 1]")
        self.head_mass = hm
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise bad_value(StageMixedKLConfigError, "ignore_index", ignore_index, "an int")
        self.ignore_index = ignore_index
        self.codebook_weights = None if codebook_weights is None else _codebook_weights(codebook_weights)
        self.time_weighting = (None if time_weighting is None
                               else _nonnegative(_schedule(time_weighting, "time_weighting"), "time_weighting"))
        if chunk_elements is not None and (isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int)
                                           or chunk_elements < 1):
            raise bad_value(StageMixedKLConfigError, "chunk_elements", chunk_elements,
                            "None or an int >= 1", "None picks 2**18")
        self.chunk_elements = chunk_elements
        if compile not in (True, False, "auto"):
            raise bad_value(StageMixedKLConfigError, "compile", compile, "True, False or 'auto'")
        self.compile = compile
        self._last_step = 0.0

    # -- schedules ------------------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """Skew coefficient of the skewed terms."""
        return self._alpha

    @property
    def weighted(self) -> bool:
        """True when codebook or time weighting makes the components weighted means."""
        return self.codebook_weights is not None or self.time_weighting is not None

    def temperature_at(self, step: float) -> float:
        """Temperature at ``step``; raises :class:`TemperatureError` if the schedule gives a value
        below :data:`kdq.losses.divergences.MIN_TEMPERATURE`, or one whose ``T**2`` weight is below
        float32's range when ``t2_scale``."""
        arg = f"temperature schedule at step {step}"
        value = check_temperature(self.temperature(_step(step)), arg)
        if self.t2_scale and value * value < _F32_TINY:
            raise bad_value(TemperatureError, arg, value,
                            f"a number >= {math.sqrt(_F32_TINY):.3g} with t2_scale=True (T**2 = {value * value:.3g} "
                            "rounds to 0 in float32, which would zero the loss)",
                            "use a larger temperature, or t2_scale=False")
        return value

    def weights_at(self, step: float) -> dict[str, float]:
        """Weight of each component at ``step``, ``T**2`` included (when ``t2_scale``)."""
        s = _step(step)
        t2 = self.temperature_at(s) ** 2 if self.t2_scale else 1.0
        return {self._name(n): self._weight(n, s) * (t2 if n != "cross_entropy" else 1.0) for n in self.weights}

    def _weight(self, name: str, step: float) -> float:
        """``weights[name](step)``, refused unless finite and >= 0 (a schedule with no stated
        lower bound is only checked here, at the steps actually used)."""
        value = self.weights[name](step)
        if not (math.isfinite(value) and value >= 0):
            raise bad_value(StageMixedKLConfigError, f"weights[{name!r}] at step {step:g}", value,
                            "a finite number >= 0 (a negative weight maximises the divergence)",
                            f"fix the schedule {self.weights[name]!r}")
        return value

    def _name(self, name: str) -> str:
        return f"weighted_{name}" if self.weighted else name

    # -- the loss -------------------------------------------------------------------------------

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        step: float,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at ``step`` (a scalar tensor), by one fused sweep over the logits.

        The gradient with respect to the logits is computed during this call (chunk by chunk)
        and kept until backward: nothing else of the logits' size is stored.
        """
        plan = self._plan(student_logits, teacher_logits, step, mask, labels)
        if plan["sparse"]:
            values = self._sparse_values(student_logits, teacher_logits, plan)
            coef = plan["coef"].to(values.dtype)
            loss = torch.where(coef > 0, values * coef, 0.0).sum()
        else:
            loss, _ = fused.kd_loss(
                student_logits, teacher_logits, plan["terms"], plan["coef"],
                temperature=plan["temperature"], alpha=self._alpha, head_mass=self.head_mass,
                labels=plan["labels"], chunk_elements=self.chunk_elements,
                compile=self._compile_for(student_logits),
            )
        self._last_step = _step(step)
        return loss

    def components(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        step: float,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """``{name: (weight, value)}`` with ``loss == sum(weight * value)``; values are scalar
        tensors that carry gradients (each chunk recomputed in backward)."""
        plan = self._plan(student_logits, teacher_logits, step, mask, labels)
        if plan["sparse"]:
            values = self._sparse_values(student_logits, teacher_logits, plan)
        else:
            values = fused.kd_terms(
                student_logits, teacher_logits, plan["terms"], temperature=plan["temperature"],
                alpha=self._alpha, head_mass=self.head_mass, labels=plan["labels"],
                chunk_elements=self.chunk_elements, compile=self._compile_for(student_logits),
            )
        out: dict[str, tuple[float, torch.Tensor]] = {}
        for i, name in enumerate(plan["terms"]):
            pw = plan["position_weights"][name]
            v = torch.where(pw > 0, values[..., i] * pw.to(values.dtype), 0.0).sum()
            out[self._name(name)] = (plan["weights"][name], v / plan["denominators"][name].to(v.dtype))
        return out

    def _compile_for(self, logits: torch.Tensor) -> bool | str:
        if self.compile == "auto":
            return "auto" if logits.numel() >= AUTO_COMPILE_MIN_ELEMENTS else False
        return self.compile

    def _sparse_values(self, student, target, plan) -> torch.Tensor:
        return sparse.sparse_terms(student, target, plan["terms"], temperature=plan["temperature"],
                                   alpha=self._alpha, mask=plan["mask"], labels=plan["labels"])

    def _plan(self, student, teacher, step, mask, labels) -> dict[str, Any]:
        is_sparse = isinstance(teacher, SparseTarget)
        check_logits(student, None if is_sparse else teacher)
        s = _step(step)
        temperature = self.temperature_at(s)
        mask = check_mask(mask, student)
        terms = tuple(self.weights)
        if is_sparse:
            sparse.check_target(teacher, student, mask)
            sparse.check_terms(terms, teacher)
            temperature = sparse.resolve_temperature(
                temperature, teacher, f"temperature schedule at step {s:g}",
                f"give StageMixedKL temperature={teacher.temperature:g} (a constant) for this cached teacher, or ")
        if "cross_entropy" in terms:
            labels = self._check_labels(labels, student)
        elif labels is not None:
            labels = None  # not used: no cross-entropy component configured
        t2 = temperature**2 if self.t2_scale else 1.0
        weights = {n: self._weight(n, s) * (t2 if n != "cross_entropy" else 1.0) for n in terms}
        lead = student.shape[:-1]
        dev = student.device
        cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
        base = torch.ones(lead, dtype=cdt, device=dev) if mask is None else mask.to(cdt)
        base = base * self._position_weights(student, cdt)
        pws: dict[str, torch.Tensor] = {}
        dens: dict[str, torch.Tensor] = {}
        for n in terms:
            pw = base
            if n == "cross_entropy":
                pw = base * (labels != self.ignore_index)
            pws[n] = pw
            dens[n] = pw.sum().clamp_min(torch.finfo(cdt).tiny)
        coef = torch.stack([pws[n] * (weights[n] / dens[n]) for n in terms], dim=-1)
        safe_labels = None
        if labels is not None:
            safe_labels = torch.where(labels == self.ignore_index, 0, labels).long()
        return {"terms": terms, "coef": coef, "temperature": temperature, "labels": safe_labels,
                "weights": weights, "position_weights": pws, "denominators": dens, "sparse": is_sparse,
                "mask": mask}

    def _position_weights(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
        w: torch.Tensor | float = 1.0
        if self.codebook_weights is not None:
            k = len(self.codebook_weights)
            if logits.ndim < 4 or logits.shape[-3] != k:
                raise bad_value(LogitsShapeError, "student_logits", f"tensor(shape={tuple(logits.shape)})",
                                f"[..., K={k}, T, V] to match the {k} codebook_weights",
                                "pass codebook_weights=None for logits without a codebook axis")
            cw = torch.tensor(self.codebook_weights, dtype=dtype, device=logits.device)
            w = cw[:, None]
        if self.time_weighting is not None:
            if logits.ndim < 2:
                raise bad_value(LogitsShapeError, "student_logits", f"tensor(shape={tuple(logits.shape)})",
                                "[..., T, V] with a time axis for time_weighting")
            tw = [self.time_weighting(i) for i in range(logits.shape[-2])]
            if any(not math.isfinite(x) or x < 0 for x in tw):
                raise bad_value(StageMixedKLConfigError, "time_weighting", self.time_weighting,
                                "a schedule with finite values >= 0 at every frame index")
            w = w * torch.tensor(tw, dtype=dtype, device=logits.device)
        return w

    def _check_labels(self, labels: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise bad_value(StageMixedKLConfigError, "labels", None,
                            "an integer tensor when weights include 'cross_entropy'",
                            "pass labels=... or drop 'cross_entropy' from weights")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise bad_value(MaskError, "labels", labels if not isinstance(labels, torch.Tensor)
                            else f"tensor(dtype={labels.dtype})", "an integer tensor of class indices")
        if labels.shape != logits.shape[:-1]:
            raise bad_value(LogitsShapeError, "labels", f"tensor(shape={tuple(labels.shape)})",
                            f"shape {tuple(logits.shape[:-1])} (the logits' shape without the vocabulary)")
        labels = labels.to(logits.device)
        keep = labels != self.ignore_index
        bad = keep & ((labels < 0) | (labels >= logits.shape[-1]))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise bad_value(LogitsShapeError, "labels", f"a tensor containing {value}",
                            f"class indices in [0, {logits.shape[-1]}) or ignore_index={self.ignore_index}")
        return labels

    # -- config ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data that :meth:`from_dict` turns back into an equal module."""
        return {
            "total_steps": self.total_steps,
            "weights": {n: w.to_dict() for n, w in self.weights.items()},
            "temperature": self.temperature.to_dict(),
            "alpha": self._alpha,
            "t2_scale": self.t2_scale,
            "head_mass": self.head_mass,
            "ignore_index": self.ignore_index,
            "codebook_weights": None if self.codebook_weights is None else list(self.codebook_weights),
            "time_weighting": None if self.time_weighting is None else self.time_weighting.to_dict(),
            "chunk_elements": self.chunk_elements,
            "compile": self.compile,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageMixedKL:
        """Rebuild from :meth:`to_dict` output; unknown keys raise :class:`StageMixedKLConfigError`."""
        if not isinstance(data, Mapping) or "total_steps" not in data:
            raise bad_value(StageMixedKLConfigError, "data", data, "a dict from StageMixedKL.to_dict()")
        allowed = list(_CONFIG_KEYS)
        for key in data:
            if key not in allowed:
                raise bad_value(StageMixedKLConfigError, "config key", key, f"one of {allowed}",
                                close_matches(str(key), allowed).strip())
        kwargs = dict(data)
        total = kwargs.pop("total_steps")
        return cls(total, **kwargs)

    def describe(self, step: float) -> str:
        """The loss formula at ``step`` with its numeric weights."""
        w = self.weights_at(step)
        terms = " + ".join(f"{v:.4g}*{n}" for n, v in w.items())
        t = self.temperature_at(step)
        note = f"T={t:.4g}, alpha={self._alpha:g}" + (f", KL weights include T^2={t * t:.4g}" if self.t2_scale else "")
        return f"loss(step={_step(step):g}) = {terms}   [{note}]"

    def extra_repr(self) -> str:
        lines = [f"total_steps={self.total_steps}, alpha={self._alpha:g}, t2_scale={self.t2_scale}, "
                 f"compile={self.compile!r}",
                 f"T(step) = {self.temperature!r}"]
        lines += [f"w[{n}](step) = {s!r}" for n, s in self.weights.items()]
        if self.codebook_weights is not None:
            lines.append(f"codebook_weights = {list(self.codebook_weights)}")
        if self.time_weighting is not None:
            lines.append(f"time_weighting(frame) = {self.time_weighting!r}")
        lines.append(self.describe(self._last_step))
        return "\n".join(lines)


_CONFIG_KEYS = ("total_steps", "weights", "temperature", "alpha", "t2_scale", "head_mass", "ignore_index",
                "codebook_weights", "time_weighting", "chunk_elements", "compile")


def _schedule(value: Any, arg: str) -> Schedule:
    try:
        return as_schedule(value, arg)
    except ScheduleError as exc:
        raise StageMixedKLConfigError(str(exc)) from None


def _nonnegative(schedule: Schedule, arg: str) -> Schedule:
    """``schedule``, refused if its lower bound is below 0 (a negative loss weight maximises its
    divergence; a negative time weight does the same on those frames)."""
    low = schedule.lower_bound()
    if low is not None and not low >= 0:
        raise bad_value(StageMixedKLConfigError, arg, schedule,
                        f"a schedule >= 0 at every step (this one goes down to {low:g})",
                        "a negative weight maximises the divergence; end ramps at 0 or above")
    return schedule


def _codebook_weights(values: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if not out or any(not math.isfinite(v) or v < 0 for v in out) or not any(out):
        raise bad_value(StageMixedKLConfigError, "codebook_weights", values,
                        "a non-empty sequence of finite numbers >= 0, not all 0", "e.g. [1.0, 0.8, 0.6, 0.4]")
    return out


def _step(step: Any) -> float:
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
        raise bad_value(StageMixedKLConfigError, "step", step, "a finite number >= 0",
                        "pass the optimizer step (the same for every micro-batch of an accumulation)")
    return float(step)
