"""Public divergences between a student's and a teacher's logits.

Every function takes logits ``[..., V]`` (any leading shape, e.g. ``[B, K, T, V]`` for K
codebooks), forms ``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` per position, and
returns a reduced value. Shared arguments:

- ``temperature`` (float > 0): the ``T`` above. No ``T**2`` factor is applied here: kdq puts any
  such scaling in the weights of :class:`~kdq.losses.StageMixedKL` (see ``docs/losses.md``).
- ``mask`` (bool ``[...]`` = ``logits.shape[:-1]``, optional): True where a position counts.
  Masked positions contribute 0 to the value and receive exactly zero gradient.
- ``reduction``: ``"none"`` (per-position values ``[...]``, 0 where masked), ``"sum"``, or
  ``"mean"`` (sum over counted positions divided by their number; 0, not NaN, when none count).

Values are computed in float32 at least whatever the input dtype (float64 stays float64), through
the fused chunked kernel of :mod:`kdq.losses.fused`; :mod:`kdq.losses.reference` holds the plain
implementations they are tested against.
"""

from __future__ import annotations

import math

import torch

from kdq.errors import bad_value, close_matches
from kdq.losses import fused
from kdq.losses.errors import (
    AlphaError,
    LogitsShapeError,
    LossInputError,
    MaskError,
    ReductionError,
    TemperatureError,
)

REDUCTIONS = ("none", "sum", "mean")

#: The smallest temperature accepted: the smallest normal float32 (about 1.18e-38). Below it
#: ``1 / T`` overflows float32 (or ``T`` is subnormal) and the softened logits are meaningless.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def check_logits(student: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
    """Raise :class:`LogitsShapeError` unless the logits are floating ``[..., V]`` (``V >= 1``) of
    equal shape."""
    if not isinstance(student, torch.Tensor) or not student.is_floating_point() or student.ndim < 1:
        raise bad_value(LogitsShapeError, "student_logits", _describe(student),
                        "a floating-point tensor [..., V]", "pass the model's raw logits")
    if student.shape[-1] == 0:
        raise bad_value(LogitsShapeError, "student_logits", _describe(student),
                        "a vocabulary axis of V >= 1 entries (the last axis)",
                        "pass logits over the vocabulary, not an empty slice")
    if teacher is None:
        return
    if not isinstance(teacher, torch.Tensor) or not teacher.is_floating_point():
        raise bad_value(LogitsShapeError, "teacher_logits", _describe(teacher),
                        "a floating-point tensor [..., V]", "pass the teacher's raw logits")
    if teacher.shape != student.shape:
        what = ("different vocabulary sizes" if teacher.shape[:-1] == student.shape[:-1]
                else "different shapes")
        raise bad_value(LogitsShapeError, "teacher_logits", _describe(teacher),
                        f"the student's shape {tuple(student.shape)} ({what})",
                        "teacher and student must share positions and vocabulary; slice or pad "
                        "the vocabulary to match")
    if teacher.device != student.device:
        raise bad_value(LogitsShapeError, "teacher_logits", f"tensor on {teacher.device}",
                        f"a tensor on the student's device {student.device}", "move it with .to()")


def check_temperature(temperature: float, arg: str = "temperature") -> float:
    """Return ``temperature`` as a float, or raise :class:`TemperatureError` unless it is finite and
    at least :data:`MIN_TEMPERATURE`."""
    allowed = f"a finite number >= {MIN_TEMPERATURE:g} (below it 1/T overflows float32)"
    try:
        value = float(temperature)
    except (TypeError, ValueError, OverflowError):
        raise bad_value(TemperatureError, arg, temperature, allowed) from None
    if not math.isfinite(value) or value < MIN_TEMPERATURE:
        raise bad_value(TemperatureError, arg, temperature, allowed,
                        "1.0 leaves the logits unchanged; larger values soften both distributions")
    return value


