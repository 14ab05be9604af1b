"""Ready score functions for ``MixedPrecisionPlanner.profile``: ``score_fn(model) -> float``, 0 = no change.

Each one runs a user-supplied ``forward(model)`` on fixed calibration inputs, computes the reference
output of the fp32 model **once** at construction, and compares every later call against it.

- ``OutputKL``: mean over positions of ``KL(p_ref || p_model)``, ``p = softmax(logits / T)`` over the
  last dim, in nats per position. For LMs and MusicGen-style multi-codebook logits (any leading dims,
  e.g. ``[batch * codebooks, time, vocab]``); an optional boolean mask selects the positions that
  count (e.g. not the delay pattern's padding). This is the quantity a distilled/quantized model is
  judged by: how far its next-token distribution moves.
- ``RelativeError``: ``sum (y - y_ref)^2 / sum y_ref^2`` over all output tensors (``10 log10`` of its
  inverse is the output SQNR in dB). For models without a distribution (codecs, encoders, vision).
- ``SumOfScores``: a weighted sum, e.g. MusicGen's logits KL plus EnCodec's relative audio error,
  so that parts that do not feed the logits still get a sensitivity.

Scopes. ``OutputKL`` and ``RelativeError`` take an optional ``scope``: the module names (subtrees)
their output can depend on. When the planner converts a group entirely outside a score's scope it
knows the output cannot change and skips that forward (``restrict``), e.g. EnCodec groups skip the
decoder forward of MusicGen's logits KL. A wrong scope gives wrong (zero) sensitivities: leave it
``None`` (always evaluate) unless the data flow is certain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.quant.errors import ProfileError

Forward = Callable[[nn.Module], Any]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    return []


def kl_to_reference(ref_logits: torch.Tensor, logits: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None) -> float:
    """Mean ``KL(softmax(ref / T) || softmax(logits / T))`` over positions (all dims but the last).

    Args:
        ref_logits: ``[..., vocab]`` reference logits.
        logits: same shape.
        temperature: softening temperature ``T`` (> 0).
        mask: optional boolean ``[...]`` selecting positions (ref_logits.shape[:-1]).
    """
    if ref_logits.shape != logits.shape:
        raise ProfileError(f"logits shape {tuple(logits.shape)} differs from the reference {tuple(ref_logits.shape)}")
    logp = F.log_softmax(ref_logits.double() / temperature, dim=-1)
    logq = F.log_softmax(logits.double() / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return float(kl.mean())


def _in_scope(scope: Sequence[str] | None, roots: Sequence[str]) -> bool:
    if scope is None:
        return True
    for r in roots:
        for sc in scope:
            if r == sc or r.startswith(sc + ".") or sc.startswith(r + "."):
                return True
    return False


def _zero(model: nn.Module) -> float:
    return 0.0


class OutputKL:
    """``score_fn``: mean KL (nats/position) of ``forward(model)``'s logits to the fp32 model's.

    Args:
        forward: ``forward(model) -> logits`` (or a ModelOutput with ``.logits``) on fixed inputs;
            called under ``torch.no_grad``.
        reference: the unconverted model; its output is computed once, here.
        temperature: softening temperature.
        mask: optional boolean mask over the logits' positions.
        scope: module names the logits depend on (see the module docstring), or None.
    """

    name = "kl"

    def __init__(
        self,
        forward: Forward,
        reference: nn.Module,
        *,
        temperature: float = 1.0,
        mask: torch.Tensor | None = None,
        scope: Sequence[str] | None = None,
    ) -> None:
        if not temperature > 0:
            raise ProfileError(f"temperature={temperature!r} is not allowed: it must be > 0")
        self.scope = None if scope is None else tuple(scope)
        self.forward = forward
        self.temperature = temperature
        self.mask = mask
        self.reference = self._logits(reference)

    def _logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = self.forward(model)
        out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor):
            raise ProfileError(f"forward(model) must return logits (a tensor or an output with .logits), got {type(out).__name__}")
        return out.detach().float()

    def restrict(self, roots: Sequence[str]) -> Callable[[nn.Module], float]:
        """This score, or a constant 0 when converting ``roots`` cannot change its output."""
        return self if _in_scope(self.scope, roots) else _zero

    def __call__(self, model: nn.Module) -> float:
        return kl_to_reference(self.reference, self._logits(model), temperature=self.temperature, mask=self.mask)


class RelativeError:
    """``score_fn``: ``sum (y - y_ref)^2 / sum y_ref^2`` over every tensor ``forward(model)`` returns.

    Args:
        forward: ``forward(model) -> tensor(s)`` on fixed inputs (called under ``torch.no_grad``).
        reference: the unconverted model; its output is computed once, here.
        scope: module names the output depends on (see the module docstring), or None.
    """

    name = "relative_error"

    def __init__(self, forward: Forward, reference: nn.Module, *, scope: Sequence[str] | None = None) -> None:
        self.scope = None if scope is None else tuple(scope)
        self.forward = forward
        self.reference = self._outputs(reference)
        self._den = sum(float(t.double().pow(2).sum()) for t in self.reference) or 1.0

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            outs = _tensors(self.forward(model))
        outs = [t.detach().float() for t in outs if t.is_floating_point()]
        if not outs:
            raise ProfileError("forward(model) returned no floating tensor to compare")
        return outs

    def restrict(self, roots: Sequence[str]) -> Callable[[nn.Module], float]:
        """This score, or a constant 0 when converting ``roots`` cannot change its output."""
        return self if _in_scope(self.scope, roots) else _zero

    def __call__(self, model: nn.Module) -> float:
        outs = self._outputs(model)
        if len(outs) != len(self.reference):
            raise ProfileError(f"forward(model) returned {len(outs)} tensors, the reference {len(self.reference)}")
        num = sum(float((a.double() - r.double()).pow(2).sum()) for a, r in zip(outs, self.reference))
        return num / self._den

    @staticmethod
    def to_sqnr_db(value: float) -> float:
        """The output SQNR in dB for a relative error value."""
        return math.inf if value <= 0 else -10.0 * math.log10(value)


class SumOfScores:
    """``score_fn``: ``sum_i w_i * score_i(model)``.

    Args:
        scores: the score functions.
        weights: one weight per score (default 1).
    """

    name = "sum"

    def __init__(self, scores: Sequence[Callable[[nn.Module], float]], weights: Sequence[float] | None = None) -> None:
        self.scores = list(scores)
        self.weights = [1.0] * len(self.scores) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.scores):
            raise ProfileError(f"weights has {len(self.weights)} entries for {len(self.scores)} scores")

    def restrict(self, roots: Sequence[str]) -> SumOfScores:
        """The sum of the parts' restrictions (parts that cannot change are skipped)."""
        parts = [(w, s.restrict(roots) if hasattr(s, "restrict") else s) for w, s in zip(self.weights, self.scores)]
        parts = [(w, s) for w, s in parts if s is not _zero]
        return SumOfScores([s for _, s in parts], [w for w, _ in parts])

    def __call__(self, model: nn.Module) -> float:
        return float(sum(w * s(model) for w, s in zip(self.weights, self.scores)))
