"""Caption gain: how much of its caption a model reads, one attribute at a time (teacher-forced).

For held-out codes and their captions, ``caption_gain`` swaps one attribute of each caption (the
instrument, the key, the tempo word, the style) for another value of it, and reports

    gain = NLL(codes | swapped caption) - NLL(codes | own caption)

in nats per code position (``eval.heldout``'s NLL, every position of every codebook), per clip and
as a mean with a paired bootstrap interval over clips. A model that ignores an attribute gains 0;
one that reads it loses likelihood when it is wrong. It needs no generation and no judge, so it
tells "the model does not read the caption" apart from "the judge cannot hear the difference"
(docs/mini_world.md uses it on the valid split). ``"all"`` (another clip's caption) and
``"empty"`` (no caption) bound what a single attribute can be worth.

``swap_attribute`` is the caption edit: the attribute's words replaced in place (first letter's case
kept), so the rest of the caption, its phrasing included, stays as it was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from kdq.errors import KdqError, bad_value

__all__ = ["ATTRIBUTES", "AlignmentError", "attribute_values", "caption_gain", "swap_attribute"]

#: the caption attributes of the mini world's captions (``musicgen.data.render.make_caption``)
ATTRIBUTES = ("instrument", "key", "tempo", "style")


class AlignmentError(KdqError):
    """A caption that does not hold the attribute to swap, or alternatives that do not fit the data."""


def swap_attribute(caption: str, own: str, pool: Sequence[str], rng: np.random.Generator) -> str:
    """``caption`` with the whole words ``own`` (any case) replaced by a value drawn from ``pool``
    (values equal to ``own`` are left out); the replacement's first letter takes the case of the
    original's."""
    choices = [v for v in pool if v.lower() != own.lower()]
    if not choices:
        raise bad_value(AlignmentError, "pool", list(pool), f"at least one value other than {own!r}")
    match = re.search(rf"\b{re.escape(own)}\b", caption, flags=re.IGNORECASE)
    if match is None:
        raise bad_value(AlignmentError, "caption", caption, f"a caption that names {own!r}")
    new = choices[int(rng.integers(len(choices)))]
    new = new[0].upper() + new[1:] if match.group(0)[0].isupper() else new
    return caption[: match.start()] + new + caption[match.end():]


def attribute_values(metas: Sequence[dict], captions: Sequence[str]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """For the mini world's clips (their metadata rows and captions): per attribute, each clip's own
    value and the values it may be swapped for.

    Instruments: the other renderable instruments. Keys: keys of another tonic found in ``metas``
    (so "C major" never becomes "C minor"). Tempo: the other tempo words. Style: the caption's style
    phrase (found by the longest match) against the other sources' styles.
    """
    from musicgen.data.render import FOLK_FORMS, INSTRUMENTS, SOURCES

    names = [n for _, n in INSTRUMENTS]
    keys = sorted({m["key"] for m in metas})
    tempos = ["slow", "moderate", "lively", "fast"]
    styles = sorted({s.style for s in SOURCES.values()} | {f"folk {f}" for f in FOLK_FORMS}, key=len, reverse=True)
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    out["instrument"] = ([m["instrument"] for m in metas], [[n for n in names if n != m["instrument"]] for m in metas])
    out["key"] = ([m["key"] for m in metas],
                  [[k for k in keys if k.split()[0] != m["key"].split()[0]] for m in metas])
    out["tempo"] = ([m["tempo"] for m in metas], [[t for t in tempos if t != m["tempo"]] for m in metas])
    own_styles = []
    for caption in captions:
        found = next((s for s in styles if s.lower() in caption.lower()), None)
        if found is None:
            raise bad_value(AlignmentError, "caption", caption, f"a caption naming one of the styles {styles}")
        own_styles.append(found)
    # a folk form swaps to a non-folk style (swapping reel for jig would test the form, not the style)
    out["style"] = (own_styles, [[s for s in styles if not s.startswith("folk ") and s != own] +
                                 (["folk reel"] if not own.startswith("folk") else []) for own in own_styles])
    return out


def caption_gain(model, tokenizer, data, alternatives: dict[str, Sequence[str]], *, n_boot: int = 1000,
                 seed: int = 0, batch: int = 16) -> dict[str, dict]:
    """Per named caption set in ``alternatives`` (one caption per clip of ``data``, a ``TokenDataset``):
    ``gain`` (mean over clips of NLL with those captions minus NLL with the clip's own, nats per
    position), ``gain_ci`` (95% paired bootstrap over clips), ``gain_cb0`` (the first codebook's),
    ``items`` (per clip) and ``own_nll``."""
    from kdq.metrics import paired_bootstrap
    from musicgen.data.tokens import TokenDataset
    from musicgen.eval.heldout import heldout

    own = heldout(model, tokenizer, data, batch=batch)
    base = np.asarray(own["nll_items"])
    out = {}
    for name, captions in alternatives.items():
        if len(captions) != len(data):
            raise bad_value(AlignmentError, f"alternatives[{name!r}]", f"{len(captions)} captions",
                            f"one per clip ({len(data)})")
        other = heldout(model, tokenizer, TokenDataset(data.codes, list(captions)), batch=batch)
        items = np.asarray(other["nll_items"]) - base
        est = paired_bootstrap(lambda x, _: float(np.mean(x)), np.asarray(other["nll_items"]), base,
                               n_boot=n_boot, seed=seed)
        out[name] = {"gain": float(items.mean()), "gain_ci": [est.low, est.high], "within_noise": est.within_noise,
                     "gain_cb0": other["nll_cb0"] - own["nll_cb0"], "items": items.tolist(), "own_nll": own["nll"]}
    return out
