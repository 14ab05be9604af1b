"""Sparse teacher targets, and the divergences of a student's logits to them.

Distilling from a cached (offline) teacher means running the teacher once, keeping a few numbers per
position, and training the student later against them. A dense fp16 teacher distribution costs
``2 V`` bytes per position (4 KiB at ``V = 2048``); a :class:`SparseTarget` keeps ``k`` or ``n``
entries, in one of two forms:

``"topk"`` (top-k plus tail):
    ``indices [..., k]`` of the teacher's ``k`` most likely tokens, ``log_probs [..., k]`` their
    log-probabilities ``log p(v)``, and ``tail [...]``, the log of the mass outside them,
    ``log(1 - sum_k p(v))``, as one bucket. The kept object is the (k+1)-bucket distribution
    ``P = (p(v_1), ..., p(v_k), P_tail)``; the shape of the tail is lost.

``"sampled"`` (Sparse Logit Sampling, Anshumann et al., arXiv 2503.16870):
    ``n`` tokens drawn with replacement from a proposal ``r`` (by default the teacher distribution
    itself; optionally the teacher at another temperature), stored as the distinct tokens drawn
    (``indices [..., n]``), their teacher log-probabilities ``log_probs [..., n]`` and importance
    weights ``weights [..., n]`` with ``w(x) = c(x) / n * p(x) / r(x)`` for a token drawn ``c(x)``
    times, so that ``sum_i w_i f(x_i)`` is an unbiased estimate of ``E_p[f]`` for every ``f``. With
    ``r = p`` (the default) the weights are exactly the counts over ``n`` and sum to 1. Slots past
    the distinct tokens have weight 0 and do nothing.

Divergences (per position; ``q = softmax(student / T)``; Q is q lumped into the target's buckets):

==========================  =========================================  =====================================
function                    top-k + tail                               sampled
==========================  =========================================  =====================================
sparse_forward_kl           ``KL(P || Q)``                             ``sum_i w_i (log p(x_i) - log q(x_i))``
sparse_reverse_kl           ``KL(Q || P)``                             refused (see below)
sparse_skewed_forward_kl    ``KL(P || a P + (1 - a) Q)``               ``sum_i w_i (log p - log(a p + (1 - a) q))(x_i)``
sparse_skewed_reverse_kl    ``KL(Q || a Q + (1 - a) P)``               refused
==========================  =========================================  =====================================

``Q = (q(v_1), ..., q(v_k), Q_tail)`` with ``Q_tail = 1 - sum_k q(v)``, computed as the log-sum-exp
of the student's log-probabilities outside the k indices (exact even when ``Q_tail`` is tiny).

**The top-k bound.** Lumping the tail into one bucket is one deterministic map applied to both
distributions, so by the data-processing inequality every bucketed divergence here is a lower
bound of its dense counterpart. For the forward KL the gap is exact (the chain rule of KL)::

    KL(p || q) = KL(P || Q) + P_tail * KL(p(. | tail) || q(. | tail))  >=  KL(P || Q)

with equality iff ``P_tail = 0`` (``k = V``) or the student's tail is proportional to the
teacher's. Reverse KL swaps the roles (gap ``Q_tail * KL(q(.|tail) || p(.|tail))``); the skewed
forms are bounded because lumping commutes with mixing (``lump(a p + (1-a) q) = a P + (1-a) Q``).

**The sampled estimator** is unbiased for the forward KL itself (``E_{x~p}[log p(x) - log q(x)] =
KL(p || q)``, teacher entropy included), and its gradient with respect to the student's logits,
``(sum_i w_i) q - sum_i w_i onehot(x_i)`` (over ``T``), is unbiased for the dense gradient
``q - p``; what it costs is variance. The skewed forward KL is an expectation under ``p`` too, so
the same weights estimate it without bias. **Reverse KL is refused for sampled targets:** it is an
expectation under the student, ``E_{x~q}[log q(x) - log p(x)]``. Importance weights ``q / r`` would
make it formally unbiased, but their variance grows with ``sum_x q(x)^2 / r(x)``, largest exactly
where the student puts mass the teacher finds unlikely (the mass reverse KL exists to penalise),
and those tokens are almost never in a cache drawn from the teacher. An honest estimator needs
samples from the student itself (on-policy, as MiniLLM and GKD draw them), which a cache written
before training cannot hold. ``adaptive_kl`` is refused for both forms: it sorts the whole teacher
distribution into head and tail.

**Temperature.** A target is stored at one temperature, ``target.temperature`` (the ``T0`` of
:func:`topk_target` / :func:`sampled_target`), which should be the temperature the student is
trained at. The losses use it when ``temperature`` is None and refuse any other value: a cached
distribution cannot be re-tempered exactly. Keeping the top-k logits and the log-partition instead
of the log-probabilities would not help: the logits' shift is arbitrary, so the two carry the same
information about the kept tokens, and neither keeps the tail's shape, which re-tempering needs.
For top-k targets :meth:`SparseTarget.retempered` re-tempers explicitly, exactly on the kept tokens
and with the tail approximated as uniform over its ``V - k`` tokens (an upper bound of the true
tempered tail mass for ``T > T0``, a lower bound for ``T < T0``, by the power-mean inequality);
sampled targets cannot be re-tempered (``p_T(x) / p_T0(x)`` needs the partition function at ``T``).
No ``T**2`` factor is applied here, as in :mod:`kdq.losses.divergences`.

Masks, reductions and dtypes follow :mod:`kdq.losses.divergences`: ``mask`` is bool ``[...]``
(True where a position counts; masked positions contribute 0 and receive exactly zero gradient,
whatever their logits or stored target hold), ``reduction`` is ``"none" | "sum" | "mean"`` and
values are float32 at least. These losses are plain autograd (gathers on ``[..., k]`` after one
log-softmax of the student): the dense functions are their reference, through the bound above.
See ``docs/cached_teacher.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kdq.errors import bad_value
from kdq.losses.divergences import (
    _describe,
    check_alpha,
    check_logits,
    check_mask,
    check_reduction,
    check_temperature,
    reduce,
)
from kdq.losses.errors import LogitsShapeError, LossInputError, TemperatureError
from kdq.losses.reference import _kl, _log_mix

__all__ = [
    "KINDS",
    "SparseTarget",
    "SparseTargetError",
    "check_target",
    "sampled_target",
    "sparse_forward_kl",
    "sparse_reverse_kl",
    "sparse_skewed_forward_kl",
    "sparse_skewed_reverse_kl",
    "sparse_terms",
    "supported_terms",
    "topk_target",
]

KINDS = ("topk", "sampled")

#: Terms each kind of target supports (``cross_entropy`` reads labels, not the target).
_SUPPORTED = {
    "topk": ("forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "cross_entropy"),
    "sampled": ("forward_kl", "skewed_forward_kl", "cross_entropy"),
}

_WHY_NOT = {
    ("sampled", "reverse_kl"): "reverse KL is an expectation under the student, and the cached tokens were drawn "
                               "from the teacher (see kdq.losses.sparse)",
    ("sampled", "skewed_reverse_kl"): "skewed reverse KL is an expectation under the student, and the cached tokens "
                                      "were drawn from the teacher (see kdq.losses.sparse)",
    ("topk", "adaptive_kl"): "adaptive_kl sorts the whole teacher distribution into head and tail, which a sparse "
                             "target has not kept",
    ("sampled", "adaptive_kl"): "adaptive_kl sorts the whole teacher distribution into head and tail, which a sparse "
                                "target has not kept",
}


class SparseTargetError(LossInputError):
    """A malformed :class:`SparseTarget`, a bad argument to a builder, or a divergence the target
    cannot give."""


def _shown(x: object) -> object:
    """What an error message shows for ``x``: a tensor's shape and dtype, anything else as itself."""
    return _describe(x) if isinstance(x, torch.Tensor) else x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _int_arg(value: object, arg: str, allowed: str, fix: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        raise bad_value(SparseTargetError, arg, value, allowed, fix)
    return int(value)


@dataclass(frozen=True, eq=False)
class SparseTarget:
    """A teacher's per-position distribution in sparse form (see the module docstring).

    Attributes:
        kind: ``"topk"`` or ``"sampled"``.
        indices: integer ``[..., s]`` token indices (``s = k`` or ``n``), in ``[0, vocab)``.
        log_probs: float ``[..., s]``, the teacher's ``log p_T0`` at ``indices``.
        vocab: the teacher's vocabulary size ``V``.
        temperature: ``T0``, the temperature ``p`` was formed at.
        tail: float ``[...]`` (top-k only): ``log`` of the teacher mass outside ``indices``;
            ``-inf`` when ``k = V``.
        weights: float ``[..., s]`` (sampled only): importance weights, ``>= 0``.
        proposal_temperature: (sampled only) temperature of the proposal the tokens were drawn
            from; equal to ``temperature`` when the proposal is the teacher itself, and then
            ``weights`` are exactly counts over ``n``.
        n: (sampled only) the number of draws.

    Leading shapes are free (``[B, K, T]`` for K codebooks); the loss checks them against the
    student's logits.
    """

    kind: str
    indices: torch.Tensor
    log_probs: torch.Tensor
    vocab: int
    temperature: float
    tail: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    proposal_temperature: float | None = None
    n: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise bad_value(SparseTargetError, "kind", self.kind, f"one of {KINDS}")
        idx, lp = self.indices, self.log_probs
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() \
                or idx.dtype == torch.bool or idx.ndim < 1:
            raise bad_value(SparseTargetError, "indices", _shown(idx), "an integer tensor [..., s]")
        if not isinstance(lp, torch.Tensor) or not lp.is_floating_point() or lp.shape != idx.shape:
            raise bad_value(SparseTargetError, "log_probs", _shown(lp),
                            f"a floating-point tensor of the indices' shape {tuple(idx.shape)}")
        size = idx.shape[-1]
        low = size if self.kind == "topk" else 1  # n draws may exceed V; k kept tokens may not
        _int_arg(self.vocab, "vocab", f"an int >= {max(low, 1)}", "pass the teacher's vocabulary size", max(low, 1))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if self.kind == "topk":
            if self.tail is None or not isinstance(self.tail, torch.Tensor) or not self.tail.is_floating_point() \
                    or self.tail.shape != idx.shape[:-1]:
                raise bad_value(SparseTargetError, "tail", _shown(self.tail),
                                f"a floating-point tensor of shape {tuple(idx.shape[:-1])} (log of the mass "
                                "outside the k indices)")
            if self.weights is not None or self.proposal_temperature is not None or self.n is not None:
                raise bad_value(SparseTargetError, "weights", _shown(self.weights),
                                "None for a 'topk' target (weights, proposal_temperature and n are for 'sampled')")
            if size < 1:
                raise bad_value(SparseTargetError, "indices", _shown(idx), "k >= 1 entries on the last axis")
        else:
            w = self.weights
            if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.shape != idx.shape:
                raise bad_value(SparseTargetError, "weights", _shown(w),
                                f"a floating-point tensor of the indices' shape {tuple(idx.shape)}")
            if self.tail is not None:
                raise bad_value(SparseTargetError, "tail", _shown(self.tail), "None for a 'sampled' target")
            object.__setattr__(self, "proposal_temperature",
                               check_temperature(self.temperature if self.proposal_temperature is None
                                                 else self.proposal_temperature, "proposal_temperature"))
            object.__setattr__(self, "n", _int_arg(size if self.n is None else self.n, "n",
                                                   "an int >= 1 (the number of draws)", "", 1))

    # -- shape ------------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """The leading shape ``[...]`` (the positions)."""
        return self.indices.shape[:-1]

    @property
    def size(self) -> int:
        """Entries per position: ``k`` (top-k) or the ``n`` slots of a sampled target."""
        return int(self.indices.shape[-1])

    @property
    def self_proposal(self) -> bool:
        """True for a sampled target drawn from the teacher itself (weights = counts / n)."""
        return self.kind == "sampled" and self.proposal_temperature == self.temperature

    def tensors(self) -> dict[str, torch.Tensor]:
        """The target's tensors by field name (``tail`` or ``weights``, whichever the kind has)."""
        out = {"indices": self.indices, "log_probs": self.log_probs}
        out.update({"tail": self.tail} if self.kind == "topk" else {"weights": self.weights})
        return out

    def replace(self, **tensors: torch.Tensor) -> SparseTarget:
        """A copy with some fields replaced (``dataclasses.replace``, validated again)."""
        return dataclasses.replace(self, **tensors)

    def to(self, device: torch.device | str) -> SparseTarget:
        """The same target with every tensor on ``device``."""
        return self.replace(**{k: v.to(device) for k, v in self.tensors().items()})

    @staticmethod
    def stack(targets: Sequence[SparseTarget]) -> SparseTarget:
        """Stack targets of equal kind, size, shape and temperatures along a new axis 0 (a batch).

        Usable as a ``DataLoader`` ``collate_fn``.
        """
        targets = list(targets)
        if not targets or not all(isinstance(t, SparseTarget) for t in targets):
            raise bad_value(SparseTargetError, "targets", f"{len(targets)} objects",
                            "a non-empty sequence of SparseTarget")
        first = targets[0]
        for i, t in enumerate(targets):
            same = (t.kind, t.vocab, t.temperature, t.proposal_temperature, t.n, tuple(t.indices.shape)) == \
                   (first.kind, first.vocab, first.temperature, first.proposal_temperature, first.n,
                    tuple(first.indices.shape))
            if not same:
                raise bad_value(SparseTargetError, f"targets[{i}]", t,
                                f"the kind, vocab, temperatures and shape of targets[0] ({first!r})",
                                "batch items of one shape (pad them first)")
        fields = {k: torch.stack([t.tensors()[k] for t in targets]) for k in first.tensors()}
        return first.replace(**fields)

    def __repr__(self) -> str:
        extra = (f", proposal_temperature={self.proposal_temperature:g}, n={self.n}"
                 if self.kind == "sampled" else "")
        return (f"SparseTarget(kind={self.kind!r}, shape={tuple(self.shape)}, size={self.size}, vocab={self.vocab}, "
                f"temperature={self.temperature:g}{extra})")

    # -- re-tempering -----------------------------------------------------------------------------

    def retempered(self, temperature: float) -> SparseTarget:
        """This top-k target at another temperature: exact on the kept tokens, approximate on the tail.

        With ``r = T0 / T``, each kept token gets the unnormalised log-weight ``r * log p_T0(v)``
        (exact: the kept tokens' ratios at ``T`` follow from theirs at ``T0``); the tail, whose
        shape was not kept, is taken as uniform over its ``V - k`` tokens with its mass at ``T0``,
        giving ``log(V - k) + r * (tail - log(V - k))``; then the k+1 buckets are renormalised.
        Exact when the teacher's tail really is flat (or empty); otherwise the tail mass is
        overestimated for ``T > T0`` and underestimated for ``T < T0`` (power-mean inequality).

        Raises:
            SparseTargetError: for a sampled target (re-weighting a sample to another temperature
                needs the partition function at that temperature, which was not kept).
            TemperatureError: ``temperature`` not a finite number > 0.
        """
        t = check_temperature(temperature)
        if self.kind != "topk":
            raise bad_value(SparseTargetError, "target.kind", self.kind,
                            "'topk' (a sampled target cannot be re-tempered: p_T(x) / p_T0(x) needs the partition "
                            "function at T, which the cache does not hold)",
                            f"sample the teacher again at temperature={t:g}")
        r = self.temperature / t
        cdt = _compute_dtype(self.log_probs)
        kept = self.log_probs.to(cdt) * r
        m = self.vocab - self.size
        if m == 0:
            tail = torch.full(self.tail.shape, -math.inf, dtype=cdt, device=self.tail.device)
        else:
            tail = math.log(m) + r * (self.tail.to(cdt) - math.log(m))
        buckets = torch.log_softmax(torch.cat([kept, tail.unsqueeze(-1)], dim=-1), dim=-1)
        return dataclasses.replace(self, log_probs=buckets[..., :-1], tail=buckets[..., -1], temperature=t)


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def _teacher_log_probs(logits: torch.Tensor, temperature: float, arg: str = "logits") -> torch.Tensor:
    """``log_softmax(logits / T)`` in float32 at least, refusing NaN, ``+inf`` and rows with no finite logit."""
    check_logits(logits)
    x = logits.detach().to(_compute_dtype(logits))
    top = x.amax(dim=-1, keepdim=True)
    if bool(torch.isnan(x).any()) or bool(torch.isposinf(x).any()) or not bool(torch.isfinite(top).all()):
        raise bad_value(SparseTargetError, arg, _describe(logits),
                        "finite logits, or -inf for banned tokens, with at least one finite logit per position",
                        "replace NaN or +inf teacher logits (e.g. at padded positions) before building targets")
    return torch.log_softmax((x - top) / temperature, dim=-1)


def topk_target(logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> SparseTarget:
    """The top-k + tail form of ``softmax(logits / temperature)``.

    Args:
        logits: teacher logits ``[..., V]``.
        k: tokens kept per position, ``1 <= k <= V`` (``k = V`` keeps everything; the tail is empty).
        temperature: ``T0`` > 0; store the temperature the student will be trained at (see the
            module docstring).

    Returns:
        A ``"topk"`` :class:`SparseTarget` with ``indices`` int64 ``[..., k]`` (most likely first),
        ``log_probs [..., k]`` and ``tail [...]`` in float32 (float64 for float64 logits).

    Raises:
        SparseTargetError: ``k`` outside ``[1, V]`` or not an int; NaN / ``+inf`` logits.
        LogitsShapeError, TemperatureError: bad logits or temperature.
    """
    check_logits(logits)
    vocab = logits.shape[-1]
    k = _int_arg(k, "k", f"an int in [1, {vocab}] (the vocabulary size of the logits)",
                 "k = vocab keeps the whole distribution", 1, vocab)
    t = check_temperature(temperature)
    with torch.no_grad():
        lp = _teacher_log_probs(logits, t)
        values, indices = lp.topk(k, dim=-1)
        if k == vocab:
            tail = torch.full(lp.shape[:-1], -math.inf, dtype=lp.dtype, device=lp.device)
        else:
            tail = torch.logsumexp(lp.scatter(-1, indices, -math.inf), dim=-1)
    return SparseTarget("topk", indices, values, vocab, t, tail=tail)


def sampled_target(
    logits: torch.Tensor,
    n: int,
    *,
    temperature: float = 1.0,
    proposal_temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> SparseTarget:
    """The importance-sampled form of ``p = softmax(logits / temperature)`` (Sparse Logit Sampling).

    Per position, draws ``n`` tokens with replacement from ``r = softmax(logits / proposal_temperature)``
    (``r = p`` by default) and keeps the distinct ones, sorted, with ``w(x) = c(x) / n * p(x) / r(x)``
    (``c(x)``: how often ``x`` was drawn; with ``r = p`` exactly ``c(x) / n``). A larger
    ``proposal_temperature`` spreads the draws over more of the tail, at the price of weights that
    no longer sum to exactly 1.

    Args:
        logits: teacher logits ``[..., V]``.
        n: draws per position, ``>= 1``.
        temperature: ``T0`` of the target distribution ``p``.
        proposal_temperature: temperature of the proposal; None means ``temperature``.
        generator: a ``torch.Generator`` for reproducible draws.

    Returns:
        A ``"sampled"`` :class:`SparseTarget` with ``indices`` int64 ``[..., n]``, ``log_probs``
        and ``weights`` ``[..., n]`` (slots past the distinct tokens: index 0, weight 0).

    Raises:
        SparseTargetError: ``n`` < 1 or not an int; NaN / ``+inf`` logits.
        LogitsShapeError, TemperatureError: bad logits or temperatures.
    """
    check_logits(logits)
    n = _int_arg(n, "n", "an int >= 1 (draws per position)", "Sparse Logit Sampling uses about 12", 1)
    t = check_temperature(temperature)
    tq = t if proposal_temperature is None else check_temperature(proposal_temperature, "proposal_temperature")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise bad_value(SparseTargetError, "generator", generator, "None or a torch.Generator")
    with torch.no_grad():
        lp = _teacher_log_probs(logits, t)
        lr = lp if tq == t else _teacher_log_probs(logits, tq)
        lead, vocab = lp.shape[:-1], lp.shape[-1]
        flat_r = lr.reshape(-1, vocab)
        rows = flat_r.shape[0]
        if rows == 0:
            draws = torch.zeros(0, n, dtype=torch.long, device=lp.device)
        else:
            draws = torch.multinomial(flat_r.exp(), n, replacement=True, generator=generator)
        draws, _ = draws.sort(dim=-1)
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        group = first.long().cumsum(-1) - 1  # slot of each draw's distinct token
        counts = torch.zeros(draws.shape, dtype=lp.dtype, device=lp.device).scatter_add_(
            1, group, torch.ones_like(draws, dtype=lp.dtype))
        indices = torch.zeros_like(draws).scatter_(1, group, draws)  # equal values collide: harmless
        used = counts > 0
        indices = torch.where(used, indices, 0)
        flat_p = lp.reshape(-1, vocab)
        log_probs = flat_p.gather(1, indices)
        weights = counts / n
        if tq != t:
            weights = torch.where(used, weights * (log_probs - flat_r.gather(1, indices)).exp(), 0.0)
        shape = (*lead, n)
    return SparseTarget("sampled", indices.reshape(shape), log_probs.reshape(shape), vocab, t,
                        weights=weights.reshape(shape), proposal_temperature=tq, n=n)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def supported_terms(target: SparseTarget) -> tuple[str, ...]:
    """The divergence names (``StageMixedKL`` component names) a target of this kind supports."""
    return _SUPPORTED[target.kind]


def check_terms(terms: Sequence[str], target: SparseTarget) -> None:
    """Raise :class:`SparseTargetError` naming the first term the target cannot give."""
    for term in terms:
        if term not in _SUPPORTED[target.kind]:
            why = _WHY_NOT.get((target.kind, term), "")
            raise bad_value(SparseTargetError, "divergence", term,
                            f"one of {_SUPPORTED[target.kind]} for a {target.kind!r} target"
                            + (f" ({why})" if why else ""),
                            "use a top-k target for bucketed reverse KL, or drop the term"
                            if target.kind == "sampled" else "drop the term, or distil from dense teacher logits")


def check_target(target: object, student: torch.Tensor, mask: torch.Tensor | None = None) -> SparseTarget:
    """Raise unless ``target`` is a :class:`SparseTarget` that fits ``student`` logits ``[..., V]``.

    Checks the leading shape, the vocabulary, the device, and (at positions that count) that the
    indices lie in ``[0, V)`` and, for top-k, are distinct.
    """
    check_logits(student)
    if not isinstance(target, SparseTarget):
        raise bad_value(SparseTargetError, "target", _shown(target),
                        "a kdq.losses.SparseTarget", "build one with topk_target() or sampled_target(), or read it "
                        "from a CachedTeacherDataset; dense teacher logits go to kdq.losses.forward_kl")
    if target.shape != student.shape[:-1]:
        raise bad_value(LogitsShapeError, "target", target,
                        f"the leading shape of student_logits {tuple(student.shape[:-1])} (one target per position)",
                        "the target must cover the same positions as the student's logits")
    if student.shape[-1] != target.vocab:
        raise bad_value(LogitsShapeError, "student_logits", _describe(student),
                        f"a vocabulary of {target.vocab} (the target's vocab) on the last axis",
                        "teacher and student must share the vocabulary")
    if target.indices.device != student.device:
        raise bad_value(LogitsShapeError, "target", f"tensors on {target.indices.device}",
                        f"tensors on the student's device {student.device}", "move it with target.to(device)")
    idx = target.indices
    live = None if mask is None else mask.unsqueeze(-1).expand_as(idx)
    bad = (idx < 0) | (idx >= target.vocab)
    if target.kind == "sampled":
        bad = bad & (target.weights > 0)
        bad_w = ~(torch.isfinite(target.weights) & (target.weights >= 0))
        if live is not None:
            bad_w = bad_w & live
        if bool(bad_w.any()):
            first = float(target.weights[bad_w][0])
            raise bad_value(SparseTargetError, "target.weights", f"a tensor containing {first}",
                            "finite weights >= 0")
    if live is not None:
        bad = bad & live
    if bool(bad.any()):
        raise bad_value(SparseTargetError, "target.indices", f"a tensor containing {int(idx[bad][0])}",
                        f"token indices in [0, {target.vocab})")
    if target.kind == "topk" and target.size > 1:
        srt, _ = idx.sort(dim=-1)
        dup = (srt[..., 1:] == srt[..., :-1]).any(-1)
        if mask is not None:
            dup = dup & mask
        if bool(dup.any()):
            raise bad_value(SparseTargetError, "target.indices", "a top-k row with a repeated index",
                            "k distinct indices per position (a repeated token would be counted twice)")
    return target


def resolve_temperature(temperature: float | None, target: SparseTarget, arg: str = "temperature",
                        hint: str = "") -> float:
    """``target.temperature`` when ``temperature`` is None; refuses any other value (``hint`` is
    prepended to the fix)."""
    if temperature is None:
        return target.temperature
    t = check_temperature(temperature, arg)
    if not math.isclose(t, target.temperature, rel_tol=1e-9, abs_tol=0.0):
        fix = hint + ("build the target at this temperature (topk_target/sampled_target(..., temperature=T)); "
                      f"for a top-k target, target.retempered({t:g}) re-tempers it with an approximated tail")
        raise bad_value(TemperatureError, arg, temperature,
                        f"the target's temperature {target.temperature:g} (a cached distribution cannot be "
                        "re-tempered exactly), or None", fix)
    return target.temperature


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------


def _log_tail(ls: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``log(sum of exp(ls) outside idx)`` per row, ``-inf`` (with zero gradient) where nothing is left."""
    rest = ls.scatter(-1, idx, -math.inf)
    any_left = (rest > -math.inf).any(-1)
    safe = torch.where(any_left.unsqueeze(-1), rest, 0.0)
    return torch.where(any_left, torch.logsumexp(safe, dim=-1), -math.inf)


def sparse_terms(
    student: torch.Tensor,
    target: SparseTarget,
    terms: Sequence[str],
    *,
    temperature: float,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position values ``[..., len(terms)]`` of the named terms; 0 at masked positions.

    Inputs are assumed validated (:func:`check_target`, :func:`check_terms`, temperature equal to
    the target's). ``labels`` (for ``cross_entropy``, at temperature 1) must be valid class
    indices everywhere. Plain autograd; differentiable with respect to ``student``.
    """
    cdt = _compute_dtype(student)
    keep = mask
    s = student if keep is None else torch.where(keep.unsqueeze(-1), student, 0.0)
    x = s.to(cdt)
    x = x - x.detach().amax(dim=-1, keepdim=True)  # shift first: a tiny T sends the rest to -inf, not NaN
    ls = torch.log_softmax(x / temperature, dim=-1)
    size = target.size
    idx = target.indices.long()
    lp = target.log_probs.to(cdt)
    if keep is not None:  # stored garbage at masked positions never reaches the arithmetic
        k3 = keep.unsqueeze(-1)
        idx = torch.where(k3, idx, torch.arange(size, device=idx.device) % target.vocab)
        lp = torch.where(k3, lp, 0.0)
    lq = ls.gather(-1, idx)
    out = []
    if target.kind == "topk":
        tail = target.tail.to(cdt)
        if keep is not None:
            tail = torch.where(keep, tail, 0.0)
        big_p = torch.log_softmax(torch.cat([lp, tail.unsqueeze(-1)], dim=-1), dim=-1)  # renormalised buckets
        big_q = torch.cat([lq, _log_tail(ls, idx).unsqueeze(-1)], dim=-1)
        for term in terms:
            if term == "forward_kl":
                out.append(_kl(big_p, big_q))
            elif term == "reverse_kl":
                out.append(_kl(big_q, big_p))
            elif term == "skewed_forward_kl":
                out.append(_kl(big_p, _log_mix(big_p, big_q, alpha)))
            elif term == "skewed_reverse_kl":
                out.append(_kl(big_q, _log_mix(big_q, big_p, alpha)))
            else:
                out.append(_cross_entropy(s, labels, cdt))
    else:
        w = target.weights.to(cdt)
        if keep is not None:
            w = torch.where(keep.unsqueeze(-1), w, 0.0)
        on = w > 0
        for term in terms:
            if term == "forward_kl":
                out.append((w * torch.where(on, lp - lq, 0.0)).sum(-1))
            elif term == "skewed_forward_kl":
                out.append((w * torch.where(on, lp - _log_mix(lp, lq, alpha), 0.0)).sum(-1))
            else:
                out.append(_cross_entropy(s, labels, cdt))
    values = torch.stack(out, dim=-1)
    if keep is not None:
        values = torch.where(keep.unsqueeze(-1), values, 0.0)
    return values


def _cross_entropy(s: torch.Tensor, labels: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    if labels is None:
        raise bad_value(SparseTargetError, "labels", None, "an integer tensor for 'cross_entropy'")
    ls1 = torch.log_softmax(s.to(cdt), dim=-1)
    return -ls1.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _loss(student, target, term, *, temperature, alpha, mask, reduction):
    check_logits(student)
    mask = check_mask(mask, student)
    target = check_target(target, student, mask)
    check_terms((term,), target)
    t = resolve_temperature(temperature, target)
    a = check_alpha(alpha)
    check_reduction(reduction)
    values = sparse_terms(student, target, (term,), temperature=t, alpha=a, mask=mask)[..., 0]
    return reduce(values, mask, reduction)


# ---------------------------------------------------------------------------------------------
# public divergences
# ---------------------------------------------------------------------------------------------


def sparse_forward_kl(
    student_logits: torch.Tensor,
    target: SparseTarget,
    *,
    temperature: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL of the student to a sparse teacher target.

    Top-k + tail: ``KL(P || Q) = sum_b P_b (log P_b - log Q_b)`` over the k+1 buckets, a lower
    bound of the dense ``KL(p || q)`` (equal when ``k = V`` or the tails are proportional).
    Sampled: ``sum_i w_i (log p(x_i) - log q(x_i))``, unbiased for ``KL(p || q)`` (value and
    gradient). See the module docstring for both derivations.

    Args:
        student_logits: ``[..., V]`` student logits (any float dtype).
        target: a :class:`SparseTarget` with leading shape ``[...]`` and ``vocab = V``.
        temperature: None (the target's temperature, the default) or that same value; the student's
            logits are divided by it. No ``T**2`` factor.
        mask: bool ``[...]``, True where a position counts.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over counted positions).

    Returns:
        float32 (or float64) tensor: ``[...]`` for ``"none"``, else a scalar.

    Raises:
        SparseTargetError: a malformed target. LogitsShapeError: shapes or vocabularies differ.
        TemperatureError: a temperature other than the target's. MaskError, ReductionError.
    """
    return _loss(student_logits, target, "forward_kl", temperature=temperature, alpha=0.0, mask=mask,
                 reduction=reduction)


def sparse_reverse_kl(
    student_logits: torch.Tensor,
    target: SparseTarget,
    *,
    temperature: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bucketed reverse KL ``KL(Q || P)`` to a top-k + tail target (a lower bound of ``KL(q || p)``).

    Arguments and return value as :func:`sparse_forward_kl`.

    Raises:
        SparseTargetError: for a sampled target (reverse KL is an expectation under the student;
            the cache holds the teacher's samples; see the module docstring); and the errors of
            :func:`sparse_forward_kl`.
    """
    return _loss(student_logits, target, "reverse_kl", temperature=temperature, alpha=0.0, mask=mask,
                 reduction=reduction)


def sparse_skewed_forward_kl(
    student_logits: torch.Tensor,
    target: SparseTarget,
    *,
    alpha: float = 0.1,
    temperature: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skewed forward KL ``KL(p || a p + (1 - a) q)`` (DistiLLM) against a sparse target.

    Top-k + tail: on the buckets (a lower bound of the dense value). Sampled:
    ``sum_i w_i (log p(x_i) - log(a p(x_i) + (1 - a) q(x_i)))``, unbiased. ``alpha`` in [0, 1);
    other arguments as :func:`sparse_forward_kl`.
    """
    return _loss(student_logits, target, "skewed_forward_kl", temperature=temperature, alpha=alpha, mask=mask,
                 reduction=reduction)


def sparse_skewed_reverse_kl(
    student_logits: torch.Tensor,
    target: SparseTarget,
    *,
    alpha: float = 0.1,
    temperature: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bucketed skewed reverse KL ``KL(Q || a Q + (1 - a) P)`` to a top-k + tail target.

    Refused for sampled targets, as :func:`sparse_reverse_kl`. Arguments as
    :func:`sparse_skewed_forward_kl`.
    """
    return _loss(student_logits, target, "skewed_reverse_kl", temperature=temperature, alpha=alpha, mask=mask,
                 reduction=reduction)
