"""What a checkpoint records about where it came from: the run that wrote it and the data it was
trained on. Read by :mod:`specforge_core.rundir` (claim, resume checks) and written into every
checkpoint by :mod:`specforge_core.training.checkpoint`; it imports neither (only the dependency-free files module)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from specforge_core.files import file_sha256

RUN_FILE = "run.json"


def run_id(output_dir: str | Path) -> Optional[str]:
    """The id of the run that owns ``output_dir`` (None if no run claimed it)."""
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def data_fingerprint(paths: list[str]) -> dict[str, str]:
    """``path -> sha256`` of the training data files (cached per size and mtime in this process)."""
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out[p] = "missing"
            continue
        key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = file_sha256(p)
        out[p] = _FINGERPRINTS[key]
    return out
