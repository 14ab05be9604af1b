"""A cached teacher on disk: :class:`~kdq.losses.SparseTarget` items in safetensors shards.

Layout of a cache folder (written by :func:`write_cache`, read by :class:`CachedTeacherDataset`)::

    folder/
      index.json                  kind, k or n, temperatures, vocab, dtypes, items, positions,
                                  bytes per position, and per shard: file, items, positions,
                                  bytes, sha256
      shard-00000.safetensors     the items' tensors, concatenated along positions
      shard-00001.safetensors     ...

An *item* is one yielded target (e.g. one training example's ``[K, T]`` positions); items may
differ in shape but not in number of leading axes. A shard holds whole items and is closed once it
holds at least ``shard_positions`` positions. Each shard holds, for ``P`` positions and ``m`` items:

==================  =============================  =================================================
tensor              shape, dtype                   content
==================  =============================  =================================================
``indices``         ``[P, s]`` int16 or int32      token indices (int16 when the vocabulary fits)
``log_probs``       ``[P, s]`` fp32 / fp16 / bf16  teacher log-probabilities at the indices
``tail``            ``[P]`` same dtype (top-k)     log of the mass outside the indices
``counts``          ``[P, n]`` uint8/int16/int32   (sampled, proposal = teacher) draws per token;
                                                   the weights are ``counts / n``, exactly
``weights``         ``[P, n]`` fp32                (sampled, other proposal) importance weights
``item_offsets``    ``[m + 1]`` int64              item ``j`` is rows ``offsets[j]:offsets[j+1]``
``item_shapes``     ``[m, d]`` int64               item ``j``'s leading shape
==================  =============================  =================================================

Only safetensors and JSON are written or read: nothing is unpickled. The write is atomic for the
whole folder: everything goes to a hidden temporary folder beside it (``.<name>.<random>.tmp``),
each file is fsync-ed, and the folder is renamed into place only after the index is written; if
the iterator (or anything else) raises, the temporary folder is removed and ``folder`` is
untouched. A process killed outright can leave the hidden temporary folder behind, never a
partial ``folder``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdq._io import atomic_path, atomic_write_text, fsync_dir
from kdq.errors import KdqError, bad_value
from kdq.losses.sparse import SparseTarget

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "CachedTeacherDataset",
    "TeacherCacheError",
    "collate_targets",
    "payload_bytes_per_position",
    "write_cache",
]

FORMAT = "kdq-cached-teacher"
VERSION = 1
INDEX_FILE = "index.json"

#: Storage dtypes for the log-probabilities, by name.
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int16: "int16", torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8"}


class TeacherCacheError(KdqError):
    """A bad argument to :func:`write_cache`, or a cache folder that cannot be read as written."""


def _value_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in VALUE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in VALUE_DTYPES:
        return VALUE_DTYPES[dtype]
    raise bad_value(TeacherCacheError, "dtype", dtype, f"one of {tuple(VALUE_DTYPES)} (or that torch dtype)",
                    "fp16 halves the disk of fp32 at about 3 decimal digits per log-probability")


def _index_dtype(vocab: int) -> torch.dtype:
    return torch.int16 if vocab <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _count_dtype(n: int) -> torch.dtype:
    if n <= torch.iinfo(torch.uint8).max:
        return torch.uint8
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


def payload_bytes_per_position(kind: str, size: int, *, vocab: int, dtype: str | torch.dtype = "fp16",
                               self_proposal: bool = True) -> int:
    """Bytes one position's target takes in a shard, headers and item offsets aside.

    Top-k: ``k`` indices, ``k`` log-probs and one tail value. Sampled: ``n`` indices, ``n``
    log-probs and ``n`` counts (``self_proposal``; 1 byte each up to n = 255) or ``n`` fp32 weights.
    Dense fp16 logits, for comparison, take ``2 * vocab``.
    """
    vb = torch.empty((), dtype=_value_dtype(dtype)).element_size()
    ib = torch.empty((), dtype=_index_dtype(vocab)).element_size()
    if kind == "topk":
        return size * (ib + vb) + vb
    if kind == "sampled":
        wb = torch.empty((), dtype=_count_dtype(size)).element_size() if self_proposal else 4
        return size * (ib + vb + wb)
    raise bad_value(TeacherCacheError, "kind", kind, "'topk' or 'sampled'")


def _stored_dtypes(spec: dict[str, Any], vdt: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each per-position tensor of a shard is stored in."""
    out = {"indices": _index_dtype(spec["vocab"]), "log_probs": vdt}
    if spec["kind"] == "topk":
        out["tail"] = vdt
    elif spec["proposal_temperature"] == spec["temperature"]:
        out["counts"] = _count_dtype(spec["n"])
    else:
        out["weights"] = torch.float32
    return out


