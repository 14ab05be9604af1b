"""Distillation losses: divergences between student and teacher logits, and ``StageMixedKL``.

- :func:`forward_kl`, :func:`reverse_kl`, :func:`skewed_forward_kl`, :func:`skewed_reverse_kl`,
  :func:`adaptive_kl`, :func:`generalized_jsd`: logits ``[..., V]``, optional bool mask, reduction.
- :class:`StageMixedKL`: TinyMusician's stage-mixed, bidirectional and skewed KL with scheduled
  weights and temperature, computed by one fused, chunked sweep over the logits.
- :mod:`kdq.losses.reference`: the plain implementations everything is tested against.
- :mod:`kdq.losses.sparse` and :mod:`kdq.losses.cache`: distillation from a cached teacher:
  :class:`SparseTarget` (top-k + tail, or importance-sampled tokens), :func:`topk_target`,
  :func:`sampled_target`, :func:`sparse_forward_kl` and friends, :func:`write_cache` and
  :class:`CachedTeacherDataset` (safetensors shards). ``StageMixedKL`` takes a ``SparseTarget`` too.

See ``docs/losses.md`` for the formulas and conventions, ``docs/cached_teacher.md`` for the cache.
"""

from kdq.losses.divergences import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
)
from kdq.losses.errors import (
    AlphaError,
    LogitsShapeError,
    LossInputError,
    MaskError,
    ReductionError,
    StageMixedKLConfigError,
    TemperatureError,
)
from kdq.losses import fused, reference
from kdq.losses.cache import CachedTeacherDataset, TeacherCacheError, collate_targets, write_cache
from kdq.losses.sparse import (
    SparseTarget,
    SparseTargetError,
    sampled_target,
    sparse_forward_kl,
    sparse_reverse_kl,
    sparse_skewed_forward_kl,
    sparse_skewed_reverse_kl,
    topk_target,
)
from kdq.losses.stage_mixed import StageMixedKL, paper_config

__all__ = [
    "AlphaError",
    "CachedTeacherDataset",
    "LogitsShapeError",
    "LossInputError",
    "MaskError",
    "ReductionError",
    "SparseTarget",
    "SparseTargetError",
    "StageMixedKL",
    "StageMixedKLConfigError",
    "TeacherCacheError",
    "TemperatureError",
    "adaptive_kl",
    "collate_targets",
    "forward_kl",
    "generalized_jsd",
    "paper_config",
    "reverse_kl",
    "sampled_target",
    "skewed_forward_kl",
    "skewed_reverse_kl",
    "sparse_forward_kl",
    "sparse_reverse_kl",
    "sparse_skewed_forward_kl",
    "sparse_skewed_reverse_kl",
    "topk_target",
    "write_cache",
]
