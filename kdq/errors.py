"""Typed errors shared by kdq's subsystems.

Every error a user can cause is a ``ValueError`` subclass whose message names the argument, the
value received, what is allowed and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class KdqError(ValueError):
    """Base class for kdq's user-facing errors."""


def bad_value(cls: type[KdqError], arg: str, value: Any, allowed: str, fix: str = "") -> KdqError:
    """Build ``cls`` with the house message: argument, value, what is allowed, fix."""
    msg = f"{arg}={value!r} is not allowed: {allowed}"
    if fix:
        msg += f"; {fix}"
    return cls(msg)


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A ``did you mean`` suffix listing the candidates closest to ``name`` (empty if none)."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""
