"""Evaluation metrics: Frechet distance (FAD/FID) and model-agnostic scores over embeddings.

kdq computes numbers from embeddings; which model embeds the audio is the caller's choice (the
MusicGen example's ``musicgen.embedders``). Definitions and caveats: docs/metrics.md.
"""

from kdq.metrics.frechet import (
    FrechetError,
    FrechetEstimate,
    FrechetNumericalError,
    frechet_bootstrap,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_reference,
    gaussian_stats,
)
from kdq.metrics.scores import (
    ScoreError,
    clap_score,
    cosine_matrix,
    retention,
    retention_table,
    retrieval_recall,
)

__all__ = [
    "FrechetError",
    "FrechetEstimate",
    "FrechetNumericalError",
    "ScoreError",
    "clap_score",
    "cosine_matrix",
    "frechet_bootstrap",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_distance_reference",
    "gaussian_stats",
    "retention",
    "retention_table",
    "retrieval_recall",
]
