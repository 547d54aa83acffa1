"""``local`` training strategy: one process, no process group, atomic checkpoints.

A checkpoint is a directory::

    model.safetensors   the state dict (CPU) without frozen params (the target embedding is
                        reloaded from the target when the draft is built)
    optimizer.pt        optimizer.state_dict(), read back with weights_only=True
    extra.json, extra.safetensors   the trainer's extras as data (step, scheduler, RNG, ...)
    COMPLETE            written last, lists every file with its size (+ sha256 when small);
                        a directory without it, or whose files do not match, is never loaded

It is written into ``<path>.tmp-<random>``, fsynced, then renamed to ``<path>``. An existing
``<path>`` is renamed aside to ``<path>.old-<random>`` first and deleted after, so at every instant
one complete copy exists (if a crash hits between the two renames, the next save or load renames the
``.old`` copy back).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from contextlib import AbstractContextManager as ContextManager

import attrs
import torch
from safetensors.torch import save_file

from specforge_core.config.fields import option
from specforge_core.plugin_api import (
    CheckpointError,
    is_complete,
    load_model_weights,
    load_optimizer_state,
    problems,
    read_extra,
    resolve_dtype,
    write_complete,
    write_extra,
)


@attrs.define
class LocalStrategyOptions:
    device: str = option("auto", "'auto' = cuda if available else cpu; or an explicit 'cpu', 'cuda:1', ...")
    master_weights: str = option(
        "fp32", "Precision of the trainable parameters the optimizer updates when training.dtype is "
        "bf16/fp16: 'fp32' = fp32 master weights, compute in training.dtype under autocast (the draft "
        "casts its weights once per micro-step); 'bf16' = parameters stored in training.dtype "
        "(AdamW updates bf16 weights: less memory, small lr updates get rounded away)",
        choices=("fp32", "bf16"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"[training.local] device: {name!r} is not a device (allowed: auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"[training.local] device: {name!r} requested but CUDA is not available")
    return device


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync directories
        _fsync_file(path)


def recover(path: str) -> None:
    """Finish an interrupted replace: bring a complete ``.old`` copy back if ``path`` is missing."""
    path = path.rstrip("/")
    if os.path.exists(path):
        return
    for old in sorted(glob.glob(glob.escape(path) + ".old-*")):
        if is_complete(old):
            os.replace(old, path)
            return


class LocalStrategy:
    rank = 0
    world_size = 1

    def __init__(self, options: LocalStrategyOptions | None, config=None):
        self.options = options or LocalStrategyOptions()
        self.device = resolve_device(self.options.device)
        dtype_name = config.training.dtype if config is not None else "auto"
        self.dtype = resolve_dtype(dtype_name, self.device, "training.dtype")

    # ------------------------------------------------------------------------------ training
    def param_dtype(self, param: torch.nn.Parameter) -> torch.dtype:
        """fp32 master copies for what the optimizer updates; frozen params (the target embedding)
        in the compute dtype."""
        if param.requires_grad and self.options.master_weights == "fp32":
            return torch.promote_types(self.dtype, torch.float32)
        return self.dtype

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        # cast parameters only: float buffers such as RoPE inv_freq stay in their own precision
        for p in model.parameters():
            want = self.param_dtype(p)
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)
        return model

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        # max_norm <= 0 means "off": still report the norm, scale by 1
        limit = max_norm if max_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        # clone: tied weights become independent tensors, which safetensors requires
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        path = os.path.abspath(path.rstrip("/"))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        recover(path)
        for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)

        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        try:
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            files = {
                "model.safetensors": lambda f: save_file(
                    {k: v for k, v in self.full_state_dict(model).items() if k not in frozen}, f),
                "optimizer.pt": lambda f: torch.save(optimizer.state_dict(), f),
            }
            for name, write in files.items():
                write(os.path.join(tmp, name))
                _fsync_file(os.path.join(tmp, name))
            write_extra(tmp, extra)
            write_complete(tmp)
            _fsync_dir(tmp)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        if os.path.exists(path):
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)

    def load_checkpoint(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        path = os.path.abspath(path.rstrip("/"))
        recover(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        bad = problems(path)
        if bad:
            raise CheckpointError(
                f"checkpoint {path} is incomplete or damaged ({'; '.join(bad)}); resume from an earlier "
                "checkpoint or delete it"
            )
        extra = read_extra(path)  # first: a refused extra stops the load before anything changes
        load_model_weights(model, os.path.join(path, "model.safetensors"))
        optimizer.load_state_dict(load_optimizer_state(os.path.join(path, "optimizer.pt")))
        return extra


def make_local_strategy(options: LocalStrategyOptions | None, config=None) -> LocalStrategy:
    return LocalStrategy(options, config)
