"""A run's output directory: one writer at a time, one run's checkpoints, and resume checks.

- :func:`lock` takes an exclusive lock (``<output_dir>/.specforge.lock``, ``fcntl.flock``) for the
  whole run. A second run into the same directory fails at once naming the holder (pid, host, start
  time). The kernel drops the lock when its process dies, so a lock file left by a dead process is
  taken over (with a warning naming it); the lock is released on return, errors and Ctrl-C.
- :func:`claim` gives a fresh run its identity (``run.json``) and refuses a directory that holds
  another run's checkpoints; checkpoints record the run id and pruning only touches this run's.
- :func:`check_resume` compares the newest checkpoint's config and data with the new run's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

from specforge_core.provenance import RUN_FILE, data_fingerprint, run_id

__all__ = ["RUN_FILE", "RunDirError", "check_resume", "claim", "config_changes", "data_fingerprint", "lock",
           "run_id"]

LOCK_FILE = ".specforge.lock"


class RunDirError(RuntimeError):
    """The output directory cannot be used for this run; the message says why and what to do."""


# ---------------------------------------------------------------------------------- the lock
def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict[str, Any]) -> str:
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def lock(output_dir: str | Path, warn: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold the output directory's exclusive lock for the ``with`` block."""
    import fcntl

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"output_dir {out} is in use by another specforge run ({_describe(_holder(path))}); wait "
                "for it to finish or stop it, or set run.output_dir to another directory"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
        old = _holder(path)
        if old.get("pid") and old.get("pid") != me["pid"]:
            if old.get("host") == me["host"] and _alive(int(old["pid"])) and _holder(path) == old:
                # flock did not see it but the process lives: another filesystem view; do not share
                raise RunDirError(f"output_dir {out} is locked by a running process ({_describe(old)}); "
                                  "stop it or set run.output_dir to another directory")
            if old.get("host") != me["host"]:
                raise RunDirError(
                    f"output_dir {out} holds a lock of {_describe(old)}, another host whose process cannot "
                    f"be checked from here; if that run is gone, delete {path}, or set run.output_dir to "
                    "another directory")
            warn(f"output_dir {out}: taking over a stale lock of {_describe(old)} (that process is gone)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file = free; the file stays (unlinking races)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- identity
def claim(output_dir: str | Path, resume: bool, name: str = "specforge") -> str:
    """Make ``output_dir`` this run's: a fresh run refuses a directory holding checkpoints (of
    another run), a resumed run keeps the directory's id. Returns the run id."""
    from specforge_core.training import checkpoint as ckpt

    out = Path(output_dir)
    existing = ckpt.step_dirs(out)
    current = run_id(out)
    if not resume and existing:
        names = ", ".join(d.name for _, d in existing[-3:])
        raise RunDirError(
            f"output_dir {out} already holds checkpoints of an earlier run ({names} under "
            f"{ckpt.checkpoint_root(out)}); set training.resume = true to continue that run, or set "
            "run.output_dir to another directory (or delete the old checkpoints yourself)")
    if resume and current and existing:
        return current
    if resume and existing and current is None:  # checkpoints from before run ids: adopt the newest's
        latest = ckpt.latest_checkpoint(out)
        current = ckpt.read_extra(latest).get("run_id") if latest else None
    if not resume:
        current = None  # a fresh run is a new run, even in a directory an earlier run claimed
    new = current or f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    (out / RUN_FILE).write_text(json.dumps({"run_id": new}) + "\n")
    return new


# ------------------------------------------------------------------------------ resume checks
# Keys a resumed run may change (each named in a warning). Any other changed key is refused: it
# changes what the checkpoint's weights, optimizer, scheduler or data position mean.
ALLOWED_PREFIXES = (
    "training.lr", "training.max_steps", "training.num_epochs", "training.save_every",
    "training.keep_checkpoints", "training.log_every", "training.max_grad_norm", "training.weight_decay",
    "training.betas", "training.warmup_ratio", "training.dtype", "training.local.",
    "logging.", "profiler.", "eval.", "inference.", "transfer.", "dataset.cache_dir",
    "run.name", "run.pipeline", "run.ray_address", "run.nodes", "run.gpus_per_node", "run.gpu_memory_gib",
)
SILENT = ("training.resume", "run.output_dir")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old_toml: str, new_toml: str) -> tuple[list[str], list[str]]:
    """(refused, allowed) changed keys between two dumped configs, each as ``key: old -> new``."""
    import tomllib

    old, new = _flat(tomllib.loads(old_toml)), _flat(tomllib.loads(new_toml))
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == b or key in SILENT or _same_paths(a, b):
            continue
        line = f"{key}: {a!r} -> {b!r}"
        (allowed if key.startswith(ALLOWED_PREFIXES) else refused).append(line)
    return refused, allowed


def _same_paths(old: Any, new: Any) -> bool:
    """A checkpoint from before paths were stored absolute (relative to the cwd then) names the same
    file as the absolute path a config now resolves to, read from the same working directory."""
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same_paths(a, b) for a, b in zip(old, new, strict=True))
    return (isinstance(old, str) and isinstance(new, str) and bool(old) and not os.path.isabs(old)
            and os.path.isabs(new) and os.path.abspath(old) == os.path.normpath(new))


def check_resume(config: Any, config_toml: str, warn: Callable[[str], None] = print) -> Optional[Path]:
    """Before a resumed run starts: the checkpoint it will continue from must have been trained with
    a compatible config and the same data. Raises :class:`RunDirError` naming each refused key;
    warns naming each allowed change. Returns that checkpoint (None: nothing to resume)."""
    from specforge_core.training import checkpoint as ckpt

    out = Path(config.output_dir)
    latest = ckpt.latest_checkpoint(out, report=warn)
    if latest is None:
        return None
    extra = ckpt.read_extra(latest)
    if (latest / ckpt.DCP_METADATA).is_file():  # a sharded checkpoint: refuse code in it before any work
        from specforge_core.training import safe_dcp

        safe_dcp.read_metadata(latest)
    refused, allowed = config_changes(extra.get("config_toml", ""), config_toml) if extra.get(
        "config_toml") else ([], [])
    stored = extra.get("data_files")
    if stored is not None:  # the same data is the same bytes, wherever the files are now
        from specforge_core.data.identity import dataset_change

        refusal, moved = dataset_change(stored, list(config.dataset.path))
        if refusal:
            refused.append(refusal)
        elif moved:
            refused = [r for r in refused if not r.startswith("dataset.path:")]
            allowed.append(moved)
    if refused:
        raise RunDirError(
            f"training.resume: {latest} was trained with another config; these changes would break the run: "
            + "; ".join(refused)
            + ". Undo them, or start a fresh run in another run.output_dir")
    for line in allowed:
        warn(f"training.resume: config changed since {latest.name}: {line}")
    return latest
