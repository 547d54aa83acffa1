"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of a checkpoint directory ``path`` (must be on a filesystem every rank sees)::

    path/
      .metadata, __0_0.distcp, ...   DCP: {"model": ..., "optim": ...}, each rank writes its shards
      extra.json, extra.safetensors  the trainer's ``extra`` as data (rank 0; nothing is unpickled)
      COMPLETE                       written last, lists every file with its size (+ sha256 when
                                     small); a directory without it, or not matching it, is never loaded

Atomicity: everything goes to ``path.tmp-<id>`` (one id for all ranks, broadcast from rank 0);
after a barrier rank 0 writes ``COMPLETE`` and renames the directory to ``path``.

Loading never unpickles code: ``.metadata`` and non-tensor items are read as data only
(``specforge_core.training.safe_dcp``), not by torch's default reader and planner.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from specforge_core.plugin_api import (
    COMPLETE,
    CheckpointError,
    problems,
    read_extra,
    safe_dcp,
    write_complete,
    write_extra,
)

# The frozen target embedding is the target's own weight (reloaded from the target on resume), so
# neither checkpoints nor exports carry it.
_SHARDED = StateDictOptions(ignore_frozen_params=True)
# Loading then leaves the frozen params as they are: `strict` would report them missing. Every
# trainable key is still required: `dcp.load` fails on a key the checkpoint lacks.
_SET = StateDictOptions(ignore_frozen_params=True, strict=False)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded trainable params + buffers, on rank 0 as CPU tensors."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=opts)
    return {k: v for k, v in state.items()} if dist.get_rank() == 0 else {}


def _shared_id() -> str:
    box = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, barrier: Callable[[], None]) -> None:
    path = os.path.abspath(path.rstrip("/"))
    tmp = f"{path}.tmp-{_shared_id()}"
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_SHARDED)
    try:
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)  # collective
        except BaseException as exc:  # torch wraps a write error (a full disk) in a BaseException
            inner = safe_dcp.unwrap(exc)
            if inner is exc:
                raise
            if isinstance(inner, OSError) and not inner.filename:
                raise OSError(inner.errno, inner.strerror or str(inner), tmp) from exc
            raise inner from exc
        # every rank's shards are on disk; rank 0 writes the rest (every rank learns if that failed)
        _on_rank0(lambda: write_extra(tmp, extra), path)
        _on_rank0(lambda: (write_complete(tmp), _replace_dir(tmp, path)), path)
    except BaseException:
        if dist.get_rank() == 0:  # no rank writes any more: each one saw the failure
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # nobody returns (or starts the next save) before `path` is in place


def _on_rank0(fn: Callable[[], object], path: str) -> None:
    """Run ``fn`` on rank 0; a failure raises on every rank (none is left waiting in a barrier)."""
    failed: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error, failed[0] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0] is not None:
        raise CheckpointError(f"checkpoint {path}: rank 0 failed to write it ({failed[0]})")


def _replace_dir(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``. A directory cannot be renamed over a non-empty one, so an older
    ``dst`` is first moved aside and deleted only once the new one is in place."""
    old = None
    if os.path.exists(dst):
        old = f"{src}.old"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, barrier: Callable[[], None]) -> dict:
    """Collective: restore model + optimizer in place (resharded if the world size changed);
    returns the ``extra`` dict."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    bad = problems(path)
    if bad:
        raise CheckpointError(
            f"checkpoint {path!r} is incomplete or damaged ({'; '.join(bad)}) and will not be loaded; "
            f"delete it or pick an older checkpoint (a complete one has a matching {COMPLETE} marker)"
        )
    extra = read_extra(path)  # first: a refused extra stops the load before anything changes
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_SHARDED)
    state = {"model": model_sd, "optim": optim_sd}
    safe_dcp.load(state, path)  # fills the (sharded) tensors in place; reads data only
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_SET
    )
    barrier()
    return extra
