"""Fused, chunked fast path for kdq's divergences.

Distillation logits are large (``[8, 4, 500, 2048]`` fp32 is 131 MB) and a naive composition of
four divergences keeps a dozen tensors of that size alive for backward. Here every term is computed
from ONE log-softmax of the student and ONE of the teacher, chunk by chunk over positions, with
hand-written gradients, so the memory beyond the inputs and their gradients is a few chunks.

Two autograd functions share one chunk kernel (:func:`_chunk`):

- :func:`kd_terms` returns per-position values ``[N, n_terms]``; its backward recomputes each
  chunk from the logits (nothing of size ``N x V`` is saved). Used by the public divergences.
- :func:`kd_loss` returns ``sum(coef * values)`` for per-position coefficients known up front (the
  case of :class:`~kdq.losses.StageMixedKL`); it computes the gradient during the forward pass, in
  the same sweep over the chunk, and stores only that gradient (which autograd would allocate
  anyway). One pass over the logits instead of three.

Gradients, with ``x = logits / T``, ``ls, lt`` the log-softmaxes, ``q, p`` their softmaxes,
``d = ls - lt``, ``m = a p + (1 - a) q``, ``n = a q + (1 - a) p``, ``r = p / m``, ``r' = q / n``
(per position; ``<f>`` is the sum of ``f`` over the vocabulary):

========================  ================================  =========================================
term                      d/dx_student                      d/dx_teacher
========================  ================================  =========================================
KL(p||q)                  q - p                             p (-d - KL(p||q))
KL(q||p)                  q (d - KL(q||p))                  p - q
KL(p||m)                  (1-a) q (<q r> - r)               p (lt - log m - KL(p||m) - a (r - <p r>))
KL(q||n)                  q (ls - log n - KL(q||n)          (1-a) p (<p r'> - r')
                          - a (r' - <q r'>))
cross-entropy (T = 1)     softmax(s) - onehot(label)        0
========================  ================================  =========================================

The KL rows are then divided by ``T`` (chain rule through ``x = logits / T``). Adaptive KL uses
head/tail ratios computed without gradient, so it adds to the KL(p||q) and KL(q||p) coefficients.
Computation is float32 at least (float64 stays float64) whatever the input dtype.

``-inf`` logits (banned or padded vocabulary entries) have probability 0 and ``0 log 0 = 0``: every
product of a probability with a log-ratio is taken as 0 where the probability is 0, by a
``torch.where`` inside the existing passes (no extra pass over the logits). A KL whose second
distribution is 0 where the first is not is ``+inf``. For such a row (with a non-zero coefficient)
the gradient with respect to the logits whose ``-inf`` causes it stays the finite limit (``q - p``
for the student of KL(p||q), as ``F.kl_div`` gives), and the gradient with respect to the other
logits, which has no finite limit, is NaN on that row. In the gradient, log-ratios that are
infinite are replaced by 0 so that an infinite term with coefficient 0 contributes exactly 0.
Logits are shifted by their row maximum before the multiplication by ``1 / T``, so a tiny ``T``
sends the non-maximal entries to ``-inf`` (their limit) instead of overflowing to NaN.
"""

from __future__ import annotations

import os
import warnings

import torch

