"""Distillation losses: divergences between student and teacher logits, and ``StageMixedKL``.

- :func:`forward_kl`, :func:`reverse_kl`, :func:`skewed_forward_kl`, :func:`skewed_reverse_kl`,
  :func:`adaptive_kl`, :func:`generalized_jsd`: logits ``[..., V]``, optional bool mask, reduction.
- :class:`StageMixedKL`: TinyMusician's stage-mixed, bidirectional and skewed KL with scheduled
  weights and temperature, computed by one fused, chunked sweep over the logits.
- :mod:`kdq.losses.reference`: the plain implementations everything is tested against.

See ``docs/losses.md`` for the formulas and conventions.
"""

from kdq.losses.divergences import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
)
from kdq.losses.errors import (
    AlphaError,
    LogitsShapeError,
    LossInputError,
    MaskError,
    ReductionError,
    StageMixedKLConfigError,
    TemperatureError,
)
from kdq.losses import fused, reference
from kdq.losses.stage_mixed import StageMixedKL, paper_config

__all__ = [
    "AlphaError",
    "LogitsShapeError",
    "LossInputError",
    "MaskError",
    "ReductionError",
    "StageMixedKL",
    "StageMixedKLConfigError",
    "TemperatureError",
    "adaptive_kl",
    "forward_kl",
    "generalized_jsd",
    "paper_config",
    "reverse_kl",
    "skewed_forward_kl",
    "skewed_reverse_kl",
]
