"""The dtype names a plan may assign, importable without torch (see ``kdq.quant.dtypes`` for handlers)."""

from __future__ import annotations

#: Every dtype a plan may name, widest first. ``int8``/``int4`` are weight-only quantization.
DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")

#: The dtype of anything no rule matches.
DEFAULT_DTYPE = "fp32"
