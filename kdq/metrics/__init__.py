"""Evaluation metrics over embeddings: Frechet distance (FAD/FID), KAD, paired bootstrap, scores.

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
from kdq.metrics.kernel_distance import (
    KAD_SCALE,
    KadError,
    KadEstimate,
    kad,
    kad_bootstrap,
    kad_reference,
    median_bandwidth,
)
from kdq.metrics.paired import PairedBootstrapError, PairedEstimate, paired_bootstrap, paired_kad_bootstrap
from kdq.metrics.scores import (
    ScoreError,
    clap_score,
    clap_scores,
    cosine_matrix,
    retention,
    retention_table,
    retrieval_recall,
)

__all__ = [
    "KAD_SCALE",
    "FrechetError",
    "FrechetEstimate",
    "FrechetNumericalError",
    "KadError",
    "KadEstimate",
    "PairedBootstrapError",
    "PairedEstimate",
    "ScoreError",
    "clap_score",
    "clap_scores",
    "cosine_matrix",
    "frechet_bootstrap",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_distance_reference",
    "gaussian_stats",
    "kad",
    "kad_bootstrap",
    "kad_reference",
    "median_bandwidth",
    "paired_bootstrap",
    "paired_kad_bootstrap",
    "retention",
    "retention_table",
    "retrieval_recall",
]