TERMS = ("forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "adaptive_kl", "cross_entropy")

#: Elements (rows x vocabulary) per chunk by default: about 1 MB of fp32 per temporary.
DEFAULT_CHUNK_ELEMENTS = 1 << 18


def chunk_rows(vocab: int, chunk_elements: int | None = None) -> int:
    """Rows per chunk for a vocabulary of ``vocab`` entries."""
    return max(1, (chunk_elements or DEFAULT_CHUNK_ELEMENTS) // max(vocab, 1))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor | None,
    inv_t: torch.Tensor,
    alpha: torch.Tensor,
    head_mass: float,
    terms: tuple[str, ...],
    skew: bool,
    want_grad_t: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Values ``[R, len(terms)]`` and, when ``coef`` ``[R, len(terms)]`` is given, the gradients of
    ``sum(coef * values)`` with respect to ``s`` and (if ``want_grad_t``) ``t``.

    ``inv_t`` (1 / temperature) and ``alpha`` are 0-d tensors of the compute dtype, so that a
    compiled kernel does not recompile as the temperature anneals; ``skew`` is ``alpha != 0``.
    Gradients are assembled in place from per-row coefficients to keep the number of passes over
    the chunk small.
    """
    dt = _compute_dtype(s)
    tiny = torch.finfo(dt).tiny
    need_kl = any(n != "cross_entropy" for n in terms)
    vals: dict[str, torch.Tensor] = {}
    # which of the plain KLs are needed (alpha = 0 turns the skewed terms into the plain ones)
    need_f = "forward_kl" in terms or "adaptive_kl" in terms or (not skew and "skewed_forward_kl" in terms)
    need_r = "reverse_kl" in terms or "adaptive_kl" in terms or (not skew and "skewed_reverse_kl" in terms)
    sf = skew and "skewed_forward_kl" in terms
    sr = skew and "skewed_reverse_kl" in terms
    if need_kl:
        ls, q = _log_softmax_and_softmax(s.to(dt), inv_t)
        lt, p = _log_softmax_and_softmax(t.to(dt), inv_t)
        # 0 log 0 = 0: where a probability is 0 (a -inf logit) its log-ratios count as 0
        if need_f or sf:
            on_p = p > 0
        if need_r or sr:
            on_q = q > 0
        if need_f or need_r:
            d = ls - lt  # +-inf where one side is -inf, NaN where both are
        if need_f:
            fkl = -_dot(p, torch.where(on_p, d, 0.0))  # +inf where q = 0 < p
            vals["forward_kl"] = fkl
        if need_r:
            rkl = _dot(q, torch.where(on_q, d, 0.0))  # +inf where p = 0 < q
            vals["reverse_kl"] = rkl
        if "adaptive_kl" in terms:
            p_sorted, order = p.sort(dim=-1, descending=True)
            gap = (p_sorted - q.gather(-1, order)).abs()
            head = (p_sorted.cumsum(-1) - p_sorted) < head_mass
            g_head = (gap * head).sum(-1)
            total = gap.sum(-1)
            safe = total > 0
            w_head = torch.where(safe, g_head / torch.where(safe, total, 1.0), 0.5)
            w_tail = 1.0 - w_head
            # a weight of exactly 0 on an infinite KL contributes 0
            vals["adaptive_kl"] = (torch.where(w_head > 0, w_head * fkl, 0.0)
                                   + torch.where(w_tail > 0, w_tail * rkl, 0.0))
        if sf:
            m = torch.lerp(q, p, alpha).clamp_min_(tiny)  # alpha p + (1 - alpha) q
            ltm = torch.where(on_p, lt - m.log(), 0.0)  # finite: m >= alpha p
            sfkl = _dot(p, ltm)
            vals["skewed_forward_kl"] = sfkl
        elif "skewed_forward_kl" in terms:
            vals["skewed_forward_kl"] = fkl
        if sr:
            n_ = torch.lerp(p, q, alpha).clamp_min_(tiny)  # alpha q + (1 - alpha) p
            lsn = torch.where(on_q, ls - n_.log(), 0.0)
            srkl = _dot(q, lsn)
            vals["skewed_reverse_kl"] = srkl
        elif "skewed_reverse_kl" in terms:
            vals["skewed_reverse_kl"] = rkl
    if "cross_entropy" in terms:
        if labels is None:  # internal invariant: callers pass labels with this term
            raise RuntimeError("cross_entropy needs labels")
        l1, q1 = _log_softmax_and_softmax(s.to(dt), None)
        vals["cross_entropy"] = -l1.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    values = torch.stack([vals[n] for n in terms], dim=-1)
    if coef is None:
        return values, None, None

    c = {n: coef[:, i : i + 1].to(dt) for i, n in enumerate(terms)}
    gs = gt = None
    bad_s = bad_t = None  # rows whose gradient has no finite limit (see the module docstring)
    if need_kl:
        # d/dx_s = q * (sum_k a_k X_k + row) - c_f p ;  d/dx_t = p * (sum_k b_k Y_k + t_row) - c_r q
        # with per-row coefficients a_k, b_k, row, t_row (see the table in the module docstring);
        # the 1/T of the chain rule is folded into the per-row coefficients.
        c_f = c_r = None
        if need_f:
            c_f = _add(c.get("forward_kl"), None if skew else c.get("skewed_forward_kl"))
            if "adaptive_kl" in terms:
                c_f = _add(c_f, c["adaptive_kl"] * w_head.unsqueeze(-1))
        if need_r:
            c_r = _add(c.get("reverse_kl"), None if skew else c.get("skewed_reverse_kl"))
            if "adaptive_kl" in terms:
                c_r = _add(c_r, c["adaptive_kl"] * w_tail.unsqueeze(-1))
        s_terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        t_terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        row = t_row = None
        if need_f or need_r:
            # infinite log-ratios as 0, so that an infinite KL with coefficient 0 adds exactly 0;
            # a row where it has a non-zero coefficient is marked bad and filled with NaN below
            d_fin = torch.where(d.isfinite(), d, 0.0)
        if c_f is not None:
            row = c_f
            if want_grad_t:
                inf_f = fkl.isinf().unsqueeze(-1)
                bad_t = inf_f & (c_f != 0)
                t_row = -c_f * torch.where(inf_f, 0.0, fkl.unsqueeze(-1))
                t_terms.append((-c_f, d_fin))
        if c_r is not None:
            inf_r = rkl.isinf().unsqueeze(-1)
            bad_s = inf_r & (c_r != 0)
            row = _add(row, -c_r * torch.where(inf_r, 0.0, rkl.unsqueeze(-1)))
            s_terms.append((c_r, d_fin))
            if want_grad_t:
                t_row = _add(t_row, c_r)
        if sf:
            c_sf = c["skewed_forward_kl"]
            r = p / m
            row = _add(row, c_sf * (1.0 - alpha) * _dot(q, r).unsqueeze(-1))
            s_terms.append((-(c_sf * (1.0 - alpha)), r))
            if want_grad_t:
                t_row = _add(t_row, c_sf * (alpha * _dot(p, r).unsqueeze(-1) - sfkl.unsqueeze(-1)))
                t_terms.append((c_sf, ltm))
                t_terms.append((-c_sf * alpha, r))
        if sr:
            c_sr = c["skewed_reverse_kl"]
            r2 = q / n_
            row = _add(row, c_sr * (alpha * _dot(q, r2).unsqueeze(-1) - srkl.unsqueeze(-1)))
            s_terms.append((c_sr, lsn))
            s_terms.append((-c_sr * alpha, r2))
            if want_grad_t:
                t_row = _add(t_row, c_sr * (1.0 - alpha) * _dot(p, r2).unsqueeze(-1))
                t_terms.append((-(c_sr * (1.0 - alpha)), r2))
        gs = _assemble(q, p, s_terms, row, c_f, inv_t)
        if want_grad_t:
            gt = _assemble(p, q, t_terms, t_row, c_r, inv_t)
    if "cross_entropy" in terms:
        c_ce = c["cross_entropy"]
        g_ce = (q1 * c_ce).scatter_add_(-1, labels.unsqueeze(-1), -c_ce)
        gs = g_ce if gs is None else gs.add_(g_ce)
    live = coef.ne(0).any(-1, keepdim=True)  # rows whose gradient is not exactly zero
    gs = _finish(gs, live, bad_s).to(s.dtype)
    if want_grad_t:
        gt = torch.zeros_like(t) if gt is None else _finish(gt, live, bad_t).to(t.dtype)
    return values, gs, gt


def _finish(g: torch.Tensor, live: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``g`` with rows that are not ``live`` set to 0 and ``bad`` rows (``[R, 1]``) to NaN."""
    if bad is None:
        return g.masked_fill_(~live, 0.0)
    fill = torch.where(bad, float("nan"), 0.0).to(g.dtype)
    return torch.where(live & ~bad, g, fill)


def _log_softmax_and_softmax(x: torch.Tensor, inv_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(x * inv_t), softmax(x * inv_t))`` over the last axis with one ``exp`` per element.

    The row maximum is subtracted before the multiplication by ``inv_t`` (``1 / T``), so that a
    tiny temperature cannot overflow a logit to ``+inf``: entries far below the maximum go to
    ``-inf``, their limit. ``softmax`` is the stored ``exp(x - max)`` divided by its row sum rather
    than ``exp`` of the log-softmax: the exponentials dominate this kernel's arithmetic (on this
    project's CPUs the compiled kernel ran about 20% faster with one ``exp`` per element than with
    two).
    """
    shifted = x - x.amax(dim=-1, keepdim=True)
    if inv_t is not None:
        shifted = shifted * inv_t
    e = shifted.exp()
    z = e.sum(dim=-1, keepdim=True)
    return shifted - z.log(), e / z


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum(a * b, -1)``."""
    return (a * b).sum(-1)


def _assemble(
    base: torch.Tensor,
    other: torch.Tensor,
    terms: list[tuple[torch.Tensor, torch.Tensor]],
    row: torch.Tensor | None,
    c_other: torch.Tensor | None,
    inv_t: torch.Tensor,
) -> torch.Tensor:
    """``(base * (sum_k coef_k * X_k + row) - c_other * other) / T`` with in-place accumulation."""
    acc = None
    for k, x in terms:
        acc = x * (k * inv_t) if acc is None else acc.addcmul_(x, k * inv_t)
    if row is not None:
        acc = (row * inv_t).expand_as(base).clone() if acc is None else acc.add_(row * inv_t)
    acc = base.clone() * 0.0 if acc is None else acc
    acc = acc.mul_(base)
    if c_other is not None:
        acc = acc.addcmul_(other, -(c_other * inv_t))
    return acc


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Kernel selection: eager, or torch.compile with an eager fallback
# ---------------------------------------------------------------------------------------------

_compiled_kernel = None
_compile_failed = False


def compile_enabled(compile: bool | str) -> bool:
    """Resolve a ``compile`` knob: ``True``, ``False`` or ``"auto"``.

    ``"auto"`` compiles unless the environment variable ``KDQ_COMPILE`` is ``0`` or an earlier
    compilation failed in this process.
    """
    if compile == "auto":
        return os.environ.get("KDQ_COMPILE", "1") != "0" and not _compile_failed
    return bool(compile) and not _compile_failed


def _kernel(use_compile: bool):
    global _compiled_kernel
    if not use_compile:
        return _chunk
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_chunk, dynamic=False)
    return _compiled_kernel


