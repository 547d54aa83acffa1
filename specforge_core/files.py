"""Small, dependency-free file and error helpers shared by checkpoints, the feature cache, data
identity, the reference fetch and the CLI (one copy each; this module imports nothing of the core)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB blocks (uncached)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def carried_error(exc: BaseException) -> BaseException:
    """The error a wrapper carries: torch's ``CheckpointException`` (a ``BaseException`` holding each
    rank's error in ``failures``), followed down; anything else as it is."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException) and inner is not exc:
            return carried_error(inner)
    return exc
