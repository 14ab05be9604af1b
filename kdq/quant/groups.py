"""Planner groups: which modules are converted together.

A group is given as a module name (that module's whole subtree) or ``"re:<regex>"`` (one group made
of the subtrees of the *topmost* modules whose full name the regex matches, as plan patterns do
(``kdq.quant.pattern``, linear time), e.g.
``"re:.*layers\\.0\\.(fc1|fc2)"`` is one group holding two Linear layers). Groups must be disjoint.
A solved plan writes one rule per group with the group's spelling as the rule, so a plan's rules and
the planner's groups read the same.

``default_groups(model)`` picks a granularity without knowing the architecture: every element of a
``ModuleList``/``ModuleDict`` (a transformer layer, a codec block, a per-codebook head) is a group;
``Linear``/``Embedding``/other weight-holding modules outside such stacks are groups of their own;
modules holding less than ``min_fraction`` of the model's bytes are left out (they stay fp32).
``granularity="sublayer"`` splits each stack element into its weight-holding children (attention,
MLP, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from kdq.errors import bad_value, close_matches
from kdq.quant.apply import model_bytes, subtree_targets
from kdq.quant.errors import GroupError
from kdq.quant.pattern import NameMatcher
from kdq.quant.plan import PATTERN_PREFIX

GRANULARITIES = ("layer", "sublayer")


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def group_roots(model: nn.Module, spec: str, *, names: Sequence[str] | None = None) -> list[str]:
    """The topmost module names a group spec covers; raises ``GroupError`` if it covers none."""
    names = [n for n, _ in model.named_modules() if n] if names is None else list(names)
    if not isinstance(spec, str) or not spec or spec == PATTERN_PREFIX:
        raise bad_value(GroupError, "groups entry", spec, "a module name or 're:<regex>'")
    if spec.startswith(PATTERN_PREFIX):
        try:
            matcher = NameMatcher(spec[len(PATTERN_PREFIX) :])
        except re.error as e:
            raise GroupError(f"groups entry {spec!r} is not a regular expression kdq can match: {e}") from None
        hits = [n for n in names if matcher.fullmatch(n)]
        if not hits:
            raise GroupError(f"groups entry {spec!r} matches no module of this model; check the pattern")
        roots: list[str] = []
        for n in hits:  # named_modules order is parent-before-child
            if not any(_inside(n, r) for r in roots):
                roots.append(n)
        return roots
    if spec not in set(names):
        raise GroupError(
            f"groups entry {spec!r} names no module of this model{close_matches(spec, names)}; "
            "list names with model.named_modules()"
        )
    return [spec]


def resolve_groups(model: nn.Module, groups: Sequence[str]) -> dict[str, list[str]]:
    """``{group spec: [root module names]}``, checking that groups exist and do not overlap."""
    if isinstance(groups, str) or not isinstance(groups, Sequence) or not groups:
        raise bad_value(GroupError, "groups", groups, "a non-empty list of module names or 're:' patterns")
    names = [n for n, _ in model.named_modules() if n]
    out: dict[str, list[str]] = {}
    member_of: dict[str, str] = {}
    for spec in groups:
        if spec in out:
            raise GroupError(f"groups lists {spec!r} twice; list each group once")
        roots = group_roots(model, spec, names=names)
        out[spec] = roots
        for member in subtree_targets(model, roots, "fp32"):
            other = member_of.get(member)
            if other is not None:
                raise GroupError(
                    f"groups {other!r} and {spec!r} overlap (both contain {member!r}): groups must be "
                    "disjoint; drop one or split the larger group into its children"
                )
            member_of[member] = spec
    return out


def _holds(mod: nn.Module) -> bool:
    skip = mod._non_persistent_buffers_set
    return any(p is not None and p.is_floating_point() for p in mod._parameters.values()) or any(
        b is not None and k not in skip and b.is_floating_point() for k, b in mod._buffers.items()
    )


def default_groups(model: nn.Module, *, granularity: str = "layer", min_fraction: float = 1e-3) -> list[str]:
    """Groups at a sensible granularity for any model (see the module docstring).

    Args:
        model: the model.
        granularity: ``"layer"`` (each stack element) or ``"sublayer"`` (its weight-holding children).
        min_fraction: leave out groups holding less than this fraction of ``model_bytes(model)``.

    Returns:
        Disjoint module names in model order.
    """
    if granularity not in GRANULARITIES:
        raise bad_value(GroupError, "granularity", granularity, f"one of {GRANULARITIES}")
    total = model_bytes(model)
    seen: set[int] = set()  # tensors already grouped (tied weights go with their first holder)
    out: list[str] = []

    def bytes_new(mod: nn.Module) -> int:
        n = 0
        for t in mod.state_dict(keep_vars=True).values():
            if id(t) not in seen:
                n += t.numel() * t.element_size()
        return n

    def take(name: str, mod: nn.Module) -> None:
        if bytes_new(mod) >= min_fraction * total and bytes_new(mod) > 0:
            out.append(name)
            for t in mod.state_dict(keep_vars=True).values():
                seen.add(id(t))

    def visit(name: str, mod: nn.Module, in_stack: bool) -> None:
        if bytes_new(mod) == 0:
            return
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            for child_name, child in mod.named_children():
                full = f"{name}.{child_name}" if name else child_name
                if granularity == "sublayer" and not in_stack and bytes_new(child) > 0:
                    visit_sub(full, child)
                else:
                    take(full, child)
            return
        if _holds(mod) or not any(True for _ in mod.children()):
            take(name, mod)
            return
        for child_name, child in mod.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, in_stack)

    def visit_sub(name: str, mod: nn.Module) -> None:
        if _holds(mod) or not any(True for _ in mod.children()):
            take(name, mod)
            return
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}"
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit_sub(full, child)
            elif bytes_new(child) > 0:
                take(full, child)

    visit("", model, False)
    return out
