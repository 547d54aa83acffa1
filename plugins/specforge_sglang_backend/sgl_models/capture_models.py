"""Capture-enabled subclasses of SGLang's own model classes (loaded by SGLang, not by specforge).

For each architecture the backend names in ``SPECFORGE_SGLANG_CAPTURE`` (JSON, set in the
environment the scheduler processes inherit) this builds a subclass of SGLang's built-in class
with the same name, whose ``__init__`` runs the original and then ``install_capture``. Weights,
kernels, TP and quantization stay SGLang's own.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from specforge_sglang_backend.capture import install_capture

ENV = "SPECFORGE_SGLANG_CAPTURE"


def _builtin_models() -> dict:
    # The registry is mid-import when it scans this package; the built-in classes are already in it.
    registry = importlib.import_module("sglang.srt.models.registry")
    return dict(registry.ModelRegistry.models)


def _capture_class(base: type, spec: dict) -> type:
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        install_capture(self, spec["aux_layers"], spec["vocab_size"], spec["argmax_chunk"])

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def _entry_classes() -> list[type]:
    raw = os.environ.get(ENV)
    if not raw or "sglang.srt.models.registry" not in sys.modules:
        return []  # not loaded by SGLang's registry for a specforge engine: register nothing
    spec = json.loads(raw)
    builtin = _builtin_models()
    missing = [a for a in spec["architectures"] if a not in builtin]
    if missing:
        raise RuntimeError(
            f"specforge sglang backend: SGLang has no model class for {missing}; supported: "
            f"{sorted(builtin)[:20]}..."
        )
    return [_capture_class(builtin[a], spec) for a in spec["architectures"]]


EntryClass = _entry_classes()
