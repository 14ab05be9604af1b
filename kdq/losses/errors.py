"""Typed errors raised by :mod:`kdq.losses` for bad input.

Each is a :class:`kdq.errors.KdqError` (hence a ``ValueError``) whose message names the argument,
the value received, what is allowed and the fix.
"""

from __future__ import annotations

from kdq.errors import KdqError


class LossInputError(KdqError):
    """Base class for bad arguments to a kdq loss."""


class LogitsShapeError(LossInputError):
    """Student and teacher logits (or labels) do not have compatible shapes."""


class MaskError(LossInputError):
    """A mask (or position weights) of the wrong shape or dtype."""


class TemperatureError(LossInputError):
    """A temperature that is not a finite number > 0."""


class AlphaError(LossInputError):
    """A skew coefficient outside [0, 1) (or a JSD beta outside (0, 1))."""


class ReductionError(LossInputError):
    """An unknown reduction name."""


class StageMixedKLConfigError(LossInputError):
    """A bad :class:`kdq.losses.StageMixedKL` configuration value."""
