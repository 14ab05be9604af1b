"""Model-agnostic scores over embeddings: CLAP score, retrieval recall, and retention.

Retention is defined here once, and every report in kdq uses ``retention``:

- for a higher-is-better score (CLAP score): ``compressed / baseline``;
- for a lower-is-better score (FAD): ``baseline / compressed``.

So retention is 1.0 when the compressed model matches its uncompressed baseline, below 1.0 when it is
worse, and above 1.0 when it is better, whichever direction the underlying score runs. It is only
defined for strictly positive scores (a ratio of a negative CLAP score, or a FAD of 0, means nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kdq.errors import KdqError, bad_value

__all__ = ["ScoreError", "clap_score", "cosine_matrix", "retention", "retention_table", "retrieval_recall"]


class ScoreError(KdqError):
    """Inputs a score cannot be computed on."""


def _rows(x: object, arg: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise bad_value(ScoreError, f"{arg}.shape", arr.shape, "a 2-D array [num_items, dim] with num_items >= 1")
    if not np.isfinite(arr).all():
        raise ScoreError(f"{arg} has NaN or infinite values; not allowed: check the embedder's input")
    return arr


def _normalize(x: np.ndarray, arg: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ScoreError(f"{arg} has {int((norms == 0).sum())} all-zero rows; cosine similarity is undefined for them")
    return x / norms


def cosine_matrix(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Cosine similarity of every query row [Q, D] with every key row [K, D] -> [Q, K]."""
    q, k = _rows(queries, "queries"), _rows(keys, "keys")
    if q.shape[1] != k.shape[1]:
        raise bad_value(ScoreError, "keys.shape", k.shape, f"dim {q.shape[1]} to match queries.shape={q.shape}")
    return _normalize(q, "queries") @ _normalize(k, "keys").T


def clap_scores(text_embeddings: np.ndarray, audio_embeddings: np.ndarray) -> np.ndarray:
    """Per-prompt cosine similarity [N] between row i of ``text_embeddings`` and row i of
    ``audio_embeddings`` (what ``clap_score`` averages; what a bootstrap over prompts resamples)."""
    t, a = _rows(text_embeddings, "text_embeddings"), _rows(audio_embeddings, "audio_embeddings")
    if t.shape != a.shape:
        raise bad_value(
            ScoreError, "audio_embeddings.shape", a.shape, f"{t.shape} to match text_embeddings (one clip per prompt)"
        )
    return np.sum(_normalize(t, "text_embeddings") * _normalize(a, "audio_embeddings"), axis=1)


def clap_score(text_embeddings: np.ndarray, audio_embeddings: np.ndarray) -> float:
    """Mean cosine similarity between row i of ``text_embeddings`` and row i of ``audio_embeddings``.

    The text-audio alignment score of TinyMusician and of MusicGen-style evaluations: row i is the
    text embedding of prompt i and the audio embedding of the clip generated from it, both from the
    same joint text-audio model (shapes [N, D]). Range [-1, 1]; higher is better.
    """
    return float(np.mean(clap_scores(text_embeddings, audio_embeddings)))


def retrieval_recall(
    queries: np.ndarray,
    keys: np.ndarray,
    *,
    query_labels: Sequence,
    key_labels: Sequence,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Recall@k of cosine retrieval: the share of queries with a same-label key among their top k.

    Labels make duplicated captions fair: retrieving any clip with the query's caption counts as a
    hit. The result also holds ``chance@k``, the expected recall of a random ranking, so a reader can
    see how far above chance a model is.

    Args:
        queries: [Q, D] embeddings (e.g. captions).
        keys: [K, D] embeddings (e.g. audio clips), same embedding space.
        query_labels: Q hashable labels.
        key_labels: K hashable labels.
        ks: cut-offs (each clipped to K).

    Returns:
        ``{"R@1": ..., "chance@1": ..., "R@5": ..., ...}``.
    """
    sims = cosine_matrix(queries, keys)
    ql, kl = list(query_labels), list(key_labels)
    if len(ql) != sims.shape[0] or len(kl) != sims.shape[1]:
        raise ScoreError(
            f"query_labels has {len(ql)} and key_labels {len(kl)} entries; need {sims.shape[0]} and "
            f"{sims.shape[1]} (one per row of queries and keys)"
        )
    match = np.array([[q == k for k in kl] for q in ql])
    order = np.argsort(-sims, axis=1, kind="stable")
    ranked = np.take_along_axis(match, order, axis=1)
    out: dict[str, float] = {}
    n_keys = len(kl)
    for k in ks:
        kk = min(int(k), n_keys)
        if kk < 1:
            raise bad_value(ScoreError, "ks", tuple(ks), "positive cut-offs")
        out[f"R@{k}"] = float(ranked[:, :kk].any(axis=1).mean())
        # Chance of at least one hit among kk keys drawn without replacement.
        pos = match.sum(axis=1)
        miss = np.ones(len(ql))
        for j in range(kk):
            miss *= np.clip((n_keys - pos - j) / (n_keys - j), 0.0, 1.0)
        out[f"chance@{k}"] = float(np.mean(1.0 - miss))
    return out


def retention(baseline: float, compressed: float, *, higher_is_better: bool) -> float:
    """How much of the baseline's quality a compressed model keeps (1.0 = all of it).

    ``compressed / baseline`` for a higher-is-better score (CLAP score) and ``baseline / compressed``
    for a lower-is-better one (FAD). Both scores must be strictly positive and finite.
    """
    for name, v in (("baseline", baseline), ("compressed", compressed)):
        if not np.isfinite(v) or v <= 0:
            raise bad_value(
                ScoreError, name, v, "a finite score > 0",
                "retention is a ratio; it is undefined for a zero, negative or NaN score",
            )
    return float(compressed / baseline) if higher_is_better else float(baseline / compressed)


def _direction(key: str) -> bool | None:
    if key.startswith("fad_"):
        return False
    if key.startswith("clap_score_"):
        return True
    return None


def retention_table(baseline: Mapping[str, float], compressed: Mapping[str, float]) -> dict[str, float | None]:
    """``retention`` for every score key both results share (``fad_*`` lower, ``clap_score_*`` higher).

    Returns ``{"retention_<key>": value}``, with None where retention is undefined (a score <= 0,
    e.g. a negative CLAP score); other keys and non-numeric values (sample counts, intervals) are
    ignored.
    """
    out = {}
    for key, value in baseline.items():
        direction = _direction(key)
        other = compressed.get(key)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, other))
        if direction is None or not numeric:
            continue
        try:
            out[f"retention_{key}"] = retention(float(value), float(other), higher_is_better=direction)
        except ScoreError:
            out[f"retention_{key}"] = None
    return out