def _compilation_failed(exc: Exception) -> None:
    """Record a compilation failure (no more attempts in this process) and warn about it."""
    global _compile_failed
    _compile_failed = True
    warnings.warn(f"kdq: torch.compile of the fused loss failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  "using the eager kernel", RuntimeWarning, stacklevel=4)


def _sweep(s, t, labels, coef, temperature, alpha, head_mass, terms, rows, want_s, want_t, use_compile):
    """Run the kernel over row chunks; returns (values [N, n], grad_s | None, grad_t | None).

    With ``use_compile`` the last chunk is zero-padded to ``rows`` so that one compiled kernel
    serves every batch size; on any compilation error (when wrapping the kernel or at its first
    call) the sweep falls back to eager, with a warning, and nothing is compiled again in this
    process.
    """
    dt = _compute_dtype(s)
    inv_t = torch.tensor(1.0 / temperature, dtype=dt, device=s.device)
    a = torch.tensor(alpha, dtype=dt, device=s.device)
    skew = alpha != 0.0
    n = s.shape[0]
    gs = torch.empty_like(s) if (want_s and coef is not None) else None
    gt = torch.empty_like(t) if (want_t and coef is not None) else None
    out = []
    try:
        kernel = _kernel(use_compile)
    except Exception as exc:  # noqa: BLE001 - torch.compile itself refused: fall back to eager
        if not use_compile:
            raise
        _compilation_failed(exc)
        return _sweep(s, t, labels, coef, temperature, alpha, head_mass, terms, rows, want_s, want_t, False)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        cs, ct = s[i:j], t[i:j]
        lab = None if labels is None else labels[i:j]
        cc = None if coef is None else coef[i:j]
        if use_compile and j - i < rows:
            pad = rows - (j - i)
            cs = torch.nn.functional.pad(cs, (0, 0, 0, pad))
            ct = torch.nn.functional.pad(ct, (0, 0, 0, pad))
            lab = None if lab is None else torch.nn.functional.pad(lab, (0, pad))
            cc = None if cc is None else torch.nn.functional.pad(cc, (0, 0, 0, pad))
        try:
            v, g1, g2 = kernel(cs, ct, lab, cc, inv_t, a, head_mass, terms, skew, want_t)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            if kernel is _chunk:
                raise
            _compilation_failed(exc)
            return _sweep(s, t, labels, coef, temperature, alpha, head_mass, terms, rows, want_s,
                          want_t, False)
        m = j - i
        out.append(v[:m])
        if gs is not None:
            gs[i:j] = g1[:m]
        if gt is not None:
            gt[i:j] = g2[:m]
    values = torch.cat(out) if out else s.new_zeros((0, len(terms)), dtype=dt)
    return values, gs, gt


class _TermsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, temperature, alpha, head_mass, terms, rows, use_compile):  # type: ignore[override]
        ctx.save_for_backward(s, t, labels)
        ctx.cfg = (temperature, alpha, head_mass, terms, rows, use_compile)
        values, _, _ = _sweep(s, t, labels, None, temperature, alpha, head_mass, terms, rows,
                              False, False, use_compile)
        return values

    @staticmethod
    def backward(ctx, gvals):  # type: ignore[override]
        s, t, labels = ctx.saved_tensors
        temperature, alpha, head_mass, terms, rows, use_compile = ctx.cfg
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        _, gs, gt = _sweep(s, t, labels, gvals.contiguous(), temperature, alpha, head_mass, terms,
                           rows, want_s, want_t, use_compile)
        return gs, gt, None, None, None, None, None, None, None


