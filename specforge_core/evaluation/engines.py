"""Evaluation engines: who runs the speculation that ``specforge eval`` measures.

``hf`` (the default) is the core's in-process loop (``speculate.py``). Plugins add serving engines
through the ``register_eval_engines`` hook (``hookspecs``): the engine gets an ``EvalRequest`` (the
prompts already tokenized, so every engine sees the same token ids) and returns an ``EvalReport``
with the same accounting (``accounting.py``), its raw counters in ``report.raw`` and
``report.extra``, and a mismatch per prompt where its speculative output differs from its own
plain greedy output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import attrs


@attrs.define
class EvalRequest:
    draft: str  # exported draft directory
    target: str  # target model directory or hub id
    prompts: list[Any]  # data.Prompt objects (sample_id, input_ids, category)
    steps: int
    max_new_tokens: int
    eos_ids: list[int]
    check: bool = True  # also decode plainly and compare (mismatch -> report error -> exit 1)
    dtype: str = "fp32"
    aux_layers: Optional[list[int]] = None  # HF hidden_states indices, when given explicitly
    engine_python: Optional[str] = None  # interpreter of the engine's own environment, if it has one
    trust_remote_code: bool = False
    progress: bool = False


EngineRun = Callable[[EvalRequest], Any]


def eval_engines(registry: Any = None) -> dict[str, tuple[EngineRun, str]]:
    """name -> (run, description), the core's ``hf`` first."""
    from specforge_core.registry import get_registry

    registry = registry or get_registry()
    found: dict[str, tuple[EngineRun, str]] = {"hf": (_run_hf, "in-process transformers target (default)")}

    def register(name: str, run: EngineRun, description: str = "") -> None:
        if name in found:
            raise ValueError(f"eval engine '{name}' is registered twice")
        found[name] = (run, description)

    registry.pm.hook.register_eval_engines(register=register)
    return found


def get_engine(name: str, registry: Any = None) -> EngineRun:
    engines = eval_engines(registry)
    if name not in engines:
        raise ValueError(f"eval engine '{name}' is not installed; installed: {', '.join(engines)}")
    return engines[name][0]


def _run_hf(request: EvalRequest):
    from specforge_core.evaluation.evaluate import evaluate

    return evaluate(request.draft, request.target, request.prompts, request.steps, request.max_new_tokens,
                    check=request.check, aux_layers=request.aux_layers, eos_ids=request.eos_ids,
                    dtype=request.dtype, trust_remote_code=request.trust_remote_code, progress=request.progress)
