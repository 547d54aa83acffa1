"""Process-group helpers shared by trainer processes (local launcher, Ray actors, tests).

One job: start and stop ``torch.distributed`` with the right backend for the hardware —
NCCL when the process has a GPU, gloo otherwise (CPU machines, CI).
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not allowed; allowed: {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs a CUDA GPU, but torch.cuda.is_available() is False; use 'gloo'")
    return backend


def local_rank(rank: int) -> int:
    """This process's GPU index on its host: $LOCAL_RANK if set, else rank modulo the GPU count."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    n = torch.cuda.device_count()
    return rank % n if n else 0


def init_process_group(
    backend: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: Optional[int] = None,
    timeout_s: float = 600.0,
) -> str:
    """Join the default process group over TCP rendezvous; returns the backend used.

    With NCCL the current CUDA device is set to ``local_rank(rank)`` first, so collectives and
    FSDP land on this process's own GPU.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    if master_port is None:
        if world_size > 1:
            raise ValueError("master_port is required when world_size > 1 (every rank must use the same one)")
        master_port = free_port(master_addr)
    chosen = pick_backend(backend)
    if chosen == "nccl":
        torch.cuda.set_device(local_rank(rank))
    dist.init_process_group(
        backend=chosen,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return chosen


def destroy() -> None:
    """Leave the process group (no-op if none); safe to call in ``finally`` blocks."""
    if dist.is_initialized():
        dist.destroy_process_group()