class _LossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, coef, temperature, alpha, head_mass, terms, rows, use_compile):  # type: ignore[override]
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        values, gs, gt = _sweep(s, t, labels, coef, temperature, alpha, head_mass, terms, rows,
                                want_s, want_t, use_compile)
        # Not save_for_backward: the first backward takes these over (see backward), so that no
        # saved tensor shares memory with a .grad that the caller may then change in place.
        ctx.grads = (gs, gt)
        ctx.mark_non_differentiable(values)
        # masked rows (coef 0) may hold non-finite values: they must not reach the loss
        weighted = torch.where(coef != 0, coef.to(values.dtype) * values, 0.0)
        return weighted.sum(), values

    @staticmethod
    def backward(ctx, gloss, _gvalues):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "kdq: backward through a fused distillation loss a second time: its gradient is computed "
                "in the forward pass and released by the first backward (retain_graph=True does not keep "
                "it); compute the loss again for another backward")
        gs, gt = ctx.grads
        ctx.grads = None
        if bool(gloss == 1):  # the usual loss.backward(): hand over the stored gradient, no copy
            return gs, gt, None, None, None, None, None, None, None, None
        gs = None if gs is None else gs * gloss.to(gs.dtype)
        gt = None if gt is None else gt * gloss.to(gt.dtype)
        return gs, gt, None, None, None, None, None, None, None, None


