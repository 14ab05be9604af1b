"""``re:`` patterns of plans and groups, matched in time linear in the module name.

Python's ``re`` backtracks: ``(\\w+\\.?)*X`` took 5 s on a 36-character module name, twice as long per
extra character, and a plan file is input that kdq reads from users. So a pattern is parsed by
Python's own parser (same syntax, same syntax errors) and run as a Thompson automaton whose state sets
are built lazily into a DFA: every character of a name costs one dict lookup once that transition has
been seen, whatever the pattern. ``re.fullmatch`` is the reference the tests compare against.

One pass over a full name answers every prefix at once: ``match_depths("a.b.c")`` says which of
``a``, ``a.b``, ``a.b.c`` the pattern fully matches, which is what plan precedence needs (a pattern's
root is the shallowest module it matches) without matching each prefix again.

Supported: the regular part of the syntax (literals, ``.``, classes such as ``[a-z]``, ``\\d``, ``\\w``,
``\\s`` and their negations, groups, ``|``, ``*``, ``+``, ``?``, ``{m,n}`` greedy or lazy, which is the same
for a yes/no match, ``^``, ``$``, ``\\A``, ``\\Z``). Refused with ``re.error``: backreferences,
lookarounds, conditionals, possessive quantifiers, atomic groups, ``\\b``/``\\B`` and flags, which module
names do not need, and patterns whose automaton exceeds ``MAX_STATES`` states (``(a{1000}){1000}``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_STATES", "NameMatcher"]

#: Largest automaton a pattern may compile to (counted repeats are unrolled).
MAX_STATES = 20_000
_CACHE_LIMIT = 200_000  # DFA transitions kept per pattern before the cache is cleared

_CHAR, _SPLIT, _START, _END, _MATCH = range(5)
_CATEGORIES: dict[object, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
}
_ALLOWED_FLAGS = re.UNICODE | re.VERBOSE  # VERBOSE only changes parsing


class NameMatcher:
    """A compiled pattern: ``fullmatch(name)`` and ``match_depths(name)``, linear in ``len(name)``.

    Args:
        pattern: the regular expression (without the ``re:`` prefix).

    Raises:
        re.error: a syntax error, a construct that is not supported (see the module docstring), or a
            pattern too large.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        parsed = _sre_parse.parse(pattern, 0)
        if parsed.state.flags & ~_ALLOWED_FLAGS:
            raise re.error("flags such as (?i) are not supported in plan patterns; spell the cases out")
        self._kind: list[int] = []
        self._arg: list[Callable[[str], bool] | None] = []
        self._out: list[list[int]] = []
        match = self._state(_MATCH, None, [])
        self._start_state = self._seq(list(parsed), match)
        self._closures: dict[tuple[frozenset[int], bool], frozenset[int]] = {}
        self._accepts: dict[tuple[frozenset[int], bool], bool] = {}
        self._step: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._initial = self._closure(frozenset([self._start_state]), at_start=True)

    # ------------------------------------------------------------------ building (Thompson, backwards)
    def _state(self, kind: int, arg: Callable[[str], bool] | None, out: list[int]) -> int:
        if len(self._kind) >= MAX_STATES:
            raise re.error(f"pattern is too large (more than {MAX_STATES} automaton states); shorten counted repeats")
        self._kind.append(kind)
        self._arg.append(arg)
        self._out.append(out)
        return len(self._kind) - 1

    def _seq(self, items: list, nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self._one(op, av, nxt)
        return nxt

    def _one(self, op, av, nxt: int) -> int:  # noqa: ANN001 - sre parse tree items
        if op is _c.LITERAL:
            ch = chr(av)
            return self._state(_CHAR, lambda c: c == ch, [nxt])
        if op is _c.NOT_LITERAL:
            ch = chr(av)
            return self._state(_CHAR, lambda c: c != ch, [nxt])
        if op is _c.ANY:
            return self._state(_CHAR, lambda c: c != "\n", [nxt])
        if op is _c.IN:
            return self._state(_CHAR, _class(av), [nxt])
        if op is _c.BRANCH:
            return self._state(_SPLIT, None, [self._seq(list(alt), nxt) for alt in av[1]])
        if op is _c.SUBPATTERN:
            _, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise re.error("flags such as (?i:...) are not supported in plan patterns; spell the cases out")
            return self._seq(list(body), nxt)
        if op is _c.MAX_REPEAT or op is _c.MIN_REPEAT:
            lo, hi, body = av
            body = list(body)
            if hi is _c.MAXREPEAT:
                loop = self._state(_SPLIT, None, [])
                self._out[loop] = [self._seq(body, loop), nxt]
                tail = loop
            else:
                tail = nxt
                for _ in range(hi - lo):
                    tail = self._state(_SPLIT, None, [self._seq(body, tail), nxt])
            for _ in range(lo):
                tail = self._seq(body, tail)
            return tail
        if op is _c.AT:
            if av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
                return self._state(_START, None, [nxt])
            if av in (_c.AT_END, _c.AT_END_STRING):
                return self._state(_END, None, [nxt])
            raise re.error(r"word boundaries (\b, \B) are not supported in plan patterns; match the '.' instead")
        raise re.error(
            f"{str(op).lower()} is not supported in plan patterns: use literals, classes, groups, '|' and "
            "repeats (no backreferences, lookarounds, conditionals, possessive or atomic groups)"
        )

    # ------------------------------------------------------------------ running (lazy DFA)
    def _closure(self, states: frozenset[int], *, at_start: bool, at_end: bool = False) -> frozenset[int]:
        key = (states, at_start) if not at_end else None
        if key is not None and key in self._closures:
            return self._closures[key]
        seen: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self._kind[s]
            if kind == _SPLIT or (kind == _START and at_start) or (kind == _END and at_end):
                stack.extend(self._out[s])
        out = frozenset(seen)
        if key is not None:
            self._closures[key] = out
        return out

    def _accepting(self, states: frozenset[int], at_start: bool) -> bool:
        key = (states, at_start)
        hit = self._accepts.get(key)
        if hit is None:
            final = self._closure(states, at_start=at_start, at_end=True)
            hit = self._accepts[key] = any(self._kind[s] == _MATCH for s in final)
        return hit

    def _next(self, states: frozenset[int], ch: str) -> frozenset[int]:
        key = (states, ch)
        nxt = self._step.get(key)
        if nxt is None:
            if len(self._step) > _CACHE_LIMIT:
                self._step.clear()
            moved = frozenset(
                self._out[s][0] for s in states if self._kind[s] == _CHAR and self._arg[s](ch)  # type: ignore[misc]
            )
            nxt = self._step[key] = self._closure(moved, at_start=False)
        return nxt

    def match_depths(self, name: str) -> Iterator[int]:
        """Yield ``k`` for each dotted prefix of ``name`` with ``k`` components that the pattern
        fully matches, shallowest first (``name`` itself is the last, ``k = name.count('.') + 1``)."""
        states = self._initial
        depth = 1
        for i, ch in enumerate(name):
            if ch == "." and i > 0 and self._accepting(states, False):
                yield depth
            if ch == ".":
                depth += 1
            states = self._next(states, ch)
            if not states:
                return
        if self._accepting(states, not name):
            yield depth

    def first_depth(self, name: str) -> int | None:
        """The number of components of the shallowest prefix of ``name`` the pattern fully matches."""
        return next(self.match_depths(name), None)

    def fullmatch(self, name: str) -> bool:
        """``re.fullmatch(pattern, name) is not None``, in linear time."""
        states = self._initial
        for ch in name:
            states = self._next(states, ch)
            if not states:
                return False
        return self._accepting(states, not name)


def _class(items: list) -> Callable[[str], bool]:
    """The predicate of a character class (``IN`` item list)."""
    negate = False
    checks: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            checks.append(lambda c, v=chr(av): c == v)
        elif op is _c.RANGE:
            checks.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
        elif op is _c.CATEGORY and av in _CATEGORIES:
            checks.append(_CATEGORIES[av])
        else:
            raise re.error(f"character class item {str(op).lower()} is not supported in plan patterns")
    return lambda c: any(f(c) for f in checks) != negate
