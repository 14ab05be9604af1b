"""Typed errors of the mixed-precision planner (all ``ValueError`` subclasses via ``KdqError``)."""

from __future__ import annotations

from kdq.errors import KdqError


class PlanError(KdqError):
    """A malformed plan file, an unknown dtype, or a plan applied to a model it does not fit."""


class GroupError(KdqError):
    """A group name or pattern that names no module, or groups that overlap."""


class BudgetError(KdqError):
    """A size or sensitivity budget that no assignment of the candidates can meet."""


class ProfileError(KdqError):
    """Bad profiling input: a score function that returned a non-number, or a stale cache."""


class ModelFolderError(KdqError):
    """A model folder kdq cannot read (missing or corrupt files, unknown architecture) or will not write
    into (weights that ``from_pretrained`` would load instead of kdq's)."""


class CostError(KdqError):
    """A device cost table that is malformed or lacks a (group, dtype) a solve needs, or a latency
    budget or objective given without one."""
