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
    temperature: float = 0.0  # 0 = greedy; > 0 = the engine's speculative sampling
    seed: int = 0
    tree: Optional[Any] = None  # a tree.TreeSpec, for engines that verify trees
    speedup: bool = False  # also report the engine's wall-clock with and without speculation
    concurrency: Optional[list[int]] = None  # speedup: requests in flight at a time, per level (None: all)


EngineRun = Callable[[EvalRequest], Any]


def eval_engines(registry: Any = None) -> dict[str, tuple[Optional[EngineRun], str]]:
    """name -> (run, description), the core's ``hf`` first (its run is None: ``evaluate`` runs it
    in-process)."""
    from specforge_core.registry import get_registry

    registry = registry or get_registry()
    found: dict[str, tuple[Optional[EngineRun], str]] = {"hf": (None, "in-process transformers target (default)")}
    # collected by the registry, plugin by plugin (a plugin whose hook raises is left out, named)
    for name, engine in registry.eval_engines().items():
        if name in found:
            raise ValueError(f"eval engine '{name}' (plugin {engine.plugin.name!r}) clashes with the core's own")
        found[name] = (engine.run, engine.description)
    return found


def get_engine(name: str, registry: Any = None) -> EngineRun:
    """The run of a plugin engine (``hf`` is not one: ``evaluate`` runs it itself)."""
    engines = eval_engines(registry)
    if name not in engines or engines[name][0] is None:
        plugins = [n for n, (run, _) in engines.items() if run is not None]
        raise ValueError(f"eval engine '{name}' is not installed; installed: hf, {', '.join(plugins) or '(no plugin engine)'}")
    return engines[name][0]