def kd_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    terms: tuple[str, ...],
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    head_mass: float = 0.5,
    labels: torch.Tensor | None = None,
    chunk_elements: int | None = None,
    compile: bool | str = False,
) -> torch.Tensor:
    """Per-position values ``[..., len(terms)]`` of the named terms (see :data:`TERMS`).

    Inputs are assumed validated. ``labels`` (needed for ``cross_entropy``) must hold valid class
    indices everywhere (replace ignored ones by 0 and mask them out afterwards). Differentiable with
    respect to both logits; the backward recomputes every chunk from the logits, so nothing of size
    ``N x V`` is kept for it beyond the inputs.
    """
    lead = student.shape[:-1]
    s, t = _flat(student), _flat(teacher)
    lab = None if labels is None else labels.reshape(-1)
    rows = chunk_rows(s.shape[-1], chunk_elements)
    out = _TermsFn.apply(s, t, lab, float(temperature), float(alpha), float(head_mass), tuple(terms),
                         rows, compile_enabled(compile))
    return out.reshape(*lead, len(terms))


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    terms: tuple[str, ...],
    coef: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    head_mass: float = 0.5,
    labels: torch.Tensor | None = None,
    chunk_elements: int | None = None,
    compile: bool | str = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(coef * values), values)`` with ``coef`` and ``values`` of shape ``[..., len(terms)]``.

    ``coef`` is treated as a constant (no gradient flows into it). The gradient with respect to the
    logits is computed during this call, in the same sweep, and stored until backward, which
    releases it (handing it over as is when the upstream gradient is 1): one backward per call, a
    second one through a retained graph raises ``RuntimeError``. ``values`` carries no gradient.
    """
    lead = student.shape[:-1]
    s, t = _flat(student), _flat(teacher)
    lab = None if labels is None else labels.reshape(-1)
    c = coef.detach().reshape(-1, len(terms)).contiguous()
    rows = chunk_rows(s.shape[-1], chunk_elements)
    loss, values = _LossFn.apply(s, t, lab, c, float(temperature), float(alpha), float(head_mass),
                                 tuple(terms), rows, compile_enabled(compile))
    return loss, values.reshape(*lead, len(terms))
