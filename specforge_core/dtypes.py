"""Dtype names as configs write them (``training.dtype``, ``inference.dtype``, ``eval --dtype``).

The one table: every component that turns a config's dtype name into a torch dtype, an engine's
dtype string or a byte count reads it here. ``"auto"`` means bf16 on a GPU and fp32 on a CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

TORCH: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
}
# the spelling HF configs, vLLM and SGLang use
ENGINE: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
NAMES = tuple(TORCH)


def on_gpu(device: torch.device | str | None) -> bool:
    """Whether ``device`` is a GPU (None: whether this process has one)."""
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def resolve(name: str, device: torch.device | str | None = None, key: str = "dtype",
            allowed: Optional[tuple[str, ...]] = None) -> torch.dtype:
    """The torch dtype of config name ``name`` on ``device`` (``"auto"``: bf16 on GPU, fp32 on CPU).
    An unknown name is one ValueError line naming ``key`` and the allowed names."""
    allowed = allowed or NAMES
    if name == "auto":
        return torch.bfloat16 if on_gpu(device) else torch.float32
    if name not in allowed:
        raise ValueError(f"{key}: {name!r} is not allowed; allowed: auto, {', '.join(allowed)}")
    return TORCH[name]


def engine_name(name: str, device: torch.device | str | None = None, key: str = "dtype") -> str:
    """``name`` as an engine's dtype string ("bfloat16"...), ``"auto"`` resolved as in ``resolve``."""
    return str(resolve(name, device, key)).removeprefix("torch.")


def from_engine_name(name: str) -> torch.dtype:
    """The torch dtype of an engine's dtype string ("bfloat16", "float32"...)."""
    for short, engine in ENGINE.items():
        if engine == name:
            return TORCH[short]
    raise ValueError(f"unknown dtype {name!r}; known: {', '.join(ENGINE.values())}")


def nbytes(name: str) -> int:
    """Bytes per element of config name ``name`` (``"auto"``: 2, the GPU's bf16)."""
    return 2 if name == "auto" else TORCH[name].itemsize
