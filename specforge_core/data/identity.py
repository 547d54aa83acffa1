"""Which data a run reads, by content: a file's identity is its sha256, not its path.

A dataset that was only moved or renamed (same bytes, same order) is the same dataset: resuming on
it continues exactly. Hashes are cached per (path, size, mtime) in this process, so one run hashes
each file once however often it asks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from specforge_core.provenance import data_fingerprint


def data_sha256(path: str | Path) -> str:
    """sha256 of a data file, cached per path, size and mtime; "missing" for a file not there."""
    return data_fingerprint([str(path)])[str(path)]


def dataset_change(stored: Mapping[str, str], paths: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
    """Compare the data a checkpoint was trained on (``path -> sha256``, in dataset order) with
    ``paths`` now: ``(refusal, note)``. ``refusal``: the content differs (which files); ``note``:
    same content under other paths (moved or renamed), which a resume may continue on."""
    old_paths, old_hashes = list(stored), list(stored.values())
    new_hashes = [data_sha256(p) for p in paths]
    if new_hashes == old_hashes:
        same_place = [os.path.abspath(p) for p in old_paths] == [os.path.abspath(p) for p in paths]
        return None, None if same_place else (
            f"dataset.path: {old_paths} -> {list(paths)}: moved, same content (sha256)")
    changed = [f"{p} (sha256 {h[:12]})" for p, h in zip(paths, new_hashes, strict=False) if h not in old_hashes]
    changed += [f"{p} (no longer read)" for p, h in stored.items() if h not in new_hashes]
    if not changed:
        changed = [f"the order of the files ({list(paths)}, trained on {old_paths})"]
    return f"dataset files' content: {', '.join(changed)} differ from the ones trained on", None
