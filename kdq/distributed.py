"""A frozen teacher sharded across ranks with FSDP2, for a teacher that does not fit one device.

The teacher only runs forward, so the memory worth saving is its weights. :func:`shard_teacher`
applies ``torch.distributed.fsdp.fully_shard`` to the teacher's repeated blocks and then to the
teacher itself: at rest each of the ``N`` ranks holds ``1/N`` of every sharded parameter (dim 0,
padded to a multiple of ``N``). A forward all-gathers one block's parameters before the block runs
and frees them after it (``reshard_after_forward=True``); the root's own parameters (embeddings,
heads, anything outside the blocks) are gathered for the whole forward. No gradient flows, so there
is no reduce-scatter. See ``docs/sharded_teacher.md`` for measured memory and the cost.

Every forward is a collective: all ranks must call the teacher the same number of times, in the
same order (one call per micro-batch in a DDP loop), else they wait on each other forever.

- :func:`prepare_teacher`: ``eval()``, ``requires_grad_(False)`` and, behind the flag
  ``shard=True``, :func:`shard_teacher`. The one call a distillation loop needs.
- :func:`teacher_blocks`: the names of the modules that would be sharded (check before a run).
- :func:`teacher_logits`: the teacher's output under ``torch.no_grad``, by its ``forward`` or by a
  function of it (``call=``) that uses its sub-modules directly, as the MusicGen example does.
- :func:`local_parameter_bytes`: parameter bytes this rank holds (local shards of sharded ones).

This module knows modules but no model family; the losses know nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError, bad_value, close_matches

__all__ = [
    "ShardingError",
    "local_parameter_bytes",
    "prepare_teacher",
    "shard_teacher",
    "teacher_blocks",
    "teacher_logits",
]

#: Attribute under which :func:`shard_teacher` registers the FSDP forward method used by ``call=``.
_CALL = "_kdq_teacher_call"

#: Containers without a ``forward`` of their own: a name that points at one means its children.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)

ModuleSpec = str | type[nn.Module]


class ShardingError(KdqError):
    """Bad input to teacher sharding: no process group, unknown module names, a bad mesh."""


def teacher_blocks(teacher: nn.Module, modules: ModuleSpec | Sequence[ModuleSpec] | None = None) -> list[str]:
    """Names (as in ``teacher.named_modules()``) of the blocks :func:`shard_teacher` shards, in order.

    Args:
        teacher: the teacher model.
        modules: which sub-modules become their own FSDP unit (one all-gather each):

            - ``None`` (default): the children of the ``nn.ModuleList`` holding the most
              parameters (a transformer's layers);
            - a module class, e.g. ``MusicgenDecoderLayer``: every sub-module of that class;
            - a module name, e.g. ``"decoder.model.decoder.layers.3"``; a name that points at an
              ``nn.ModuleList`` or ``nn.ModuleDict`` means its children (a container has no
              ``forward`` to hook);
            - a list mixing classes and names (union, duplicates dropped).

    Raises:
        ShardingError: ``modules`` of the wrong type, a name that is not a sub-module (with the
            closest names), a class with no instance, or no ``nn.ModuleList`` to default to.
    """
    if not isinstance(teacher, nn.Module):
        raise bad_value(ShardingError, "teacher", type(teacher).__name__, "a torch.nn.Module")
    named = dict(teacher.named_modules())
    if modules is None:
        return _largest_list(teacher, named)
    specs = [modules] if isinstance(modules, (str, type)) else modules
    if not isinstance(specs, Sequence) or not specs:
        raise bad_value(ShardingError, "modules", modules,
                        "None, a module class, a module name, or a non-empty list of those")
    out: list[str] = []
    for spec in specs:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            found = [n for n, m in named.items() if n and isinstance(m, spec)]
            if not found:
                classes = sorted({type(m).__name__ for n, m in named.items() if n})
                raise bad_value(ShardingError, "modules", spec.__name__,
                                f"a class with instances in {type(teacher).__name__}; its sub-module classes are "
                                f"{classes}", close_matches(spec.__name__, classes).strip())
            out += found
        elif isinstance(spec, str):
            if spec == "":
                raise bad_value(ShardingError, "modules", spec,
                                "names of sub-modules (the root is always sharded, last)",
                                "name its blocks, e.g. 'layers' or 'layers.0'")
            if spec not in named:
                raise bad_value(ShardingError, "modules", spec,
                                f"a name from {type(teacher).__name__}.named_modules()"
                                + close_matches(spec, [n for n in named if n]),
                                "print(kdq.distributed.teacher_blocks(teacher)) shows the default blocks")
            mod = named[spec]
            out += [f"{spec}.{k}" for k in mod._modules] if isinstance(mod, _CONTAINERS) else [spec]
        else:
            raise bad_value(ShardingError, "modules item", spec, "a module name (str) or an nn.Module subclass")
    return list(dict.fromkeys(out))


def _largest_list(teacher: nn.Module, named: dict[str, nn.Module]) -> list[str]:
    best, size = None, 0
    for name, mod in named.items():
        if isinstance(mod, nn.ModuleList):
            n = sum(p.numel() for p in mod.parameters())
            if n > size:
                best, size = name, n
    if best is None:
        raise bad_value(ShardingError, "modules", None,
                        f"a module class or names: {type(teacher).__name__} has no nn.ModuleList with "
                        "parameters to default to", "pass modules=[BlockClass] or modules=['name', ...]")
    prefix = f"{best}." if best else ""
    return [f"{prefix}{k}" for k in named[best]._modules]


def shard_teacher(
    teacher: nn.Module,
    *,
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a frozen ``teacher`` over the ranks of the process group with FSDP2; returns it.

    ``fully_shard`` is applied to each block of :func:`teacher_blocks` (innermost first), then to
    ``teacher``; the teacher is put in ``eval()`` with ``requires_grad`` False first. The returned
    object is ``teacher`` itself (FSDP2 swaps its class); call it as before, on every rank, or use
    :func:`teacher_logits`. Load the teacher on CPU (or on the meta device and initialise after)
    when it does not fit one GPU: with an NCCL group, each block moves to the GPU as it is sharded.

    Args:
        teacher: the teacher model, not yet sharded.
        modules: blocks to shard one by one; see :func:`teacher_blocks`.
        mesh: a 1-D ``torch.distributed.device_mesh.DeviceMesh``; default: all ranks of the default
            group, on ``cuda`` if the teacher is on a GPU or the backend is NCCL, else on ``cpu``.
        reshard_after_forward: free each block's gathered parameters after its forward (default
            True: the point of sharding a teacher). False keeps the teacher gathered after its first
            forward, i.e. no memory saved at rest.

    Raises:
        ShardingError: no initialised process group, a teacher already sharded, bad ``modules``
            (see :func:`teacher_blocks`) or a ``mesh`` that is not a 1-D ``DeviceMesh``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    blocks = teacher_blocks(teacher, modules)
    if isinstance(teacher, FSDPModule):
        raise bad_value(ShardingError, "teacher", type(teacher).__name__,
                        "a teacher not yet sharded (fully_shard was already applied)",
                        "call shard_teacher once, on the plain model")
    if not isinstance(reshard_after_forward, bool):
        raise bad_value(ShardingError, "reshard_after_forward", reshard_after_forward, "True or False")
    mesh = _mesh(teacher, mesh)
    teacher.eval().requires_grad_(False)
    for name in sorted(blocks, key=lambda n: n.count("."), reverse=True):  # inner units before outer
        fully_shard(teacher.get_submodule(name), mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=reshard_after_forward)

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(teacher, *args, **kwargs)

    setattr(teacher, _CALL, call)
    register_fsdp_forward_method(teacher, _CALL)  # the root's gather/free around `call`
    return teacher


def _mesh(teacher: nn.Module, mesh: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise bad_value(ShardingError, "torch.distributed.is_initialized()", False,
                        "an initialised process group: the teacher is sharded over its ranks",
                        "run under torchrun and call torch.distributed.init_process_group('nccl' or 'gloo') "
                        "before shard_teacher, or leave sharding off (prepare_teacher(..., shard=False))")
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if mesh is None:
        devices = {p.device.type for p in teacher.parameters()} - {"meta"}
        if devices - {"cpu"}:
            kind = sorted(devices - {"cpu"})[0]
        else:
            kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return init_device_mesh(kind, (dist.get_world_size(),))
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        shown = f"DeviceMesh(ndim={mesh.ndim})" if isinstance(mesh, DeviceMesh) else mesh
        raise bad_value(ShardingError, "mesh", shown, "None or a 1-D torch.distributed.device_mesh.DeviceMesh",
                        "e.g. init_device_mesh('cuda', (world_size,))")
    return mesh


def prepare_teacher(
    teacher: nn.Module,
    *,
    shard: bool = False,
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    mesh: Any = None,
) -> nn.Module:
    """The teacher ready for distillation: ``eval()``, frozen, and sharded if ``shard`` (the flag).

    With ``shard=False`` nothing distributed happens, but ``modules`` is still resolved, so a typo
    in a config fails on a one-device run rather than on the cluster. With ``shard=True`` this is
    :func:`shard_teacher` (which needs an initialised process group).
    """
    if not isinstance(shard, bool):
        raise bad_value(ShardingError, "shard", shard, "True or False")
    if shard:
        return shard_teacher(teacher, modules=modules, mesh=mesh)
    if modules is not None:
        teacher_blocks(teacher, modules)
    return teacher.eval().requires_grad_(False)


def teacher_logits(teacher: nn.Module, *inputs: Any, call: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """The teacher's output under ``torch.no_grad()``: ``teacher(*inputs, **kwargs)``, or
    ``call(teacher, *inputs, **kwargs)`` when the logits come from the teacher's sub-modules rather
    than its ``forward`` (as ``conditioned_logits`` in the MusicGen example). Sharded or not.

    On a sharded teacher, ``call`` runs as a forward of the root (its parameters gathered, then
    freed); blocks called inside gather their own. Calling a sub-module of a sharded teacher
    directly, outside ``call``, fails in FSDP: the root's parameters are still shards.
    """
    from torch.distributed.fsdp import FSDPModule

    with torch.no_grad():
        if call is None:
            return teacher(*inputs, **kwargs)
        if not callable(call):
            raise bad_value(ShardingError, "call", type(call).__name__,
                            "None or a function call(teacher, *inputs, **kwargs)")
        if isinstance(teacher, FSDPModule):
            method = getattr(teacher, _CALL, None)
            if method is None:
                raise bad_value(ShardingError, "teacher", type(teacher).__name__,
                                "a teacher sharded by kdq.distributed.shard_teacher when call= is given",
                                "shard it with shard_teacher, or call its forward (call=None)")
            return method(call, *inputs, **kwargs)
        return call(teacher, *inputs, **kwargs)


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters held by this rank: the local shard of each sharded
    parameter (``DTensor.to_local()``), the whole of each plain one; each tensor once."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():  # each parameter once, tied ones included
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total
