"""Plain reference implementations of kdq's divergences.

These are written the way most distillation code writes them: one ``log_softmax`` per term and
plain autograd. They are the ground truth that the fused fast path (:mod:`kdq.losses.fused`) is
tested against, value and gradient, and the "naive composition" that ``benchmarks/bench_losses.py``
times. Every function takes logits ``[..., V]`` and returns per-position values ``[...]`` in
float32 (float64 stays float64), with no reduction and no mask: see
:func:`kdq.losses.divergences.reduce` for that.

With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``:

- ``forward_kl = KL(p || q) = sum_v p (log p - log q)``
- ``reverse_kl = KL(q || p)``
- ``skewed_forward_kl = KL(p || a p + (1 - a) q)``
- ``skewed_reverse_kl = KL(q || a q + (1 - a) p)``
- ``adaptive_kl = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)``
- ``generalized_jsd = b KL(p || m) + (1 - b) KL(q || m)``, ``m = b p + (1 - b) q``
- ``cross_entropy = -log softmax(student)[label]`` (temperature 1)

``-inf`` logits have probability 0 and ``0 log 0 = 0``: an entry where the first distribution of a
KL is 0 contributes 0, whatever the second is (both logs are replaced by 0 there before the
product, so that autograd never meets ``0 * inf`` either). A KL whose second distribution is 0
where the first is not is ``+inf``; its gradient is whatever autograd gives (finite with respect
to the logits of the second distribution, not finite with respect to the first).
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a (log a - log b) over the last axis, from log-probabilities, with 0 log 0 = 0."""
    a = log_a.exp()
    on = a > 0
    return (a * (torch.where(on, log_a, 0.0) - torch.where(on, log_b, 0.0))).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha a + (1 - alpha) b), computed in log space (-inf where a = b = 0)."""
    if alpha == 0.0:
        return log_b
    none = torch.isneginf(log_a) & torch.isneginf(log_b)  # logaddexp's gradient is NaN there
    mix = torch.logaddexp(torch.where(none, 0.0, log_a) + math.log(alpha),
                          torch.where(none, 0.0, log_b) + math.log1p(-alpha))
    return torch.where(none, -math.inf, mix)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p || q)."""
    return _kl(_log_softmax(teacher, temperature), _log_softmax(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(q || p)."""
    return _kl(_log_softmax(student, temperature), _log_softmax(teacher, temperature))


def skewed_forward_kl(
    student: torch.Tensor, teacher: torch.Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position KL(p || alpha p + (1 - alpha) q)."""
    lp = _log_softmax(teacher, temperature)
    lq = _log_softmax(student, temperature)
    return _kl(lp, _log_mix(lp, lq, alpha))


def skewed_reverse_kl(
    student: torch.Tensor, teacher: torch.Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position KL(q || alpha q + (1 - alpha) p)."""
    lp = _log_softmax(teacher, temperature)
    lq = _log_softmax(student, temperature)
    return _kl(lq, _log_mix(lq, lp, alpha))


def adaptive_ratios(
    student: torch.Tensor, teacher: torch.Tensor, head_mass: float = 0.5, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and tail weights of adaptive KL (no gradient), each ``[...]``, summing to 1.

    Written from the definition (Wu et al., COLING 2025), one position at a time in float64 Python
    arithmetic, independently of the fused kernel: list the vocabulary by decreasing teacher
    probability (ties by index); the head is the shortest prefix of that list whose teacher mass
    reaches ``head_mass`` (so the top token is always head), the tail is the rest;
    ``g_head = sum_head |p - q|``, ``g_tail = sum_tail |p - q|``; the weights are
    ``g_head / (g_head + g_tail)`` and ``g_tail / (g_head + g_tail)``, 1/2 each when both are 0.
    """
    with torch.no_grad():
        p_rows = _log_softmax(teacher, temperature).exp().double().reshape(-1, teacher.shape[-1]).tolist()
        q_rows = _log_softmax(student, temperature).exp().double().reshape(-1, student.shape[-1]).tolist()
    heads = []
    for p, q in zip(p_rows, q_rows):
        order = sorted(range(len(p)), key=lambda v: -p[v])
        g_head = g_tail = 0.0
        mass = 0.0  # teacher mass of the prefix so far
        for v in order:
            if mass < head_mass:  # the prefix has not reached head_mass yet: v is head
                g_head += abs(p[v] - q[v])
            else:
                g_tail += abs(p[v] - q[v])
            mass += p[v]
        heads.append(0.5 if g_head + g_tail == 0 else g_head / (g_head + g_tail))
    w_head = torch.tensor(heads, dtype=_compute_dtype(student), device=student.device).reshape(student.shape[:-1])
    return w_head, 1.0 - w_head


def adaptive_kl(
    student: torch.Tensor, teacher: torch.Tensor, head_mass: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position adaptive KL: head-gap-weighted forward KL plus tail-gap-weighted reverse KL
    (a weight of exactly 0 on an infinite KL contributes 0)."""
    w_head, w_tail = adaptive_ratios(student, teacher, head_mass, temperature)
    fkl = forward_kl(student, teacher, temperature)
    rkl = reverse_kl(student, teacher, temperature)
    return torch.where(w_head > 0, w_head * fkl, 0.0) + torch.where(w_tail > 0, w_tail * rkl, 0.0)


def generalized_jsd(
    student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
    lp = _log_softmax(teacher, temperature)
    lq = _log_softmax(student, temperature)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)


def cross_entropy(student: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-position cross-entropy of the student (temperature 1); 0 where ``labels == ignore_index``."""
    ls = _log_softmax(student, 1.0)
    keep = labels != ignore_index
    nll = -ls.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, nll, 0.0)


_REFERENCE_TERMS = {
    "forward_kl": lambda s, t, T, a, hm: forward_kl(s, t, T),
    "reverse_kl": lambda s, t, T, a, hm: reverse_kl(s, t, T),
    "skewed_forward_kl": lambda s, t, T, a, hm: skewed_forward_kl(s, t, a, T),
    "skewed_reverse_kl": lambda s, t, T, a, hm: skewed_reverse_kl(s, t, a, T),
    "adaptive_kl": lambda s, t, T, a, hm: adaptive_kl(s, t, hm, T),
}


def naive_composition(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: dict[str, float],
    temperature: float,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    head_mass: float = 0.5,
) -> torch.Tensor:
    """``sum_n weights[n] * masked_mean(term_n)``, each term computed on its own (a term of
    weight 0 is skipped: it contributes 0 even where it is infinite).

    This is how most distillation code composes divergences (one log-softmax per term, plain
    autograd); it is what :class:`kdq.losses.StageMixedKL` is tested against and what the
    benchmark times as "naive". ``weights`` uses the KL component names (e.g. from
    ``StageMixedKL.weights_at(step)``).
    """
    total = None
    count = None if mask is None else mask.sum().clamp_min(1)
    for name, w in weights.items():
        if w == 0:
            continue
        v = _REFERENCE_TERMS[name](student, teacher, temperature, alpha, head_mass)
        v = v.mean() if mask is None else torch.where(mask, v, 0.0).sum() / count
        total = w * v if total is None else total + w * v
    if total is None:
        raise ValueError("weights has no non-zero weight")
    return total
