"""Which draft algorithm evaluates an export: its ``proposer`` (``components.Proposer``).

An algorithm that supports ``specforge eval`` has ``proposer(export_dir, target, device)`` and
``export_architectures`` (the config.json ``architectures`` its export writes). With a run config
the algorithm is ``model.draft``; for a bare ``--draft DIR`` it is the registered algorithm whose
``export_architectures`` name the export's architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from specforge_core.components import capability, conformance_problems, has_capability


def find_algorithm(draft_dir: str | Path, name: Optional[str] = None, registry: Any = None) -> tuple[str, Any]:
    """``(name, algorithm)`` that evaluates the export in ``draft_dir``."""
    from specforge_core.registry import get_registry

    registry = registry or get_registry()
    kind = "draft_algorithm"
    if name:
        return name, _create(registry, kind, name)
    path = Path(draft_dir) / "config.json"
    archs = json.loads(path.read_text()).get("architectures") or []
    seen = []
    for candidate in registry.names(kind):
        alg = _create(registry, kind, candidate)
        served = tuple(capability(alg, "DraftAlgorithm.export_architectures"))
        seen.append(f"{candidate} ({', '.join(served) or 'no proposer'})")
        if has_capability(alg, "DraftAlgorithm.proposer") and set(served) & set(archs):
            return candidate, alg
    raise ValueError(f"{path}: no installed draft algorithm evaluates architectures {archs}; installed: "
                     f"{'; '.join(seen) or 'none'} (name one with --algorithm, or pass a run config)")


def _create(registry: Any, kind: str, name: str) -> Any:
    return registry.create(kind, name, None, None)  # checked against its contract


def load_proposer(draft_dir: str | Path, target: Any, device: Any, name: Optional[str] = None,
                  registry: Any = None):
    alg_name, alg = find_algorithm(draft_dir, name, registry)
    if not has_capability(alg, "DraftAlgorithm.proposer"):
        raise ValueError(f"draft algorithm '{alg_name}' has no proposer: it cannot be evaluated by specforge eval")
    proposer = alg.proposer(draft_dir, target, device)
    problems = conformance_problems(proposer, "Proposer")
    if problems:
        raise ValueError(f"draft algorithm '{alg_name}': its proposer ({type(proposer).__name__}) {'; '.join(problems)}")
    default = alg.features.default_aux_layers
    if proposer.aux_layers is None and default is not None:
        # the export names no layers: the algorithm's default for this target, as in training
        proposer.aux_layers = [int(i) for i in default(int(target.num_layers))]
    return proposer
