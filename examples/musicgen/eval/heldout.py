"""Teacher-forced figures on held-out codes: NLL per token (all codebooks, each codebook) and KL to a teacher.

The one held-out NLL of the example (world figures, the ablation, ``diagnose.py``): conditioned on
each clip's own caption, no condition dropout, nats per real code position (the delay pattern's
padding never counts), token-weighted over the split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from musicgen.data.tokens import TokenDataset
from musicgen.train.objectives import conditioned_logits


@torch.no_grad()
def heldout(model, tokenizer, data: TokenDataset, *, teacher=None, batch: int = 16) -> dict:
    """``nll``, ``nll_cb0`` (the first codebook), ``nll_per_codebook`` and ``kl_teacher`` (forward KL of
    the teacher to ``model`` per position; 0.0 without a teacher) on ``data``, and per clip
    ``nll_items`` / ``kl_items`` (each clip's mean over its positions: every clip has as many) for
    paired comparisons between models on the same clips."""
    from kdq.losses import forward_kl

    model.eval()
    sums = counts = None
    nll_items, kl_items = [], []
    for i in range(0, len(data), batch):
        part = data.subset(range(i, min(i + batch, len(data))))
        keep = torch.zeros(len(part), dtype=torch.bool)
        logits, labels, mask = conditioned_logits(model, tokenizer, part.codes, part.captions, keep)
        logits = logits.float()
        lp = F.log_softmax(logits, -1).gather(-1, labels.masked_fill(~mask, 0)[..., None])[..., 0]
        m = mask.double()
        s, c = (-lp.double() * m).sum((0, 2)), m.sum((0, 2))
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        nll_items += ((-lp.double() * m).sum((1, 2)) / m.sum((1, 2))).tolist()
        if teacher is not None:
            t, _, _ = conditioned_logits(teacher, tokenizer, part.codes, part.captions, keep)
            kl = forward_kl(logits, t.float(), mask=mask, reduction="none").double()
            kl_items += ((kl * m).sum((1, 2)) / m.sum((1, 2))).tolist()
    per = (sums / counts).tolist()
    kl_mean = float(np.mean(kl_items)) if teacher is not None else 0.0
    return {"nll": float(sums.sum() / counts.sum()), "nll_cb0": per[0], "nll_per_codebook": per, "kl_teacher": kl_mean,
            "nll_items": nll_items, "kl_items": kl_items if teacher is not None else [0.0] * len(nll_items)}


def unigram_nll(train: TokenDataset, test: TokenDataset, *, vocab: int, alpha: float = 1.0) -> dict:
    """NLL of ``test`` codes under per-codebook unigram frequencies of ``train`` (add-``alpha`` smoothing)."""
    per = []
    for k in range(train.codes.shape[1]):
        counts = torch.bincount(train.codes[:, k].flatten(), minlength=vocab).double() + alpha
        logp = (counts / counts.sum()).log()
        per.append(float(-logp[test.codes[:, k].flatten()].mean()))
    return {"nll": float(np.mean(per)), "nll_cb0": per[0], "nll_per_codebook": per}