def check_alpha(alpha: float, arg: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise :class:`AlphaError` unless it lies in [0, 1)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise bad_value(AlphaError, arg, alpha, "a number in [0, 1)") from None
    if not (0.0 <= value < 1.0):
        raise bad_value(AlphaError, arg, alpha, "a number in [0, 1)",
                        "0 gives the unskewed divergence; DistiLLM's default is 0.1")
    return value


def check_mask(mask: torch.Tensor | None, logits: torch.Tensor, arg: str = "mask") -> torch.Tensor | None:
    """Raise :class:`MaskError` unless ``mask`` is None or bool of shape ``logits.shape[:-1]``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise bad_value(MaskError, arg, _describe(mask), "a bool tensor (True where a position counts)",
                        "convert with mask.bool() or (labels != ignore_index)")
    if mask.shape != logits.shape[:-1]:
        raise bad_value(MaskError, arg, _describe(mask),
                        f"shape {tuple(logits.shape[:-1])} (the logits' shape without the vocabulary axis)",
                        "build the mask per position, not per vocabulary entry")
    return mask.to(logits.device)


def check_reduction(reduction: str) -> str:
    """Raise :class:`ReductionError` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise bad_value(ReductionError, "reduction", reduction, f"one of {REDUCTIONS}",
                        close_matches(str(reduction), REDUCTIONS).strip())
    return reduction


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return repr(x)


# ---------------------------------------------------------------------------------------------
# reduction
# ---------------------------------------------------------------------------------------------


def reduce(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply ``mask`` (0 where False, with zero gradient) and ``reduction`` to per-position values."""
    if mask is not None:
        values = torch.where(mask, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = values.numel() if mask is None else mask.sum()
    if isinstance(count, int):
        return total / count if count else total * 0.0
    return total / count.clamp_min(1).to(total.dtype)


def _terms(student, teacher, term, *, temperature, alpha, mask, reduction, head_mass=0.5):
    check_logits(student, teacher)
    temperature = check_temperature(temperature)
    alpha = check_alpha(alpha)
    mask = check_mask(mask, student)
    check_reduction(reduction)
    values = fused.kd_terms(student, teacher, (term,), temperature=temperature, alpha=alpha,
                            head_mass=head_mass)[..., 0]
    return reduce(values, mask, reduction)


# ---------------------------------------------------------------------------------------------
# public divergences
# ---------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL, ``KL(p || q) = sum_v p (log p - log q)`` (mode covering; Hinton et al. 2015).

    The true divergence, teacher entropy included: 0 when student equals teacher.

    Args:
        student_logits: ``[..., V]`` student logits (any float dtype).
        teacher_logits: ``[..., V]`` teacher logits, same shape.
        temperature: ``T`` > 0 dividing both logits. No ``T**2`` factor.
        mask: bool ``[...]``, True where a position counts.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        float32 (or float64) tensor: ``[...]`` for ``"none"``, else a scalar.

    Raises:
        LogitsShapeError, TemperatureError, MaskError, ReductionError: on bad input.
    """
    return _terms(student_logits, teacher_logits, "forward_kl", temperature=temperature, alpha=0.0,
                  mask=mask, reduction=reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reverse KL, ``KL(q || p) = sum_v q (log q - log p)`` (mode seeking; Gu et al. MiniLLM 2024).

    Arguments, return value and errors as :func:`forward_kl`.
    """
    return _terms(student_logits, teacher_logits, "reverse_kl", temperature=temperature, alpha=0.0,
                  mask=mask, reduction=reduction)


def skewed_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skewed forward KL, ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM, Ko et al. ICML 2024).

    ``alpha = 0`` gives :func:`forward_kl`; for ``alpha > 0`` the value never exceeds
    ``-log(alpha)`` (the mixture keeps ``alpha p`` under every teacher token), which keeps the
    gradient bounded where the student puts no mass.

    Args:
        alpha: skew coefficient in [0, 1).
        Other arguments as :func:`forward_kl`.

    Raises:
        AlphaError: ``alpha`` outside [0, 1); and the errors of :func:`forward_kl`.
    """
    return _terms(student_logits, teacher_logits, "skewed_forward_kl", temperature=temperature,
                  alpha=alpha, mask=mask, reduction=reduction)


def skewed_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skewed reverse KL, ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM, Ko et al. ICML 2024).

    ``alpha = 0`` gives :func:`reverse_kl`; bounded by ``-log(alpha)`` for ``alpha > 0``.
    Arguments and errors as :func:`skewed_forward_kl`.
    """
    return _terms(student_logits, teacher_logits, "skewed_reverse_kl", temperature=temperature,
                  alpha=alpha, mask=mask, reduction=reduction)


def adaptive_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    head_mass: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Adaptive KL (AKL, Wu et al. COLING 2025): forward KL on the head, reverse KL on the tail.

    Per position, sort the vocabulary by teacher probability; the head is the tokens whose
    preceding teacher mass is below ``head_mass`` (so the top token is always head), the tail is
    the rest. With ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|``::

        AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)

    The two ratios carry no gradient (as in the paper's code) and are 1/2 each when ``p == q``.

    Args:
        head_mass: teacher probability mass of the head, in (0, 1]. Default 0.5 (the paper's mu).
        Other arguments as :func:`forward_kl`.
    """
    try:
        hm = float(head_mass)
    except (TypeError, ValueError):
        hm = float("nan")
    if not (0.0 < hm <= 1.0):
        raise bad_value(LossInputError, "head_mass", head_mass, "a number in (0, 1]", "the paper uses 0.5")
    return _terms(student_logits, teacher_logits, "adaptive_kl", temperature=temperature, alpha=0.0,
                  mask=mask, reduction=reduction, head_mass=hm)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. ICLR 2024)::

        JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

    That is ``beta * skewed_forward_kl(alpha=beta) + (1 - beta) * skewed_reverse_kl(alpha=1-beta)``,
    which is how it is computed (one fused sweep each). Symmetric for ``beta = 0.5``; bounded by the
    binary entropy ``-beta log beta - (1 - beta) log(1 - beta)``.

    Args:
        beta: mixture weight in (0, 1).
        Other arguments as :func:`forward_kl`.
    """
    try:
        b = float(beta)
    except (TypeError, ValueError):
        b = float("nan")
    if not (0.0 < b < 1.0):
        raise bad_value(AlphaError, "beta", beta, "a number in (0, 1)",
                        "use forward_kl or reverse_kl for the end points")
    kw = {"temperature": temperature, "mask": mask, "reduction": reduction}
    return b * skewed_forward_kl(student_logits, teacher_logits, alpha=b, **kw) + (
        1.0 - b
    ) * skewed_reverse_kl(student_logits, teacher_logits, alpha=1.0 - b, **kw)