def _spec(t: SparseTarget) -> dict[str, Any]:
    return {"kind": t.kind, "size": t.size, "vocab": t.vocab, "temperature": t.temperature,
            "proposal_temperature": t.proposal_temperature, "n": t.n, "item_ndim": len(t.shape)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_cache(
    folder: str | os.PathLike[str],
    targets: Iterable[SparseTarget],
    *,
    shard_positions: int = 1 << 20,
    dtype: str | torch.dtype = "fp32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``targets`` (one item each) to a cache folder, atomically; returns the index.

    Args:
        folder: the cache folder to create (its parent is created if needed).
        targets: an iterable of :class:`SparseTarget` of one kind, size, vocabulary, temperature
            (and proposal temperature), each with the same number of leading axes. It is consumed
            once, item by item: only the current shard is held in memory.
        shard_positions: close a shard once it holds at least this many positions (whole items).
        dtype: storage dtype of the log-probabilities: ``"fp32"`` (exact), ``"fp16"`` or ``"bf16"``.
        overwrite: replace an existing cache at ``folder`` (only a folder holding a kdq cache
            index, or an empty one, is replaced).

    Returns:
        The index written to ``folder/index.json``.

    Raises:
        TeacherCacheError: bad arguments, an empty iterable, items that disagree with the first,
            or an existing ``folder`` without ``overwrite=True``. Whatever the iterator raises
            propagates, and ``folder`` is left as it was.
    """
    dest = Path(folder)
    if isinstance(shard_positions, bool) or not isinstance(shard_positions, int) or shard_positions < 1:
        raise bad_value(TeacherCacheError, "shard_positions", shard_positions, "an int >= 1",
                        "about 1e6 positions makes shards of tens of MB")
    vdt = _value_dtype(dtype)
    _check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        index = _write_shards(tmp, targets, shard_positions, vdt)
        atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True) + "\n")
        fsync_dir(tmp)
        _check_destination(dest, overwrite)  # it may have appeared meanwhile
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return index


def _check_destination(dest: Path, overwrite: bool) -> None:
    if not dest.exists():
        return
    if not overwrite:
        raise bad_value(TeacherCacheError, "folder", str(dest), "a path that does not exist yet",
                        "pass overwrite=True to replace the cache there, or pick another folder")
    if not dest.is_dir() or (any(dest.iterdir()) and not (dest / INDEX_FILE).is_file()):
        raise bad_value(TeacherCacheError, "folder", str(dest),
                        "a kdq teacher cache (with index.json) or an empty folder, to overwrite",
                        "kdq does not delete folders it did not write; pick another folder")


def _write_shards(tmp: Path, targets: Iterable[SparseTarget], shard_positions: int,
                  vdt: torch.dtype) -> dict[str, Any]:
    from safetensors.torch import save_file

    spec: dict[str, Any] | None = None
    buffer: list[SparseTarget] = []
    buffered = 0
    shards: list[dict[str, Any]] = []
    totals = {"items": 0, "positions": 0}

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffer:
            return
        assert spec is not None
        tensors = _shard_tensors(buffer, spec, vdt)
        name = f"shard-{len(shards):05d}.safetensors"
        with atomic_path(tmp / name) as path:
            save_file(tensors, str(path), metadata={"format": FORMAT, "version": str(VERSION), "kind": spec["kind"]})
        shards.append({"file": name, "items": len(buffer), "positions": buffered,
                       "bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)})
        totals["items"] += len(buffer)
        totals["positions"] += buffered
        buffer, buffered = [], 0

    for i, target in enumerate(targets):
        if not isinstance(target, SparseTarget):
            raise bad_value(TeacherCacheError, f"targets[{i}]", type(target).__name__, "a kdq.losses.SparseTarget")
        s = _spec(target)
        if spec is None:
            spec = s
        elif s != spec:
            diff = {k: (s[k], spec[k]) for k in s if s[k] != spec[k]}
            raise bad_value(TeacherCacheError, f"targets[{i}]", target,
                            f"the first target's kind, size, vocab, temperatures and number of leading axes "
                            f"(differs in {', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())})",
                            "write one cache per kind and temperature")
        if target.kind == "sampled" and target.self_proposal:
            w = target.weights.detach()
            if not torch.equal(torch.round(w * target.n) / target.n, w):
                raise bad_value(TeacherCacheError, f"targets[{i}].weights", "weights that are not counts / n",
                                "counts / n for a target drawn from the teacher itself (proposal_temperature = "
                                "temperature)", "build it with sampled_target(), or set proposal_temperature")
        buffer.append(target)
        buffered += math.prod(target.shape)
        if buffered >= shard_positions:
            flush()
    if spec is None:
        raise bad_value(TeacherCacheError, "targets", "an empty iterable", "at least one SparseTarget")
    flush()
    dtypes = {k: _DTYPE_NAMES[v] for k, v in _stored_dtypes(spec, vdt).items()}
    payload = payload_bytes_per_position(spec["kind"], spec["size"], vocab=spec["vocab"], dtype=vdt,
                                         self_proposal=spec["kind"] != "sampled" or
                                         spec["proposal_temperature"] == spec["temperature"])
    file_bytes = sum(s["bytes"] for s in shards)
    index: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "kind": spec["kind"], "vocab": spec["vocab"], "temperature": spec["temperature"],
        "item_ndim": spec["item_ndim"], "dtypes": dtypes, **totals,
        "bytes_per_position": {
            "payload": payload,
            "files": file_bytes / totals["positions"] if totals["positions"] else None,
            "dense_fp16_logits": 2 * spec["vocab"],
        },
        "shards": shards,
    }
    if spec["kind"] == "topk":
        index["k"] = spec["size"]
    else:
        index.update(n=spec["n"], slots=spec["size"], proposal_temperature=spec["proposal_temperature"])
    return index


def _shard_tensors(items: list[SparseTarget], spec: dict[str, Any], vdt: torch.dtype) -> dict[str, torch.Tensor]:
    s = spec["size"]
    flat = [t.to("cpu") for t in items]
    dtypes = _stored_dtypes(spec, vdt)
    out: dict[str, torch.Tensor] = {}
    for name, dt in dtypes.items():
        src = "weights" if name == "counts" else name
        x = torch.cat([t.tensors()[src].detach().reshape(-1, s) if name != "tail" else t.tail.detach().reshape(-1)
                       for t in flat])
        out[name] = torch.round(x.double() * spec["n"]).to(dt) if name == "counts" else x.to(dt)
    sizes = [math.prod(t.shape) for t in flat]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    out["item_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    out["item_shapes"] = torch.tensor([list(t.shape) for t in flat], dtype=torch.int64).reshape(len(flat),
                                                                                                 spec["item_ndim"])
    return {k: v.contiguous() for k, v in out.items()}


class CachedTeacherDataset(Dataset):
    """The items of a cache folder, read back one at a time as :class:`SparseTarget`.

    ``dataset[i]`` opens (memory-maps) only the shard holding item ``i`` with safetensors'
    ``safe_open`` and reads only that item's rows; open shards are kept per process (they are not
    pickled, so the dataset can go to ``DataLoader`` workers). Batch items of equal shape with
    ``DataLoader(dataset, batch_size=..., collate_fn=collate_targets)``.

    Items come back on ``device`` with ``indices`` int64, ``log_probs`` and ``tail`` in the
    stored dtype (the losses compute in float32 at least) and ``weights`` float32 (``counts / n``
    when the cache stored counts).

    Args:
        folder: a folder written by :func:`write_cache`.
        verify: ``"size"`` (default: every shard exists with the size the index records),
            ``"sha256"`` (also hash every shard, reading all of them once) or ``"none"``.
        device: where items are put (default CPU).

    Raises:
        TeacherCacheError: a missing or unreadable index, another format or version, a missing
            shard, or a shard whose size or SHA-256 differs from the index.
    """

    def __init__(self, folder: str | os.PathLike[str], *, verify: str = "size",
                 device: torch.device | str | None = None) -> None:
        self.folder = Path(folder)
        if verify not in ("size", "sha256", "none"):
            raise bad_value(TeacherCacheError, "verify", verify, "'size', 'sha256' or 'none'")
        path = self.folder / INDEX_FILE
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise bad_value(TeacherCacheError, "folder", str(self.folder), f"a folder with {INDEX_FILE}",
                            "write one with kdq.losses.write_cache(folder, targets)") from None
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f"{path} is not a readable JSON index ({e}); write the cache again") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            got = (index.get("format"), index.get("version")) if isinstance(index, dict) else type(index).__name__
            raise TeacherCacheError(f"{path} has format/version {got!r}: this kdq reads {(FORMAT, VERSION)!r}")
        self.index = index
        for shard in index["shards"]:
            f = self.folder / shard["file"]
            if not f.is_file():
                raise TeacherCacheError(f"{f} is missing (the index lists it); write the cache again")
            if verify in ("size", "sha256") and f.stat().st_size != shard["bytes"]:
                raise TeacherCacheError(f"{f} has {f.stat().st_size} bytes, the index says {shard['bytes']}: "
                                        "the file is truncated or from another write; write the cache again")
            if verify == "sha256" and _sha256(f) != shard["sha256"]:
                raise TeacherCacheError(f"{f}'s SHA-256 differs from the index: the file is corrupt or from "
                                        "another write; write the cache again")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._starts = [0]
        for shard in index["shards"]:
            self._starts.append(self._starts[-1] + shard["items"])
        self._open: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}

    # -- what the cache holds ----------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.index["kind"]

    @property
    def vocab(self) -> int:
        return self.index["vocab"]

    @property
    def temperature(self) -> float:
        return self.index["temperature"]

    @property
    def positions(self) -> int:
        return self.index["positions"]

    @property
    def bytes_per_position(self) -> dict[str, float | None]:
        """``{"payload": ..., "files": ..., "dense_fp16_logits": ...}`` as recorded in the index."""
        return dict(self.index["bytes_per_position"])

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        size = f"k={self.index['k']}" if self.kind == "topk" else f"n={self.index['n']}"
        return (f"CachedTeacherDataset({str(self.folder)!r}, kind={self.kind!r}, {size}, vocab={self.vocab}, "
                f"temperature={self.temperature:g}, items={len(self)}, shards={len(self.index['shards'])})")

    # -- reading -----------------------------------------------------------------------------------

    def _shard(self, j: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if j not in self._open:
            from safetensors import SafetensorError, safe_open

            f = self.folder / self.index["shards"][j]["file"]
            try:
                handle = safe_open(str(f), "pt")
                offsets, shapes = handle.get_tensor("item_offsets"), handle.get_tensor("item_shapes")
            except (SafetensorError, OSError) as e:
                raise TeacherCacheError(f"{f} is not a readable safetensors shard ({e}); write the cache again") \
                    from None
            self._open[j] = (handle, offsets, shapes)
        return self._open[j]

    def __getitem__(self, i: int) -> SparseTarget:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"CachedTeacherDataset indices are ints, got {type(i).__name__}")
        n_items = len(self)
        if i < 0:
            i += n_items
        if not 0 <= i < n_items:
            raise IndexError(f"item {i} is out of range for a cache of {n_items} items")
        j = bisect.bisect_right(self._starts, i) - 1
        handle, offsets, shapes = self._shard(j)
        local = i - self._starts[j]
        a, b = int(offsets[local]), int(offsets[local + 1])
        shape = tuple(int(x) for x in shapes[local])
        ix = self.index
        s = ix["k"] if self.kind == "topk" else ix["slots"]

        def rows(name: str, per_row: bool = True) -> torch.Tensor:
            x = handle.get_slice(name)[a:b]
            return x.reshape(*shape, s) if per_row else x.reshape(shape)

        indices = rows("indices").to(self.device, torch.int64)
        log_probs = rows("log_probs").to(self.device)
        if self.kind == "topk":
            return SparseTarget("topk", indices, log_probs, ix["vocab"], ix["temperature"],
                                tail=rows("tail", per_row=False).to(self.device))
        if "counts" in ix["dtypes"]:
            weights = rows("counts").to(self.device, torch.float32) / ix["n"]
        else:
            weights = rows("weights").to(self.device, torch.float32)
        return SparseTarget("sampled", indices, log_probs, ix["vocab"], ix["temperature"], weights=weights,
                            proposal_temperature=ix["proposal_temperature"], n=ix["n"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # open shards stay in the process that opened them
        return state


def collate_targets(batch: list[SparseTarget]) -> SparseTarget:
    """``DataLoader`` ``collate_fn``: stack items of equal shape along a new batch axis."""
    return SparseTarget.stack(batch)
